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
    # two-image (NLVR2) input: both images reach the encoder, and generation is the plain greedy decoding
    two = make_batch(arch, images=2, seed=22)
    ids = model.generate(**two, task="nlvr", max_new_tokens=3, min_new_tokens=3, num_beams=1, use_cache=True)
    assert torch.equal(ids, _greedy_reference(model, two, 3, task="nlvr"))
    with torch.no_grad(), model.task_context("nlvr"):
        enc, mask = model.encode(**two)
        other = dict(two, vis_feats=two["vis_feats"].clone())
        other["vis_feats"][:, 1] += 1.0  # only the second image changes
        enc2, _ = model.encode(**other)
    prompt = model.prompt.length if model.prompt is not None else 0
    assert enc.last_hidden_state.shape[1] == mask.shape[1] == prompt + two["input_ids"].shape[1] + 2 * 36
    assert not torch.allclose(enc.last_hidden_state, enc2.last_hidden_state)


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


@pytest.fixture(scope="module")
def opinionated_backbones(tmp_path_factory):
    """The tiny backbones saved with a generation_config.json full of non-neutral defaults (beam search,
    n-gram blocking, a forced first token, a length floor), as real checkpoints ship them."""
    from transformers import GenerationConfig
    from conftest import save_tiny_backbone

    root = tmp_path_factory.mktemp("opinionated")
    out = {}
    for arch in ("bart", "t5"):
        folder = save_tiny_backbone(root / arch, arch)
        GenerationConfig(num_beams=4, no_repeat_ngram_size=3, forced_bos_token_id=7, min_length=5,
                         repetition_penalty=3.0, length_penalty=2.0, early_stopping=True,
                         decoder_start_token_id=0 if arch == "t5" else 2, pad_token_id=0 if arch == "t5" else 1,
                         eos_token_id=1 if arch == "t5" else 2).save_pretrained(folder)
        out[arch] = folder
    return out


@torch.no_grad()
def _greedy_reference(model, batch, steps: int, task: str | None = None):
    """Plain argmax decoding written out step by step (no cache); EOS is masked, as the test's explicit
    min_new_tokens asks."""
    start, eos = model.backbone.config.decoder_start_token_id, model.backbone.config.eos_token_id
    dec = torch.full((batch["input_ids"].shape[0], 1), start, dtype=torch.long)
    for _ in range(steps):
        logits = model(**batch, decoder_input_ids=dec, task=task, return_loss=False).logits[:, -1]
        logits[:, eos] = float("-inf")
        dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
    return dec


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_generation_does_not_inherit_backbone_defaults(build, opinionated_backbones, arch):
    """No hidden num_beams / n-gram / length / forced-token settings (spec §3.7, §8.1.9): greedy unless asked,
    even when the backbone folder ships a generation_config.json that says otherwise."""
    from transformers import GenerationConfig

    saved = GenerationConfig.from_pretrained(opinionated_backbones[arch])
    assert saved.no_repeat_ngram_size == 3 and saved.forced_bos_token_id == 7  # the defaults are really there
    model = build(arch, "vl-pet-small", perturbed=True, folder=opinionated_backbones[arch])
    batch = make_batch(arch, seed=24)
    steps = 6
    greedy = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps)
    reference = _greedy_reference(model, batch, steps)
    assert torch.equal(greedy, reference), (greedy, reference)
    gc = model.backbone.generation_config
    assert gc.num_beams in (None, 1) and not gc.no_repeat_ngram_size and gc.forced_bos_token_id is None
    assert gc.repetition_penalty in (None, 1.0) and not gc.min_length
