"""What trains (spec §2.3, §4.6) and how much: the Params % of every preset, exact counts for the
VL-PET rows, gradients reaching exactly the trainable set, frozen tensors untouched by AdamW."""

from __future__ import annotations

import pytest
import torch

from vlpet import VLModel
from vlpet.presets import PRESETS

# -- Params % -------------------------------------------------------------------------------------

# The paper's Params % column, copied by hand from Table 2 (BART-base and T5-base; the T5 baselines are the LST
# paper's) and Table 9 (BART-base, the designs applied to Compacter and VL-Adapter), spec §6.1 / §6.4. Written
# out here, not read from vlpet.presets, so that an edited table in the code under test turns these tests red.
PAPER_PARAMS = {
    "bart": {"full": 100.0, "bitfit": 1.21, "prompt": 2.00, "compacter": 2.70, "hyperformer": 5.79, "lora": 5.93,
             "vl-adapter": 4.18, "vl-pet-small": 2.98, "vl-pet-middlex": 2.98, "vl-pet-middley": 2.98,
             "vl-pet-large": 4.16,
             "compacter-g-small-lw": 2.08, "compacter-g-middlex-lw": 2.07, "compacter-g-middley-lw": 2.07,
             "compacter-g-large-lw": 3.28, "vl-adapter-g-small-lw": 2.98, "vl-adapter-g-middlex-lw": 2.98,
             "vl-adapter-g-middley-lw": 2.98, "vl-adapter-g-large-lw": 4.16},
    "t5": {"full": 100.0, "bitfit": 0.83, "prompt": 1.26, "lora": 7.54, "vl-adapter": 7.98,
           "vl-pet-small": 4.51, "vl-pet-middlex": 4.50, "vl-pet-middley": 4.50, "vl-pet-large": 7.31},
}
PAPER_ROWS = [(f"{family}-base", preset, pct) for family, rows in PAPER_PARAMS.items() for preset, pct in rows.items()]

# Spec §2.3, computed by the spec's author from the definition trainable ÷ total model.parameters();
# written out here so that the test does not only compare the code with itself.
SPEC_COUNTS = {
    ("bart-base", "vl-pet-small"): (4_291_020, 143_845_068),
    ("bart-base", "vl-pet-middlex"): (4_281_804, None),
    ("bart-base", "vl-pet-middley"): (4_281_792, None),
    ("bart-base", "vl-pet-large"): (6_052_416, 145_606_464),
    ("bart-base", "vl-adapter"): (6_081_600, 145_606_464),
    ("t5-base", "vl-pet-small"): (10_518_168, 233_457_816),
    ("t5-base", "vl-pet-middlex"): (10_499_736, None),
    ("t5-base", "vl-pet-middley"): (10_499_712, None),
    ("t5-base", "vl-pet-large"): (17_582_208, 240_521_856),
}
# Table 9's "VL-Adapter + G + LW" rows have VL-PET's exact counts (N_h is a re-parameterisation, §6.4).
# The same structure on T5 (single-head adapter, N_h has no effect on counts, spec §1.2).
for _bb in ("bart-base", "t5-base"):
    for _g in ("small", "middlex", "middley", "large"):
        SPEC_COUNTS[_bb, f"vl-adapter-g-{_g}-lw"] = SPEC_COUNTS[_bb, f"vl-pet-{_g}"]
# Frozen part of a VL-PET model: backbone + added vocabulary rows − the (trainable) encoder LNs.
FROZEN = {"bart-base": 139_420_416 + 200 * 768 - 19_968, "t5-base": 222_903_552 + (32_200 - 32_128) * 768 - 19_200}


@pytest.fixture(scope="module")
def meta_counts():
    cache = {}

    def counts(backbone, preset):
        if (backbone, preset) not in cache:
            cache[backbone, preset] = VLModel.build(backbone, preset, meta=True).parameter_counts()
        return cache[backbone, preset]

    return counts


@pytest.mark.parametrize("backbone,preset,paper", PAPER_ROWS, ids=[f"{b}-{p}" for b, p, _ in PAPER_ROWS])
def test_params_percent_matches_paper(meta_counts, backbone, preset, paper):
    trainable, total = meta_counts(backbone, preset)
    assert round(100 * trainable / total, 2) == pytest.approx(paper, abs=1e-9), (trainable, total)


def test_presets_listing_shows_the_papers_values():
    """`vlpet presets` prints vlpet.presets' copy of the column: it must be the paper's."""
    from vlpet import presets

    assert presets.PAPER_PARAMS_PERCENT == PAPER_PARAMS


@pytest.mark.parametrize("backbone,preset", sorted(SPEC_COUNTS))
def test_exact_counts_from_spec(meta_counts, backbone, preset):
    trainable, total = meta_counts(backbone, preset)
    want_t, want_n = SPEC_COUNTS[backbone, preset]
    assert trainable == want_t
    if preset.startswith(("vl-pet-", "vl-adapter-g-")):
        assert total == FROZEN[backbone] + want_t
    if want_n is not None:
        assert total == want_n


def test_count_ingredients_from_spec():
    """bart-base 139,420,416 / t5-base 222,903,552 parameters; visual embedding 1,582,848 / 1,581,312;
    encoder LNs 19,968 / 19,200; VPA 148,320 per decoder layer (spec §2.2-§2.3)."""
    from vlpet.backbones.loading import load_backbone

    for backbone, base, vis, lns in (("bart-base", 139_420_416, 1_582_848, 19_968),
                                     ("t5-base", 222_903_552, 1_581_312, 19_200)):
        raw = load_backbone(backbone, meta=True)
        assert sum(p.numel() for p in raw.parameters()) == base
        m = VLModel.build(backbone, "vl-pet-small", meta=True)
        assert sum(p.numel() for p in m.visual_embedding.parameters()) == vis
        enc = m.backbone.get_encoder()
        ln = sum(p.numel() for n, p in enc.named_parameters() if "layer_norm" in n or "layernorm" in n)
        assert ln == lns
        vpa = [mod for n, mod in m.named_modules() if n.endswith((".v_proj.delta", ".v.delta"))]
        n_dec = 6 if backbone == "bart-base" else 12
        assert len(vpa) == n_dec
        assert all(sum(p.numel() for p in v.parameters()) == 148_320 for v in vpa)


# -- the trainable set and the gradients ------------------------------------------------------------

def _is_norm_name(name):
    return "layer_norm" in name or "layernorm" in name


def expected_trainable(name: str, preset: str, arch: str) -> bool:
    """Spec §2.3 (VL-PET, Table 9 rows) and §4.6 (baselines), by parameter name."""
    vis = name.startswith("visual_embedding.")
    enc_ln = "encoder." in name and _is_norm_name(name)  # '--unfreeze_encoder_layer_norms' pattern
    all_ln = name.startswith("backbone.") and _is_norm_name(name)
    pet = ".pet." in name or ".v_proj.delta." in name or ".v.delta." in name
    bias = name.startswith("backbone.") and name.endswith("bias") and "lora_" not in name
    if preset == "full":
        return True
    if preset.startswith(("vl-pet-", "vl-adapter-g-", "compacter-g-")):
        return vis or enc_ln or pet
    if preset == "vl-adapter":
        return vis or pet or (all_ln and arch == "bart")
    if preset == "compacter":
        return vis or all_ln or pet
    if preset == "hyperformer":
        return vis or all_ln or name.startswith(("task_embeddings.", "hypernets."))
    if preset == "prompt":
        return vis or name.startswith("prompt.")
    if preset == "lora":
        return vis or "lora_A" in name or "lora_B" in name or bias
    if preset == "bitfit":
        return vis or bias
    raise AssertionError(f"no expectation written for {preset}")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_gradients_reach_exactly_the_trainable_set(build, arch, preset):
    from conftest import make_batch, perturb

    model = build(arch, preset)
    perturb(model, scale=0.05)  # zero-inits would otherwise give exactly-zero (but present) gradients
    model.train()
    names = dict(model.named_parameters())
    expected = {n for n in names if expected_trainable(n, preset, arch)}
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert trainable == expected, (sorted(trainable - expected)[:5], sorted(expected - trainable)[:5])
    assert expected, "nothing trains"
    # the shared token embedding (and the tied LM head, the object-order rows) is frozen
    emb = model.backbone.get_input_embeddings().weight
    assert emb.requires_grad == (preset == "full")
    if preset.startswith("vl-pet-"):
        assert not any(n.startswith("backbone.") and ".decoder." in n and _is_norm_name(n) for n in trainable)

    batch = make_batch(arch, pads=(0, 2))
    labels = torch.tensor([[5, 6, 7], [8, 9, -100]])
    out = model(**batch, labels=labels, task="vqa")
    out.loss.backward()
    with_grad = {n for n, p in names.items() if p.grad is not None}
    assert with_grad <= expected, sorted(with_grad - expected)[:5]
    # hyperformer: only the task that ran gets a task-embedding gradient
    exempt = {n for n in expected if n.startswith("task_embeddings.") and not n.endswith(".vqa")}
    assert expected - exempt <= with_grad, sorted(expected - exempt - with_grad)[:5]

    before = {n: p.detach().clone() for n, p in names.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt.step()
    for n, p in names.items():
        if n in expected:
            if p.grad is not None and p.grad.abs().sum() > 0:
                assert not torch.equal(p, before[n]), f"trainable {n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    if preset != "full":
        assert torch.equal(emb, before["backbone." + _shared_name(arch)])


def _shared_name(arch):
    return "model.shared.weight" if arch == "bart" else "shared.weight"


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_trainable_norms_of_vl_pet(build, arch):
    """Exactly the encoder LNs (+ BART's layernorm_embedding / T5's encoder final norm) train."""
    model = build(arch, "vl-pet-middley")
    norms = sorted(n for n, p in model.named_parameters() if p.requires_grad and _is_norm_name(n)
                   and n.startswith("backbone."))
    if arch == "bart":
        # 2 layers x 2 LNs x (weight, bias) + layernorm_embedding (weight, bias)
        assert len(norms) == 2 * 2 * 2 + 2
        assert any("layernorm_embedding" in n for n in norms)
        assert not any("encoder_attn_layer_norm" in n for n in norms)
    else:
        # 2 blocks x 2 norms (weight only) + the final norm
        assert len(norms) == 2 * 2 + 1
        assert any("encoder.final_layer_norm" in n for n in norms)
    assert all(".encoder." in n for n in norms)
