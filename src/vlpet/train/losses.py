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


# fp32 rows per chunk of the vocabulary-wide softmax: ~256 MB of fp32 temporaries at a time
_CHUNK_ELEMENTS = 1 << 26


class _TokenNLL(torch.autograd.Function):
    """Cross-entropy per row of [N, V] logits, computed in fp32 chunk by chunk, saving only the logits
    (in their own dtype) and one fp32 log-sum-exp per row.

    `F.cross_entropy(logits.float())` materialises an fp32 copy of the logits, an fp32 log-softmax for
    backward and an fp32 gradient that is then cast back: ~3 GiB of temporaries at the paper's VQA batch
    (500 x 10 tokens x 50,465 rows). Here the backward writes softmax - one-hot straight into a gradient
    of the logits' dtype. Same numbers as the fp32 cross-entropy (tests/test_train_losses.py)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, v = logits.shape
        chunk = max(1, _CHUNK_ELEMENTS // max(v, 1))
        valid = target.ne(-100)
        safe = torch.where(valid, target, torch.zeros_like(target))
        # cross_entropy's fused log-softmax kernel gives nll = lse - picked per row in one pass
        nll = torch.cat([F.cross_entropy(logits[s:s + chunk].float(), safe[s:s + chunk], reduction="none")
                         for s in range(0, n, chunk)]) if n else logits.new_zeros(0, dtype=torch.float32)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1).float()
        lse = nll + picked
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk = chunk
        return nll * valid

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        n = logits.shape[0]
        g = grad_nll.float() * valid  # [N]
        grad = torch.empty_like(logits)
        rows = torch.arange(n, device=logits.device)
        for s in range(0, n, ctx.chunk):
            e = min(n, s + ctx.chunk)
            # one fp32 temporary (copy=True: for fp32 logits .float() would alias them and the in-place ops
            # below would overwrite the caller's logits)
            p = logits[s:e].to(torch.float32, copy=True).sub_(lse[s:e, None]).exp_().mul_(g[s:e, None])
            p[rows[: e - s], safe[s:e]] -= g[s:e]  # softmax - one-hot, times the incoming gradient
            grad[s:e] = p
        return grad, None


def token_nll(logits: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood [B, T] in fp32 (0 where the target is -100) and the token mask."""
    b, t, v = logits.shape
    if torch.compiler.is_compiling():  # inside torch.compile inductor fuses the plain form better
        nll = F.cross_entropy(logits.reshape(b * t, v).float(), target_ids.reshape(b * t), ignore_index=-100,
                              reduction="none").view(b, t)
    else:
        nll = _TokenNLL.apply(logits.reshape(b * t, v), target_ids.reshape(b * t)).view(b, t)
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
