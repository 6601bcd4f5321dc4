"""The chunked fp32 cross-entropy of vlpet.train.losses against torch's (fp64 reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlpet.train import losses
from vlpet.train.losses import task_loss, token_nll


def _case(dtype, n_rows=7, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(1, n_rows, vocab, generator=gen) * 4).to(dtype)
    target = torch.randint(0, vocab, (1, n_rows), generator=gen)
    target[0, 2] = -100
    target[0, -1] = -100
    return logits, target


@pytest.mark.parametrize("chunk_elements", [None, 64, 1])  # one chunk; several; one row per chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_nll_equals_cross_entropy(monkeypatch, dtype, chunk_elements):
    if chunk_elements:
        monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    logits, target = _case(dtype)
    x = logits.clone().requires_grad_(True)
    nll, mask = token_nll(x, target)
    ref_x = logits.double().requires_grad_(True)
    ref = F.cross_entropy(ref_x.reshape(-1, 50), target.reshape(-1), ignore_index=-100, reduction="none").view(1, -1)
    assert nll.dtype == torch.float32
    assert torch.equal(mask, target.ne(-100))
    assert torch.allclose(nll.double(), ref, rtol=1e-6, atol=1e-5)
    assert (nll[0, 2] == 0) and (nll[0, -1] == 0)
    w = torch.linspace(0.5, 2.0, 7).view(1, 7)  # a non-uniform incoming gradient
    before = x.detach().clone()
    (nll * w).sum().backward()
    assert torch.equal(x.detach(), before)  # the backward never writes into the logits
    (ref * w.double()).sum().backward()
    assert x.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded once, at the end
    assert torch.allclose(x.grad.double(), ref_x.grad, rtol=tol, atol=tol)
    assert torch.all(x.grad[0, 2] == 0) and torch.all(x.grad[0, -1] == 0)


def test_task_loss_reductions_by_hand():
    logits, target = _case(torch.float32, n_rows=4)
    target = target.view(2, 2)
    logits = logits.view(2, 2, 50)
    nll = F.cross_entropy(logits.reshape(-1, 50), target.reshape(-1), ignore_index=-100, reduction="none").view(2, 2)
    mask = target.ne(-100).float()
    per_sample = (nll * mask).sum(1) / mask.sum(1).clamp_min(1)
    scores = torch.tensor([0.3, 1.0])
    assert torch.allclose(task_loss(logits, target, "sample", scores), (per_sample * scores).mean(), atol=1e-6)
    assert torch.allclose(task_loss(logits, target, "token"), (nll * mask).sum() / mask.sum(), atol=1e-6)


def test_empty_batch():
    x = torch.zeros(0, 3, 10, requires_grad=True)
    nll, _ = token_nll(x, torch.zeros(0, 3, dtype=torch.long))
    assert nll.shape == (0, 3)
    nll.sum().backward()
    assert x.grad.shape == x.shape


def test_compiled_branch_is_the_plain_cross_entropy(monkeypatch):
    """Inside torch.compile token_nll falls back to F.cross_entropy (inductor fuses it); same numbers."""
    logits, target = _case(torch.float32)
    eager, _ = token_nll(logits, target)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_form, _ = token_nll(logits, target)
    assert torch.allclose(eager, compiled_form, atol=1e-6)
