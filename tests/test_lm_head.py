"""The aligned LM head (vlpet.backbones.head): same logits and gradients, weights still tied."""

from __future__ import annotations

import pytest
import torch

from conftest import make_batch, perturb
from vlpet.backbones.head import ALIGN, AlignedLMHead
from vlpet.train.losses import task_loss


@pytest.mark.parametrize("arch", ("bart", "t5"))
@pytest.mark.parametrize("method", ("vl-pet-large", "full"))
def test_padded_product_gives_the_same_logits_and_grads(build, backbone_factory, one_thread, monkeypatch, arch,
                                                        method):
    model = build(arch, method, folder=backbone_factory(arch, vocab_size=121))  # 121 + 200 rows: unaligned
    perturb(model, scale=0.05)
    head = model.backbone.get_output_embeddings()
    assert isinstance(head, AlignedLMHead)
    assert head.weight is model.backbone.get_input_embeddings().weight  # still tied
    assert head.out_features % ALIGN != 0
    batch = make_batch(arch)
    labels = torch.randint(3, 100, (2, 3))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch, labels=labels, return_loss=False)
        task_loss(out.logits, labels).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    plain_logits, plain_grads = run()
    monkeypatch.setattr(AlignedLMHead, "PAD_DEVICES", ("cpu", "cuda"))
    calls = []
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: calls.append(1) or _pad(*a, **k))
    logits, grads = run()
    assert calls, "the padded path did not run"
    assert logits.shape == plain_logits.shape
    assert torch.allclose(logits, plain_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for n in grads:
        assert torch.allclose(grads[n], plain_grads[n], rtol=1e-4, atol=1e-7), n


_pad = torch.nn.functional.pad


def test_aligned_vocabulary_keeps_the_plain_linear():
    lin = torch.nn.Linear(8, 128)
    assert AlignedLMHead.replace(lin) is lin
    odd = torch.nn.Linear(8, 130)
    new = AlignedLMHead.replace(odd)
    assert isinstance(new, AlignedLMHead) and new.weight is odd.weight and list(new.state_dict()) == ["weight", "bias"]
