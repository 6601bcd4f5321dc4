"""Task losses (spec §3.6): LM cross-entropy with teacher forcing.

"sample" reduction: token mean per sample (x the sampled answer's soft score for VQA), then the
batch mean. "token" reduction (captions): the token mean over the whole batch.

Both are a ratio sum / count (:func:`task_loss_terms`); with several processes the trainer divides
each rank's sum by the *global* count, so the all-reduced gradient is that of the whole global batch
for either reduction, whatever the shard sizes (vlpet.train.loop).
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


def task_loss_terms(logits: torch.Tensor, target_ids: torch.Tensor, reduction: str = "sample",
                    scores: torch.Tensor | None = None,
                    example_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) with ``task_loss = sum / max(count, 1)``: "sample" sums the per-sample losses over
    a count of samples, "token" sums token losses over a count of target tokens. ``example_weight``
    [B] (0 for padding examples, see vlpet.data.sampler) weights both."""
    nll, mask = token_nll(logits, target_ids)
    w = None if example_weight is None else example_weight.to(nll.device, nll.dtype)
    if reduction == "token":
        tokens = mask.to(nll.dtype)
        if w is not None:
            tokens = tokens * w[:, None]
        return (nll * tokens).sum(), tokens.sum()
    per_sample = nll.sum(1) / mask.sum(1).clamp_min(1)
    if scores is not None:
        per_sample = per_sample * scores.to(per_sample.dtype)
    if w is None:
        return per_sample.sum(), torch.tensor(float(per_sample.shape[0]), device=nll.device)
    return (per_sample * w).sum(), w.sum()


def task_loss(logits: torch.Tensor, target_ids: torch.Tensor, reduction: str = "sample",
              scores: torch.Tensor | None = None) -> torch.Tensor:
    total, count = task_loss_terms(logits, target_ids, reduction, scores)
    return total / count.clamp_min(1)
