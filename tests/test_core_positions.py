"""Issue 16 point 3: BART's learned positions are looked up for the text span only, as in the official
model, so a position table that holds the text but not text + visual tokens still works."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

SMALL_TABLE = 64  # < 7 text + 72 visual tokens (the two-image NLVR2 input)


@pytest.mark.parametrize("preset", ["vl-pet-large", "prompt"])
def test_small_position_table_matches_a_large_one(build, backbone_factory, preset):
    small = build("bart", preset, perturbed=True, folder=backbone_factory("bart", max_position_embeddings=SMALL_TABLE))
    large = build("bart", preset, perturbed=True)  # max_position_embeddings 128: the whole sequence fits
    # Same weights everywhere; the large table's first rows are the small table (+2: BART's offset).
    small_state = small.state_dict()
    state = {k: (v if v.shape == small_state[k].shape else v.clone()) for k, v in large.state_dict().items()}
    for k, v in small_state.items():
        if v.shape == state[k].shape:
            state[k] = v
        else:  # the encoder / decoder position tables
            state[k][: v.shape[0]] = v
    large.load_state_dict(state)

    batch = make_batch("bart", pads=(0, 2), length=7, images=2, seed=3)
    labels = torch.randint(3, 100, (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_small = small(**batch, labels=labels)
        out_large = large(**batch, labels=labels)
    n_prompt = 0 if preset != "prompt" else small.prompt.prefix_embedding.weight.shape[0]
    assert 7 + 72 + n_prompt > SMALL_TABLE + 2  # the joint sequence does not fit the small table
    assert torch.isfinite(out_small.logits).all()
    assert torch.allclose(out_small.logits, out_large.logits, atol=1e-6, rtol=0)

