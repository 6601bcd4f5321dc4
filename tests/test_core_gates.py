"""The VL-PET module against hand computations from the spec's formulas (spec §1.1-§1.5, §2.2).

For one wrapped model per (backbone, granularity, modification) the test runs the model on a random
padded [text ; visual] batch, captures with hooks the sub-layer input X and the frozen sub-module
output H, recomputes H_new = s · G ⊙ (H + ΔH) from the module's weights with the formulas written
out below, and checks the layer's post-residual output (BART: LN(X + H_new); T5: X + H_new).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import ARCHS, PAD_ID, make_batch, perturb, rel_err, shrink, layer_norm, rms_norm

from vlpet.presets import get_preset

GRANULARITIES = ("small", "middlex", "middley", "large")
TOL = 1e-5


# -- the spec's formulas, written independently of vlpet --------------------------------------------

def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_erf(x):  # BART's FFN activation ("gelu")
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


def phm_linear(layer, x):
    """Compacter PHM: W = Σ_s A_s ⊗ B_s ([in, out]), y = x W + b."""
    A, B = layer.rule, layer.weight
    W = sum(torch.kron(A[s], B[s]) for s in range(A.shape[0]))
    return x @ W + layer.bias


def delta_h(delta, h, n_heads: int):
    """ΔH = W_up · gelu_new(concat_i(W_down^i H + b^i)) + b_up; head i = rows [i·r/N_h, (i+1)·r/N_h)."""
    if hasattr(delta.down, "rule"):  # PHM adapter
        return phm_linear(delta.up, gelu_tanh(phm_linear(delta.down, h)))
    W, b = delta.down.weight, delta.down.bias
    k = W.shape[0] // n_heads
    heads = [linear(h, W[i * k:(i + 1) * k], b[i * k:(i + 1) * k]) for i in range(n_heads)]
    return linear(gelu_tanh(torch.cat(heads, dim=-1)), delta.up.weight, delta.up.bias)


def gate_g(kind, gate, X, Y, mask=None, masked_mean=False, middley_sigmoid=False):
    if kind == "large":
        return sigmoid(linear(gelu_tanh(linear(X, gate.down.weight, gate.down.bias)), gate.up.weight, gate.up.bias))
    if kind == "middlex":
        return sigmoid(linear(X + Y, gate.proj.weight, gate.proj.bias))
    if kind == "middley":
        return 1.0 + (sigmoid(gate.z) if middley_sigmoid else gate.z)
    assert kind == "small"
    g = sigmoid(linear(torch.cat([X, Y], dim=-1), gate.proj.weight, gate.proj.bias))  # [B, N, 1]
    if masked_mean:
        m = mask.to(g.dtype).unsqueeze(-1)
        return (g * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
    return g.mean(dim=1, keepdim=True)


def h_new(pet, kind, X, H, *, n_heads, s, mask=None, masked_mean=False, middley_sigmoid=False,
          scale_delta_only=False):
    d = delta_h(pet.delta, H, n_heads)
    Y = H + (s * d if scale_delta_only else d)
    G = gate_g(kind, pet.gate, X, Y, mask, masked_mean, middley_sigmoid)
    out = G * Y
    return (out if scale_delta_only else s * out), G


EXPECTED_G_SHAPE = {"large": lambda B, N, D: (B, N, D), "middlex": lambda B, N, D: (B, N, 1),
                    "middley": lambda B, N, D: (D,), "small": lambda B, N, D: (B, 1, 1)}


# -- capture --------------------------------------------------------------------------------------

def _first(args, kwargs, name="hidden_states"):
    return args[0] if args else kwargs[name]


def capture_encoder_layer(model, arch: str, index: int):
    """Hooks on the original modules: X and H of both sub-layers, the attention sub-layer's
    post-residual output and the layer output. Returns (store, handles)."""
    store, handles = {}, []

    def pre(key):
        def hook(mod, args, kwargs):
            store[key] = _first(args, kwargs)
        return hook

    def post(key, index=None):
        def hook(mod, args, out):
            store[key] = out if index is None else out[index]
        return hook

    if arch == "bart":
        layer = model.backbone.model.encoder.layers[index]
        handles += [
            layer.register_forward_pre_hook(pre("X_attn"), with_kwargs=True),
            layer.self_attn.base_layer.register_forward_hook(post("H_attn", 0)),
            layer.self_attn_layer_norm.register_forward_hook(post("out_attn")),  # = LN(X + H_new) = X_ffn
            layer.fc2.base_layer.register_forward_hook(post("H_ffn")),
            layer.register_forward_hook(post("out")),
        ]
    else:
        block = model.backbone.encoder.block[index]
        handles += [
            block.layer[0].register_forward_pre_hook(pre("X_attn"), with_kwargs=True),
            block.layer[0].SelfAttention.base_layer.register_forward_hook(post("H_attn", 0)),
            block.layer[0].register_forward_hook(post("out_attn", 0)),
            block.layer[1].register_forward_pre_hook(pre("X_ffn"), with_kwargs=True),
            block.layer[1].DenseReluDense.base_layer.register_forward_hook(post("H_ffn")),
            block.layer[1].register_forward_hook(post("out")),
        ]
    return store, handles


def pets_of_layer(model, arch, index):
    if arch == "bart":
        layer = model.backbone.model.encoder.layers[index]
        return layer.self_attn.pet, layer.fc2.pet
    block = model.backbone.encoder.block[index]
    return block.layer[0].SelfAttention.pet, block.layer[1].DenseReluDense.pet


def tiny_method(arch, kind, modification, gate=None, **spec_changes):
    preset = f"vl-pet-{kind}" if modification == "adapter" else f"compacter-g-{kind}-lw"
    return shrink(get_preset(preset, arch), r=16, r_g=8, gate=gate, **spec_changes)


def check_encoder_layers(model, arch, kind, batch, *, n_heads, s, masked_mean=False, middley_sigmoid=False,
                         scale_delta_only=False):
    joint_mask = torch.cat([batch["attention_mask"], torch.ones(batch["input_ids"].shape[0], 36,
                                                               dtype=torch.long)], dim=1)
    n_layers = 2
    captures = [capture_encoder_layer(model, arch, i) for i in range(n_layers)]
    model.record_gates(True)
    try:
        with torch.no_grad():
            model(**batch, decoder_input_ids=torch.zeros(batch["input_ids"].shape[0], 1, dtype=torch.long))
    finally:
        for _, handles in captures:
            for h in handles:
                h.remove()
        gates = model.gate_values()
        model.record_gates(False)
    kw = dict(n_heads=n_heads, s=s, mask=joint_mask, masked_mean=masked_mean, middley_sigmoid=middley_sigmoid,
              scale_delta_only=scale_delta_only)
    for i, (st, _) in enumerate(captures):
        pet_attn, pet_ffn = pets_of_layer(model, arch, i)
        X = st["X_attn"]
        B, N, D = X.shape
        assert N == batch["input_ids"].shape[1] + 36
        with torch.no_grad():
            Y_attn, G_attn = h_new(pet_attn, kind, X, st["H_attn"], **kw)
            if arch == "bart":
                layer = model.backbone.model.encoder.layers[i]
                ln1 = layer.self_attn_layer_norm
                out_attn = layer_norm(X + Y_attn, ln1.weight, ln1.bias)
                assert rel_err(st["out_attn"], out_attn) < TOL, f"layer {i} attention sub-layer"
                X2 = st["out_attn"]  # the fc1 input: BART's FFN gate reads it
                fc1, fc2 = layer.fc1.base_layer, layer.fc2.base_layer
                H2 = linear(gelu_erf(linear(X2, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
                assert rel_err(st["H_ffn"], H2) < TOL
                Y_ffn, G_ffn = h_new(pet_ffn, kind, X2, H2, **kw)
                ln2 = layer.final_layer_norm
                out = layer_norm(X2 + Y_ffn, ln2.weight, ln2.bias)
            else:
                block = model.backbone.encoder.block[i]
                out_attn = X + Y_attn  # the gate read the un-normalised stream X
                assert rel_err(st["out_attn"], out_attn) < TOL, f"block {i} attention sub-layer"
                X2 = st["X_ffn"]
                assert rel_err(X2, st["out_attn"]) < TOL
                ln = block.layer[1].layer_norm.base_layer
                ff = block.layer[1].DenseReluDense.base_layer
                H2 = linear(torch.relu(linear(rms_norm(X2, ln.weight), ff.wi.weight)), ff.wo.weight)
                assert rel_err(st["H_ffn"], H2) < TOL
                Y_ffn, G_ffn = h_new(pet_ffn, kind, X2, H2, **kw)
                out = X2 + Y_ffn
            assert rel_err(st["out"], out) < TOL, f"layer {i} output"
        shape = EXPECTED_G_SHAPE[kind](B, N, D)
        for name, G in ((f"encoder.{i}.self_attn", G_attn), (f"encoder.{i}.ffn", G_ffn)):
            got = gates[name]
            assert tuple(got.shape) == shape, (name, tuple(got.shape), shape)
            assert rel_err(got, G.expand(shape)) < TOL, name
    return gates


# -- the tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("modification", ["adapter", "phm"])
@pytest.mark.parametrize("kind", GRANULARITIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_gated_sublayers_match_hand_computation(build, arch, kind, modification):
    method = tiny_method(arch, kind, modification)
    spec = method.modules[0]
    assert spec.gate.kind == kind and spec.placements == ("encoder.self_attn", "encoder.ffn")
    expected_s = 0.3 if arch == "t5" else 1.0  # spec §1.4 / §4.5
    assert spec.scale == expected_s
    model = build(arch, method, perturbed=True)
    if modification == "adapter":
        assert spec.n_heads == 4
    batch = make_batch(arch, pads=(0, 2))
    check_encoder_layers(model, arch, kind, batch, n_heads=spec.n_heads, s=expected_s)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("option", ["middley_sigmoid", "scale_delta_only", "masked_mean", "scale"])
def test_gate_options_match_hand_computation(build, arch, option):
    """The paper-form options of spec §9.8, each against its own formula."""
    kind = {"middley_sigmoid": "middley", "masked_mean": "small"}.get(option, "large")
    gate, changes = {}, {}
    if option in ("middley_sigmoid", "masked_mean"):
        gate[option] = True
    if option == "scale_delta_only":
        changes = dict(scale=0.3, scale_delta_only=True)
    if option == "scale":
        changes = dict(scale=0.7)  # s on BART too (the official flag, never passed by the BART scripts)
    method = tiny_method(arch, kind, "adapter", gate=gate, **changes)
    model = build(arch, method, perturbed=True)
    spec = method.modules[0]
    check_encoder_layers(model, arch, kind, make_batch(arch, pads=(1, 3)), n_heads=spec.n_heads, s=spec.scale,
                         masked_mean=option == "masked_mean", middley_sigmoid=option == "middley_sigmoid",
                         scale_delta_only=option == "scale_delta_only")


def test_scale_delta_only_differs_from_official(build):
    """The default must be the official s·G⊙(H+ΔH), not G⊙(H+sΔH)."""
    base = tiny_method("t5", "large", "adapter")
    outs = []
    for alt in (False, True):
        method = dataclasses.replace(base, modules=(dataclasses.replace(base.modules[0], scale_delta_only=alt),)
                                     + base.modules[1:])
        model = build("t5", method, perturbed=True)
        with torch.no_grad():
            enc, _ = model.encode(**make_batch("t5"))
        outs.append(enc.last_hidden_state)
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_small_gate_mean_includes_padding_unless_masked(build, arch):
    """Unmasked mean (official default): G_small changes when padding is added; masked mean: it does not,
    and then neither do the encoder states of the real tokens."""
    short = make_batch(arch, batch=1, length=5, pads=(0,), seed=3)
    padded = {k: v.clone() for k, v in short.items()}
    pad = torch.full((1, 4), PAD_ID[arch], dtype=torch.long)
    padded["input_ids"] = torch.cat([short["input_ids"], pad], dim=1)
    padded["attention_mask"] = torch.cat([short["attention_mask"], torch.zeros_like(pad)], dim=1)
    real = torch.cat([torch.arange(5), torch.arange(9, 9 + 36)])  # non-pad positions in the padded batch

    results = {}
    for masked in (False, True):
        method = tiny_method(arch, "small", "adapter", gate={"masked_mean": masked})
        model = build(arch, method, perturbed=True)
        per_batch = []
        for batch in (short, padded):
            model.record_gates(True)
            with torch.no_grad():
                enc, _ = model.encode(**batch)
            per_batch.append((model.gate_values(), enc.last_hidden_state))
            model.record_gates(False)
        results[masked] = per_batch

    (g_short, h_short), (g_pad, h_pad) = results[False]
    for name in ("encoder.0.self_attn", "encoder.0.ffn", "encoder.1.ffn"):
        assert g_short[name].shape == (1, 1, 1)
        assert abs(float(g_short[name]) - float(g_pad[name])) > 1e-5, name  # padding moved the unmasked mean
    assert not torch.allclose(h_short[0], h_pad[0, real], atol=1e-5)

    (g_short, h_short), (g_pad, h_pad) = results[True]
    for name in g_short:
        assert abs(float(g_short[name]) - float(g_pad[name])) < 1e-6, name
    assert rel_err(h_pad[0, real], h_short[0]) < 1e-5


def test_multihead_down_projection_equals_separate_heads(build):
    """N_h heads Linear(D, r/N_h), each reading the full H, concatenated in head order (spec §1.2)."""
    model = build("bart", shrink(get_preset("vl-pet-large", "bart"), r=16), perturbed=True)
    pet = model.backbone.model.encoder.layers[0].self_attn.pet
    down = pet.delta.down
    n_heads, r, D = 4, 16, 32
    assert pet.delta.n_heads == n_heads and tuple(down.weight.shape) == (r, D)
    heads = []
    k = r // n_heads
    for i in range(n_heads):
        head = torch.nn.Linear(D, k)
        with torch.no_grad():
            head.weight.copy_(down.weight[i * k:(i + 1) * k])
            head.bias.copy_(down.bias[i * k:(i + 1) * k])
        heads.append(head)
    H = torch.randn(2, 7, D)
    with torch.no_grad():
        fused = down(H)
        separate = torch.cat([head(H) for head in heads], dim=-1)
        assert rel_err(fused, separate) < TOL
        # ... and the whole adapter is W_up · gelu_new(that) + b_up
        assert rel_err(pet.delta(H), linear(gelu_tanh(separate), pet.delta.up.weight, pet.delta.up.bias)) < TOL
    # parameter count per adapter: (D·r + r) + (r·D + D)
    assert sum(p.numel() for p in pet.delta.parameters()) == (D * r + r) + (r * D + D)


# -- decoder value adapter (VPA, spec §2.2) ----------------------------------------------------------

def _cross_attention(arch, attn, x, E, V, mask, n_heads):
    """softmax(q k^T · scale + mask) V, then the output projection (BART: biases, scale d^-1/2; T5: none)."""
    if arch == "bart":
        q = linear(x, attn.q_proj.weight, attn.q_proj.bias)
        k = linear(E, attn.k_proj.weight, attn.k_proj.bias)
        o_w, o_b = attn.out_proj.weight, attn.out_proj.bias
    else:
        q, k = linear(x, attn.q.weight), linear(E, attn.k.weight)
        o_w, o_b = attn.o.weight, None
    B, T, D = q.shape
    dh = D // n_heads
    scale = dh ** -0.5 if arch == "bart" else 1.0

    def split(t):
        return t.view(B, -1, n_heads, dh).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) * scale
    scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ split(V)).transpose(1, 2).reshape(B, T, D)
    return linear(out, o_w, o_b)


@pytest.mark.parametrize("modification", ["adapter", "phm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_value_adapter_matches_hand_computation(build, arch, modification):
    """V = W_v·E + b_v (BART only) + W_up·gelu_new(W_down·E + b_down) + b_up; keys and queries unchanged;
    no gate, no scale. Checked on the value projection and on the whole cross-attention output."""
    method = tiny_method(arch, "small", modification)
    vpa_spec = method.modules[1]
    assert vpa_spec.placements == ("decoder.cross_attn.v",) and vpa_spec.gate.kind == "none"
    assert vpa_spec.scale == 1.0
    model = build(arch, method, perturbed=True)
    batch = make_batch(arch, pads=(0, 3))
    joint_mask = torch.cat([batch["attention_mask"], torch.ones(2, 36, dtype=torch.long)], dim=1)
    dec_ids = torch.tensor([[0, 5, 9], [0, 7, 4]])
    store, handles = {}, []
    if arch == "bart":
        attns = [layer.encoder_attn for layer in model.backbone.model.decoder.layers]
    else:
        attns = [block.layer[1].EncDecAttention for block in model.backbone.decoder.block]
    for i, attn in enumerate(attns):
        v = attn.v_proj if arch == "bart" else attn.v

        def pre(mod, args, kwargs, i=i):
            store[i, "x"] = _first(args, kwargs)
            store[i, "E"] = kwargs["key_value_states"]

        def post_attn(mod, args, out, i=i):
            store[i, "out"] = out[0]

        def post_v(mod, args, out, i=i):
            store[i, "V"] = out

        handles += [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.register_forward_hook(post_attn),
                    v.register_forward_hook(post_v)]
    try:
        with torch.no_grad():
            enc, _ = model.encode(**batch)
            model(**batch, decoder_input_ids=dec_ids)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for i, attn in enumerate(attns):
            E = store[i, "E"]
            assert rel_err(E, enc.last_hidden_state) < TOL  # the values read the encoder output
            v = attn.v_proj if arch == "bart" else attn.v
            base = v.base_layer
            V = linear(E, base.weight, base.bias) + delta_h(v.delta, E, n_heads=1)
            assert rel_err(store[i, "V"], V) < TOL, f"decoder layer {i} value"
            out = _cross_attention(arch, attn, store[i, "x"], E, V, joint_mask, n_heads=4)
            assert rel_err(store[i, "out"], out) < TOL, f"decoder layer {i} cross-attention"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_gate_and_no_module_in_the_decoder_sublayers(build, arch):
    model = build(arch, tiny_method(arch, "large", "adapter"))
    assert all(k.startswith("encoder.") for k in model.gated_modules())
    assert len(model.gated_modules()) == 4  # 2 layers x (self-attention, FFN)


def test_perturb_is_effective(build):
    """Guard for the tests above: after perturbation no trainable tensor is left at its init."""
    a = build("t5", tiny_method("t5", "large", "adapter"))
    b = build("t5", tiny_method("t5", "large", "adapter"))
    perturb(b)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.requires_grad:
            assert not torch.equal(p, q), n
