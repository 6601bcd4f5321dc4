"""Recomputing the PET activations in the backward (vlpet.recompute, issue 19): outputs and every
trainable gradient equal the stored path's, for every gate kind, the parallel form, the PHM adapter and
the decoder value adapter (VPA), on tiny BART and T5; the PET tensors are really not stored; gate
recording still works; and the same under torch.compile (aot_eager: dynamo + AOT autograd's
partitioner, which is what handles the checkpointed region; inductor's codegen is left out for time)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_batch, perturb, rel_err, shrink
from vlpet.granularity import Gate
from vlpet.methods.adapter import ParallelLinear
from vlpet.placement import GatedSublayer
from vlpet.presets import get_preset
from vlpet.recompute import recompute_enabled, set_recompute
from vlpet.train.losses import task_loss

# Each row gives: preset, changes to the encoder ModuleSpec (None: the preset as it is).
CASES = {
    "large": ("vl-pet-large", None),
    "middlex": ("vl-pet-middlex", None),
    "middley": ("vl-pet-middley", None),
    "middley-sigmoid": ("vl-pet-middley", {"gate": {"middley_sigmoid": True}}),
    "small": ("vl-pet-small", None),
    "small-masked": ("vl-pet-small", {"gate": {"masked_mean": True}}),
    # the decoder-only G_small; on an encoder-decoder (no prefix state) it is the mean of this call's tokens
    "causal-small": ("vl-pet-small", {"gate": {"kind": "causal_small"}}),
    "large-parallel": ("vl-pet-large", {"mode": "parallel"}),
    "large-scale-delta-only": ("vl-pet-large", {"scale_delta_only": True}),
    "compacter": ("compacter-g-small-lw", None),
    "vl-adapter": ("vl-adapter", None),  # no gate, VPA
}
TOL = 1e-6  # fp32 round-off: the recomputed forward is the same ops on the same inputs


def _method(case, arch):
    name, changes = CASES[case]
    m = get_preset(name, arch)
    return shrink(m, **(changes or {})) if changes else shrink(m)


def _model(build, arch, case):
    m = build(arch, _method(case, arch))
    perturb(m, scale=0.2)
    return m


def _step(model, batch, labels):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=labels, return_loss=False, task="vqa")
    loss = task_loss(out.logits, labels)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return out.logits.detach(), loss.detach(), grads


def _inputs(arch):
    torch.manual_seed(0)
    return make_batch(arch, batch=3, length=7, pads=(0, 2, 1)), torch.randint(3, 100, (3, 4))


def _assert_same(a, b):
    (la, lossa, ga), (lb, lossb, gb) = a, b
    assert rel_err(lb, la) <= TOL
    assert abs(lossb.item() - lossa.item()) <= TOL * abs(lossa.item())
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        assert rel_err(gb[n], ga[n]) <= TOL, n


@pytest.mark.parametrize("arch", ("bart", "t5"))
@pytest.mark.parametrize("case", list(CASES))
def test_recompute_equals_stored(build, one_thread, arch, case):
    model = _model(build, arch, case)
    batch, labels = _inputs(arch)
    # every gated sub-layer and every VPA is switched (the VL-PET presets carry the VPA)
    owners = [m for m in model.modules() if isinstance(m, (GatedSublayer, ParallelLinear))]
    assert any(isinstance(m, ParallelLinear) for m in owners) == (case != "vl-adapter")
    assert recompute_enabled(model) is False
    ref = _step(model, batch, labels)
    assert set_recompute(model, True) == len(owners)
    assert recompute_enabled(model) is True
    _assert_same(ref, _step(model, batch, labels))
    set_recompute(model, False)
    _assert_same(ref, _step(model, batch, labels))


@pytest.mark.parametrize("arch", ("bart", "t5"))
def test_recompute_equals_stored_bf16(build, one_thread, arch):
    """The benchmark's setting: bf16 frozen backbone under bf16 autocast (the recompute re-enters the
    forward's autocast state, so the same bf16 ops run again)."""
    model = _model(build, arch, "large")
    model.set_frozen_dtype(torch.bfloat16)
    batch, labels = _inputs(arch)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _step(model, batch, labels)

    ref = step()
    assert ref[0].dtype == torch.bfloat16
    set_recompute(model, True)
    _assert_same(ref, step())


def _gate_calls(model):
    calls = []
    for m in model.modules():
        if isinstance(m, Gate):
            m.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _saved_bytes(model, batch, labels):
    """Bytes of the distinct tensors autograd packs for the backward during the forward."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch, labels=labels, return_loss=False, task="vqa")
        loss = task_loss(out.logits, labels)
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("arch", ("bart", "t5"))
def test_recompute_really_recomputes_and_stores_less(build, one_thread, arch, monkeypatch):
    import vlpet.recompute as rc

    regions = []
    real = rc.checkpoint
    monkeypatch.setattr(rc, "checkpoint", lambda *a, **k: regions.append(1) or real(*a, **k))
    model = _model(build, arch, "large")
    batch, labels = _inputs(arch)
    calls = _gate_calls(model)
    n_gates = sum(isinstance(m, Gate) for m in model.modules())
    _step(model, batch, labels)
    assert len(calls) == n_gates  # one gate forward each
    off = _saved_bytes(model, batch, labels)
    set_recompute(model, True)
    calls.clear()
    _step(model, batch, labels)
    assert len(calls) == 2 * n_gates  # forward, then again in the backward
    n_vpa = sum(isinstance(m, ParallelLinear) for m in model.modules())
    assert len(regions) == n_gates + n_vpa and n_vpa > 0
    on = _saved_bytes(model, batch, labels)
    # at least G and Y = H + ΔH ([B, N, D] fp32) per gated sub-layer are no longer stored
    n_tokens = batch["input_ids"].shape[1] + 36  # text + 6x6 pooled visual tokens
    full = batch["input_ids"].shape[0] * n_tokens * model.backbone.config.d_model * 4
    assert off - on >= 2 * full * n_gates, (off, on, full, n_gates)
    # no autograd, no checkpoint: generation-time forwards are the plain call, and match
    calls.clear()
    regions.clear()
    with torch.no_grad():
        out = model(**batch, labels=labels, return_loss=False, task="vqa").logits
    assert len(calls) == n_gates and not regions
    set_recompute(model, False)
    with torch.no_grad():
        assert torch.equal(out, model(**batch, labels=labels, return_loss=False, task="vqa").logits)


def test_recompute_in_train_mode_keeps_the_dropout_stream(build, one_thread):
    """Backbone dropout outside the PET module draws the same masks with recompute on, and the RNG
    stream after the step is where it was without recompute (the PET module draws nothing)."""
    model = _model(build, "bart", "large").train()
    batch, labels = _inputs("bart")
    torch.manual_seed(5)
    ref = _step(model, batch, labels)
    after_ref = torch.rand(())
    set_recompute(model, True)
    torch.manual_seed(5)
    _assert_same(ref, _step(model, batch, labels))
    assert torch.equal(torch.rand(()), after_ref)


def test_recompute_replays_dropout_inside_the_pet_module(build, one_thread):
    """A PET module that draws (a dropout in the adapter) gets its RNG state saved and replayed."""
    model = _model(build, "bart", "large").train()
    for m in model.modules():
        if isinstance(m, GatedSublayer):
            d, drop = m.pet.delta, torch.nn.Dropout(0.3)
            d.add_module("drop", drop)
            d.forward = (lambda f, drop: (lambda h: drop(f(h))))(d.forward, drop)
    batch, labels = _inputs("bart")
    torch.manual_seed(7)
    ref = _step(model, batch, labels)
    set_recompute(model, True)
    assert all(m._pet_recompute_rng for m in model.modules() if isinstance(m, GatedSublayer))
    torch.manual_seed(7)
    _assert_same(ref, _step(model, batch, labels))


@pytest.mark.parametrize("arch", ("bart", "t5"))
def test_record_gates_with_recompute(build, one_thread, arch):
    model = _model(build, arch, "large")
    batch, labels = _inputs(arch)
    model.record_gates(True)
    _step(model, batch, labels)
    ref = {k: v.clone() for k, v in model.gate_values().items()}
    set_recompute(model, True)
    model.record_gates(True)
    _step(model, batch, labels)
    got = model.gate_values()
    assert ref.keys() == got.keys() and len(ref) == len(model.gated_modules())
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
        assert not got[k].requires_grad


# two of the four (arch, gate) pairs: each compile costs seconds on the 2-core machine
@pytest.mark.parametrize(("arch", "case"), (("bart", "large"), ("t5", "small")))
def test_recompute_under_compile(build, one_thread, arch, case):
    """Compiled (dynamo + AOT autograd, aot_eager backend) with recompute on equals the eager stored path."""
    import torch._dynamo

    model = _model(build, arch, case)
    batch, labels = _inputs(arch)
    ref = _step(model, batch, labels)
    set_recompute(model, True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    try:
        _assert_same(ref, _step(compiled, batch, labels))
    finally:
        torch._dynamo.reset()


def test_case_table_covers_every_gate_kind():
    from vlpet.granularity import gate_kinds

    kinds = {_method(c, "bart").modules[0].gate.kind for c in CASES}
    assert kinds == set(gate_kinds())


def test_recompute_does_not_defer_where_the_attention_does_not_keep_its_output(build, one_thread):
    """T5's attention (position bias, unfused) keeps its probabilities, not O: moving W_o into the region
    would keep O instead of H, the same size, for one more product, so it is not done."""
    model = _model(build, "t5", "large")
    set_recompute(model, True)
    gated = [m for m in model.modules() if isinstance(m, GatedSublayer)]
    assert gated and all(m.out_proj_path is None and m._deferred is None for m in gated)


@pytest.mark.parametrize("arch", ("bart",))
def test_recompute_defers_the_attention_output_projection(build, one_thread, arch):
    """With recompute on, an attention sub-layer's H = W_o · O is computed inside the recomputed region: after
    the forward, no H of a gated attention sub-layer is alive (the stored path keeps each one); the model's
    state-dict keys and values do not change, loading works, and switching off puts the projection back."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef  # a weak reference to the C++ storage

    from vlpet.placement import DeferredProjection

    model = _model(build, arch, "large")
    batch, labels = _inputs(arch)
    gated = [m for m in model.modules() if isinstance(m, GatedSublayer)]
    attn = [m for m in gated if m.out_proj_path is not None]
    assert attn and len(attn) < len(gated)  # the attention sub-layers, not the FFNs
    projections = [m.base_layer.get_submodule(m.out_proj_path) for m in attn]
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _step(model, batch, labels)

    alive = []
    for proj in projections:
        proj.register_forward_hook(lambda mod, args, out: alive.append(StorageWeakRef(out.untyped_storage())))

    def h_alive_after_forward():
        alive.clear()
        out = model(**batch, labels=labels, return_loss=False, task="vqa")
        loss = task_loss(out.logits, labels)
        gc.collect()
        n = sum(not r.expired() for r in alive[:len(projections)])
        loss.backward()
        return n

    assert h_alive_after_forward() == len(projections)  # stored path: every H kept for the backward
    set_recompute(model, True)
    assert all(isinstance(m._deferred, DeferredProjection) for m in attn)
    assert all(m._deferred is None for m in gated if m not in attn)
    assert h_alive_after_forward() == 0
    _assert_same(ref, _step(model, batch, labels))
    sd = model.state_dict()
    assert sd.keys() == keys.keys() and all(torch.equal(sd[k], keys[k]) for k in keys)
    model.load_state_dict(keys)  # strict: the keys of the plain projection load into the deferred one
    with torch.no_grad(), model.disable_adapters():
        plain_on = model(**batch, labels=labels, return_loss=False, task="vqa").logits
    set_recompute(model, False)
    assert [m.base_layer.get_submodule(m.out_proj_path) for m in attn] == projections
    with torch.no_grad(), model.disable_adapters():
        assert torch.equal(plain_on, model(**batch, labels=labels, return_loss=False, task="vqa").logits)


def test_recompute_leaves_a_trainable_output_projection_in_place(build, one_thread):
    """A projection with trainable tensors (here its bias, as BitFit trains it) is not moved: its
    parameter names, which a checkpoint stores, stay the same."""
    model = _model(build, "bart", "large")
    attn = [m for m in model.modules() if isinstance(m, GatedSublayer) and m.out_proj_path is not None]
    attn[0].base_layer.get_submodule(attn[0].out_proj_path).bias.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    set_recompute(model, True)
    assert attn[0]._deferred is None and all(m._deferred is not None for m in attn[1:])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names
