"""Generation with every preset on BART and T5: the cache changes nothing, and the decoder VPA is
computed once per encoder output when the cross-attention K/V are cached (spec §2.2)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

from vlpet.presets import PRESETS


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_generate_same_with_and_without_cache(build, arch, preset):
    model = build(arch, preset, perturbed=True, scale=0.1)
    batch = make_batch(arch, pads=(0, 2), seed=21)
    outs = [model.generate(**batch, task="vqa", max_new_tokens=4, num_beams=2, use_cache=c) for c in (True, False)]
    assert outs[0].shape[0] == 2 and 2 <= outs[0].shape[1] <= 5
    assert torch.equal(outs[0], outs[1])
    # two-image (NLVR2) input generates too
    two = make_batch(arch, images=2, seed=22)
    ids = model.generate(**two, task="nlvr", max_new_tokens=2, num_beams=1, use_cache=True)
    assert ids.shape[0] == 2


def _vpa_deltas(model, arch):
    if arch == "bart":
        return [layer.encoder_attn.v_proj.delta for layer in model.backbone.model.decoder.layers]
    return [block.layer[1].EncDecAttention.v.delta for block in model.backbone.decoder.block]


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_vpa_runs_once_per_decoder_layer_with_cache(build, arch):
    model = build(arch, "vl-pet-large", perturbed=True)
    batch = make_batch(arch, seed=23)
    k = 5
    deltas = _vpa_deltas(model, arch)
    assert len(deltas) == 2
    for use_cache, expected in ((True, 1), (False, k)):
        counts = [0] * len(deltas)
        hooks = [d.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
                 for i, d in enumerate(deltas)]
        try:
            ids = model.generate(**batch, max_new_tokens=k, min_new_tokens=k, num_beams=1, use_cache=use_cache)
        finally:
            for h in hooks:
                h.remove()
        assert ids.shape[1] == k + 1  # start token + k generated
        assert counts == [expected] * len(deltas), (use_cache, counts)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_generation_does_not_inherit_backbone_defaults(build, arch):
    """No hidden num_beams / length settings (spec §3.7, §8.1.9): greedy unless asked."""
    model = build(arch, "vl-pet-small", perturbed=True)
    batch = make_batch(arch, seed=24)
    greedy = model.generate(**batch, max_new_tokens=3)
    explicit = model.generate(**batch, max_new_tokens=3, num_beams=1, do_sample=False)
    assert torch.equal(greedy, explicit)
    gc = model.backbone.generation_config
    assert gc.num_beams in (None, 1) and not getattr(gc, "no_repeat_ngram_size", 0)
