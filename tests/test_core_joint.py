"""The joint [text ; visual] encoder input (spec §3.1-§3.3, §3.8) against hand computations.

v_i = LN_f(W_f·f_i + b_f) + LN_p(W_p·0 + b_p) + E_img[m] + E_tok[V − 1 − i], with the 7×7 grid
adaptive-max-pooled to 6×6 (36 tokens) and two NLVR2 images giving 72 tokens (image ids 0/1,
object ids 0..35 per image). BART text gets positions (offset 2) + layernorm_embedding, visual
tokens get neither; T5's relative position bias is zero for every pair involving a visual token.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FEAT_DIM, make_batch, rel_err, layer_norm, rms_norm

TOL = 1e-5


def pool_7x7_to_6x6(f):
    """Adaptive max pooling 7 → 6: output cell (i, j) is the max over rows i..i+1, cols j..j+1.
    f: [49, F] row-major -> [36, F] row-major."""
    g = f.reshape(7, 7, -1)
    return torch.stack([g[i:i + 2, j:j + 2].amax(dim=(0, 1)) for i in range(6) for j in range(6)])


def norm(arch, x, ln):
    return layer_norm(x, ln.weight, ln.bias) if arch == "bart" else rms_norm(x, ln.weight)


def visual_tokens_by_hand(model, arch, feats):
    """feats [B, 49, F] or [B, M, 49, F] -> [B, M·36, D]."""
    if feats.dim() == 3:
        feats = feats.unsqueeze(1)
    ve = model.visual_embedding
    W_f, b_f = ve.feat_embedding[0].weight, ve.feat_embedding[0].bias
    b_p = ve.absolute_vis_pos_embedding[0].bias  # zero boxes: W_p · 0 = 0
    E_img = ve.img_order_embedding.weight
    E_tok = model.backbone.get_input_embeddings().weight
    V = E_tok.shape[0]
    pos = norm(arch, b_p, ve.absolute_vis_pos_embedding[1])
    out = []
    for b in range(feats.shape[0]):
        tokens = []
        for m in range(feats.shape[1]):
            pooled = pool_7x7_to_6x6(feats[b, m])
            for i in range(36):
                f = norm(arch, pooled[i] @ W_f.T + b_f, ve.feat_embedding[1])
                tokens.append(f + pos + E_img[m] + E_tok[V - 1 - i])
        out.append(torch.stack(tokens))
    return torch.stack(out)


def first_layer_input(model, arch, batch):
    store = {}
    layer = model.backbone.model.encoder.layers[0] if arch == "bart" else model.backbone.encoder.block[0]

    def hook(mod, args, kwargs):
        store["x"] = args[0] if args else kwargs["hidden_states"]

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            enc, mask = model.encode(**batch)
    finally:
        h.remove()
    return store["x"], mask


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_visual_embedding_matches_formula(build, arch, images):
    model = build(arch, "vl-pet-small", perturbed=True)
    # perturbation gives b_p, both LNs and E_img non-trivial values (BART's b_p starts at 0)
    assert model.visual_embedding.absolute_vis_pos_embedding[0].bias.abs().sum() > 0
    batch = make_batch(arch, images=images, seed=5)
    with torch.no_grad():
        emb, mask = model.visual_tokens(batch["vis_feats"])
        ref = visual_tokens_by_hand(model, arch, batch["vis_feats"])
    assert emb.shape == (2, 36 * images, 32)
    assert mask.shape == (2, 36 * images) and bool((mask == 1).all())
    assert rel_err(emb, ref) < TOL


def test_nlvr2_image_and_object_ids(build):
    """Two images: tokens 0..35 carry E_img[0], 36..71 E_img[1]; object ids 0..35 in each image."""
    model = build("bart", "vl-pet-small", perturbed=True)
    # identical features in both images: the two halves differ exactly by E_img[1] − E_img[0]
    f = torch.randn(1, 1, 49, FEAT_DIM).expand(1, 2, 49, FEAT_DIM).contiguous()
    with torch.no_grad():
        emb, _ = model.visual_tokens(f)
    E_img = model.visual_embedding.img_order_embedding.weight
    assert emb.shape == (1, 72, 32)
    assert rel_err(emb[0, 36:] - emb[0, :36], (E_img[1] - E_img[0]).expand(36, 32)) < 1e-4
    # object order: with constant features every token of an image differs only by E_tok[V−1−i]
    flat = torch.ones(1, 49, FEAT_DIM)
    with torch.no_grad():
        emb, _ = model.visual_tokens(flat)
    E_tok = model.backbone.get_input_embeddings().weight
    V = E_tok.shape[0]
    diffs = emb[0] - emb[0, :1]
    rows = E_tok[V - 1 - torch.arange(36)] - E_tok[V - 1]
    assert rel_err(diffs, rows) < 1e-4


def test_pooling_is_max_over_2x2_windows(build):
    model = build("t5", "vl-pet-small")
    f = torch.zeros(1, 49, FEAT_DIM)
    f[0, 3 * 7 + 4, :] = 5.0  # grid cell (3, 4): in output cells (2..3, 3..4)
    with torch.no_grad():
        e1, _ = model.visual_tokens(f)
        e0, _ = model.visual_tokens(torch.zeros(1, 49, FEAT_DIM))
    changed = sorted(set((e1 - e0).abs().sum(-1).nonzero()[:, 1].tolist()))
    assert changed == [2 * 6 + 3, 2 * 6 + 4, 3 * 6 + 3, 3 * 6 + 4]


@pytest.mark.parametrize("preset", ["vl-pet-small", "prompt"])
def test_bart_joint_encoder_input(build, preset):
    """text: layernorm_embedding(E_tok[ids]·scale + P[2 + j]); prompts: layernorm_embedding(P_k), no
    position; visual: v_i with no position and no layernorm_embedding. Mask = [prompt 1s ; text ; 1s]."""
    model = build("bart", preset, perturbed=True)
    batch = make_batch("bart", pads=(0, 2), length=7, seed=2)
    x, mask = first_layer_input(model, "bart", batch)
    enc = model.backbone.model.encoder
    ids = batch["input_ids"]
    L = ids.shape[1]
    scale = math.sqrt(32) if model.backbone.config.scale_embedding else 1.0
    E = model.backbone.model.shared.weight
    pos = enc.embed_positions.base_layer.weight
    ln = enc.layernorm_embedding.base_layer
    with torch.no_grad():
        text = layer_norm(E[ids] * scale + pos[2:2 + L], ln.weight, ln.bias)
        vis = visual_tokens_by_hand(model, "bart", batch["vis_feats"])
        parts, masks = [text, vis], [batch["attention_mask"], torch.ones(2, 36, dtype=torch.long)]
        if preset == "prompt":
            pr = model.prompt
            lin1, lin2 = pr.mlp[0], pr.mlp[2]
            P = torch.tanh(pr.prefix_embedding.weight @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
            parts.insert(0, layer_norm(P, ln.weight, ln.bias).expand(2, -1, -1))
            masks.insert(0, torch.ones(2, P.shape[0], dtype=torch.long))
        ref = torch.cat(parts, dim=1)
    assert x.shape == ref.shape
    assert rel_err(x, ref) < TOL
    assert torch.equal(mask, torch.cat(masks, dim=1))


def test_t5_joint_encoder_input(build):
    model = build("t5", "vl-pet-large", perturbed=True)
    batch = make_batch("t5", pads=(3, 0), images=2, seed=4)
    x, mask = first_layer_input(model, "t5", batch)
    E = model.backbone.shared.weight
    with torch.no_grad():
        ref = torch.cat([E[batch["input_ids"]], visual_tokens_by_hand(model, "t5", batch["vis_feats"])], dim=1)
    assert x.shape == (2, 6 + 72, 32)
    assert rel_err(x, ref) < TOL
    assert torch.equal(mask, torch.cat([batch["attention_mask"], torch.ones(2, 72, dtype=torch.long)], dim=1))


def _t5_bucket(rel, bidirectional, num_buckets=32, max_distance=128):
    """T5's relative position bucket (Raffel et al.), written out."""
    ret = torch.zeros_like(rel)
    n = -rel
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = torch.clamp(n, min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (torch.log(n.float().clamp_min(1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return ret + torch.where(is_small, n, large)


@pytest.mark.parametrize("preset", ["vl-pet-small", "prompt"])
def test_t5_relative_bias_only_among_text_tokens(build, preset):
    model = build("t5", preset, perturbed=True)
    batch = make_batch("t5", length=9, pads=(0, 4), seed=6)
    store = {}
    enc_attn = model.backbone.encoder.block[0].layer[0].SelfAttention
    enc_attn = getattr(enc_attn, "base_layer", enc_attn)  # the original T5Attention under a VL-PET wrapper
    dec_attn = model.backbone.decoder.block[0].layer[0].SelfAttention
    hooks = [enc_attn.register_forward_hook(lambda m, a, o: store.__setitem__("enc", o[1])),
             dec_attn.register_forward_hook(lambda m, a, o: store.__setitem__("dec", o[1]))]
    try:
        with torch.no_grad():
            model(**batch, decoder_input_ids=torch.tensor([[0, 4, 5], [0, 6, 7]]))
    finally:
        for h in hooks:
            h.remove()
    bias = store["enc"][0]  # [heads, N, N]
    P = model.prompt.length if preset == "prompt" else 0
    T = P + 9  # prompt + text tokens
    N = T + 36
    assert bias.shape == (4, N, N)
    pos = torch.arange(T)
    table = enc_attn.relative_attention_bias.base_layer.weight  # under vlpet's text-only wrapper
    expected = table[_t5_bucket(pos[None, :] - pos[:, None], bidirectional=True)].permute(2, 0, 1)
    assert rel_err(bias[:, :T, :T], expected) < TOL
    assert bool((bias[:, T:, :] == 0).all()) and bool((bias[:, :, T:] == 0).all())
    # the decoder's own relative bias is untouched (causal buckets over its 3 positions)
    dpos = torch.arange(3)
    dtable = dec_attn.relative_attention_bias.weight
    dexp = dtable[_t5_bucket(dpos[None, :] - dpos[:, None], bidirectional=False)].permute(2, 0, 1)
    assert rel_err(store["dec"][0], dexp) < TOL


def test_wrappers_pass_through_outside_a_vl_call(build, backbone_dirs):
    """Run directly through HF (no VL context), the wrapped encoder equals the unwrapped one for a
    method without encoder modules: the joint-input wrappers change nothing outside `encode`."""
    from transformers import AutoModelForSeq2SeqLM

    for arch in ("bart", "t5"):
        model = build(arch, "bitfit")
        orig = AutoModelForSeq2SeqLM.from_pretrained(backbone_dirs[arch]).eval()
        ids = make_batch(arch, seed=8)["input_ids"]
        with torch.no_grad():
            a = model.backbone.get_encoder()(input_ids=ids).last_hidden_state
            b = orig.get_encoder()(input_ids=ids).last_hidden_state
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("side,out", [(7, 6), (7, 3), (7, 5), (8, 3), (6, 4)])
def test_pool_grid_equals_adaptive_max_pool(side, out):
    """The strided fast path (uniform windows) and the fallback both equal adaptive_max_pool2d, values and grads."""
    import torch.nn.functional as F

    from vlpet.backbones.visual import pool_grid

    x = torch.randn(3, side * side, 5, dtype=torch.float64, requires_grad=True)
    ref_in = x.detach().clone().requires_grad_(True)
    ref = F.adaptive_max_pool2d(ref_in.transpose(1, 2).reshape(3, 5, side, side), (out, out)).flatten(2).transpose(1, 2)
    got = pool_grid(x, out)
    assert torch.equal(got, ref)
    g = torch.randn_like(ref)
    got.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, ref_in.grad)
