"""Task losses (spec §3.6): LM cross-entropy with teacher forcing.

"sample" reduction: token mean per sample (x the sampled answer's soft score for VQA), then the
batch mean. "token" reduction (captions): the token mean over the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood [B, T] (0 where the target is -100) and the token mask."""
    b, t, v = logits.shape
    nll = F.cross_entropy(logits.reshape(b * t, v).float(), target_ids.reshape(b * t), ignore_index=-100,
                          reduction="none").view(b, t)
    return nll, target_ids.ne(-100)


def task_loss(logits: torch.Tensor, target_ids: torch.Tensor, reduction: str = "sample",
              scores: torch.Tensor | None = None) -> torch.Tensor:
    nll, mask = token_nll(logits, target_ids)
    if reduction == "token":
        return nll.sum() / mask.sum().clamp_min(1)
    per_sample = nll.sum(1) / mask.sum(1).clamp_min(1)
    if scores is not None:
        per_sample = per_sample * scores.to(per_sample.dtype)
    return per_sample.mean()
