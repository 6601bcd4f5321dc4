"""The bf16 frozen backbone (vlpet.frozen_precision): same outputs as plain bf16 autocast within bf16
tolerance, the trainable tensors stay fp32, the backbone's activations are bf16, checkpoints unchanged."""

from __future__ import annotations

import pytest
import torch

from conftest import make_batch, perturb, rel_err
from vlpet.errors import ConfigError
from vlpet.frozen_precision import resolve_frozen_dtype
from vlpet.train.losses import task_loss

METHODS = ("vl-pet-large", "vl-pet-middley", "vl-pet-small", "lora", "bitfit", "floor")


def _method(name, arch):
    from vlpet.method import MethodConfig
    from vlpet.presets import get_preset

    if name == "floor":
        return MethodConfig(name="floor", trainable=("visual_embedding",))
    return get_preset(name, arch)


def _models(build, arch, name):
    """(reference, model with fp32 frozen tensors, the same weights with a bf16 frozen backbone), perturbed."""
    a = build(arch, _method(name, arch))
    perturb(a, scale=0.1)
    out = [a]
    for _ in range(2):
        m = build(arch, _method(name, arch))
        m.load_state_dict(a.state_dict())
        out.append(m)
    out[2].set_frozen_dtype(torch.bfloat16)
    return out


def _pair(build, arch, name):
    return _models(build, arch, name)[1:]


def _step(model, batch, labels, precision=torch.bfloat16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
        out = model(**batch, labels=labels, return_loss=False, task="vqa")
        loss = task_loss(out.logits, labels)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
    return out.logits.float(), loss.float(), grads


def _err(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("arch", ("bart", "t5"))
@pytest.mark.parametrize("name", METHODS)
def test_bf16_frozen_backbone_matches_autocast(build, one_thread, arch, name):
    """Against the fp32 step, the bf16 backbone is about as close as plain bf16 autocast is."""
    torch.manual_seed(0)
    ref, a, b = _models(build, arch, name)
    batch = make_batch(arch, batch=3, length=7, pads=(0, 2, 1))
    labels = torch.randint(3, 100, (3, 4))
    l0, loss0, g0 = _step(ref, batch, labels, torch.float32)
    la, lossa, ga = _step(a, batch, labels)
    lb, lossb, gb = _step(b, batch, labels)
    assert _err(lb, l0) <= 2 * _err(la, l0) + 1e-2
    assert abs(lossb.item() - loss0.item()) <= 2 * abs(lossa.item() - loss0.item()) + 1e-2 * abs(loss0.item())
    assert _err(gb, g0) <= 2 * _err(ga, g0) + 2e-2
    assert gb.dtype == torch.float32
    # trainable tensors stay fp32 master weights; every frozen backbone tensor is bf16, but a norm's frozen
    # weight next to its trainable bias (BitFit, LoRA)
    for n, p in b.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n
        elif n.startswith("backbone.") and not (name in ("lora", "bitfit") and "norm" in n.lower()):
            assert p.dtype == torch.bfloat16, n


@pytest.mark.parametrize("arch", ("bart", "t5"))
def test_backbone_stream_is_bf16(build, one_thread, arch):
    """Plain autocast leaves the residual stream fp32 (norms run in fp32); the bf16 backbone keeps it bf16."""
    a, b = _pair(build, arch, "vl-pet-large")
    batch = make_batch(arch)
    seen = {}

    def grab(tag):
        return lambda m, args, out: seen.__setitem__(tag, out[0] if isinstance(out, tuple) else out)

    for tag, m in (("a", a), ("b", b)):
        layer = m.backbone.get_encoder().layers[0] if arch == "bart" else m.backbone.get_encoder().block[0]
        h = layer.register_forward_hook(grab(tag))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            m(**batch, labels=torch.ones(2, 3, dtype=torch.long), return_loss=False)
        h.remove()
    assert seen["a"].dtype == torch.float32
    assert seen["b"].dtype == torch.bfloat16


def test_tied_embedding_stays_tied_and_checkpoint_is_fp32(build, one_thread, tmp_path):
    from vlpet.checkpoint import ADDED_ROWS_KEY, load_tensors

    _, b = _pair(build, "bart", "vl-pet-large")
    bb = b.backbone
    assert bb.get_input_embeddings().weight is bb.get_output_embeddings().weight
    assert bb.get_input_embeddings().weight.dtype == torch.bfloat16
    b.save_pretrained(tmp_path / "ad")
    tensors = load_tensors(tmp_path / "ad" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    rows = bb.get_input_embeddings().weight[b.original_vocab_rows:]
    assert torch.equal(tensors[ADDED_ROWS_KEY], rows.float())


def test_back_to_fp32_removes_the_hooks(build, one_thread):
    """bf16 -> fp32: no norm hook is left, every tensor is fp32 again and the model computes exactly what an fp32
    model whose frozen backbone tensors were rounded to bf16 by hand computes (trainable tensors never rounded)."""
    a, b = _pair(build, "bart", "vl-pet-small")
    assert b._norm_dtype_hooks
    b.set_frozen_dtype(torch.float32)
    assert not b._norm_dtype_hooks
    assert not [n for n, m in b.named_modules() if m._forward_hooks], "a dtype hook is still registered"
    assert all(p.dtype == torch.float32 for p in b.parameters())
    with torch.no_grad():
        for p in a.backbone.parameters():
            if not p.requires_grad:
                p.copy_(p.to(torch.bfloat16).float())
        batch = make_batch("bart")
        labels = torch.ones(2, 3, dtype=torch.long)
        out = b(**batch, labels=labels, return_loss=False)
        ref = a(**batch, labels=labels, return_loss=False)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.logits, ref.logits)


def test_resolve_frozen_dtype():
    assert resolve_frozen_dtype("auto", "bf16") == torch.bfloat16
    assert resolve_frozen_dtype("auto", "fp16") == torch.float32
    assert resolve_frozen_dtype("auto", "fp32") == torch.float32
    assert resolve_frozen_dtype("fp32", "bf16") == torch.float32
    with pytest.raises(ConfigError, match="--frozen-dtype bf16 needs --precision bf16"):
        resolve_frozen_dtype("bf16", "fp32")
    with pytest.raises(ConfigError, match="--frozen-dtype 'int8'"):
        resolve_frozen_dtype("int8", "bf16")
