"""VL-PET on today's VLMs (issue 18): tiny random Florence-2, BLIP-2 Flan-T5 and InstructBLIP Flan-T5, built from
configs, saved once per session and loaded back through `VLModel.build(folder, ...)`.

Every preset: forward, backward, generate; gradients reach exactly the trainable set; frozen tensors are
bit-identical after an optimizer step; the trainable count equals a count written here from the sizes of the
issue's point 3 (BART family r = r_g = r_dec = d/8; T5 family r = r_g = d/4, r_dec = d/8; N_h = 4).
"""

from __future__ import annotations

import pytest
import torch
from conftest import import_benchmark, trainer_run

from vlpet import ConfigError, MethodConfig, VLModel, VLPetError, get_vlpet_model
from vlpet.presets import PRESETS
from vlpet.rng import fork_rng

D = 32
FLORENCE = {
    "vision_config": {"depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
                      "patch_prenorm": [False, True], "embed_dim": [16, 32], "num_heads": [2, 4], "num_groups": [2, 4],
                      "window_size": 4, "projection_dim": 32, "max_position_embeddings": 16,
                      "max_temporal_embeddings": 8, "drop_path_rate": 0.0},
    "text_config": {"model_type": "bart", "vocab_size": 128, "d_model": D, "encoder_layers": 1, "decoder_layers": 1,
                    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                    "decoder_ffn_dim": 64, "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0,
                    "eos_token_id": 2, "decoder_start_token_id": 2, "forced_eos_token_id": 2},
    "image_token_id": 100}
BLIP = {
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
    "qformer_config": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 64, "encoder_hidden_size": 32, "cross_attention_frequency": 1},
    "text_config": {"model_type": "t5", "vocab_size": 128, "d_model": D, "d_kv": 16, "d_ff": 64, "num_layers": 1,
                    "num_decoder_layers": 1, "num_heads": 2, "feed_forward_proj": "gated-gelu",
                    "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0},
    "num_query_tokens": 4, "image_token_index": 100}
KINDS = {  # name -> (config class, model class, config, image tokens for a 32 px image)
    "florence2": ("Florence2Config", "Florence2ForConditionalGeneration", FLORENCE, 17),
    "blip2": ("Blip2Config", "Blip2ForConditionalGeneration", BLIP, 4),
    "instructblip": ("InstructBlipConfig", "InstructBlipForConditionalGeneration", BLIP, 4),
}
VLMS = tuple(KINDS)


def hf_class(kind):
    import transformers

    return getattr(transformers, KINDS[kind][1])


def save_vlm(kind: str, cfg: dict, folder, seed: int):
    """The VLM class of ``kind`` built from ``cfg`` (drawn under ``seed``), saved to ``folder``."""
    import transformers

    cfg_cls, model_cls = KINDS[kind][:2]
    with fork_rng(seed):
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**cfg))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def vlm_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {kind: str(save_vlm(kind, cfg, root / kind, seed=1)) for kind, (_, _, cfg, _) in KINDS.items()}


def batch(kind, b=2, text=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img = KINDS[kind][3]
    ids = torch.cat([torch.full((b, n_img), 100), torch.randint(3, 60, (b, text), generator=g)], 1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding in the second example
    kw = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(b, 3, 32, 32, generator=g)}
    if kind == "instructblip":
        kw["qformer_input_ids"] = torch.randint(0, 60, (b, 5), generator=g)
    return kw, torch.randint(3, 60, (b, 4), generator=g)


def task_kw(method):
    return {"task": "vqa"} if method == "hyperformer" else {}


# -- the trainable count, by hand from the sizes of point 3 ------------------------------------------------
def bottleneck(d, r):
    return d * r + r + r * d + d


def phm(i, o, n=2):
    return n ** 3 + i * o // n + o


def gate(kind, d, r_g):
    return {"large": d * r_g + r_g + r_g * d + d, "middlex": d + 1, "small": 2 * d + 1, "middley": d}[kind]


def expected_trainable(kind, method):
    d, enc, dec = D, 1, 1
    bart = kind == "florence2"
    if bart:
        r = r_g = r_dec = d // 8  # 4
        # multi_modal_projector: Linear(32 -> 32, no bias) + LayerNorm(32) + row/col position tables 16 x 16 each
        projector = 32 * 32 + 2 * 32 + 16 * 16 + 16 * 16
        enc_norms = 2 * d + enc * 2 * (2 * d)  # layernorm_embedding + 2 LayerNorms per layer (weight + bias)
        all_norms = enc_norms + 2 * d + dec * 3 * (2 * d)
    else:
        r = r_g = d // 4  # 8
        r_dec = d // 8  # 4
        projector = 32 * 32 + 32  # language_projection (Q-Former width 32 -> d)
        enc_norms = enc * 2 * d + d  # 2 RMS norms per layer + the final one (weight only)
        all_norms = enc_norms + dec * 3 * d + d
    small = d // 8  # the 96-wide modules (single-head, PHM, VL-Adapter on BART, HyperFormer) at width 32
    vpa = dec * bottleneck(d, r_dec)
    if method.startswith("vl-pet-"):
        g = method[7:]
        return projector + enc_norms + enc * 2 * (bottleneck(d, r) + gate(g, d, r_g)) + vpa
    if method.startswith("vl-adapter-g-"):
        g = method[13:-3]
        return projector + enc_norms + enc * 2 * (bottleneck(d, r) + gate(g, d, r_g)) + vpa
    if method.startswith("compacter-g-"):
        g = method[12:-3]
        return projector + enc_norms + enc * 2 * (phm(d, small) + phm(small, d) + gate(g, d, small)) \
            + dec * (phm(d, small) + phm(small, d))
    n_sub = enc * 2 + dec * 3
    if method == "vl-adapter":
        return projector + (n_sub * bottleneck(d, small) + all_norms if bart else n_sub * bottleneck(d, r))
    if method == "compacter":
        return projector + all_norms + n_sub * (phm(d, small) + phm(small, d))
    if method == "prompt":
        return projector + 40 * d + (d * 800 + 800) + (800 * d + d)
    if bart:  # Florence-2's BART biases: q, k, v, out, fc1 (64), fc2, LayerNorms
        biases = enc * (4 * d + 64 + d + 2 * d) + dec * (8 * d + 64 + d + 3 * d) + 2 * d
    else:  # T5 has none: BitFit adds zeros to q, k, v, o (heads * d_kv = 32), wi_0, wi_1 (64), wo, norms, lm_head (128)
        biases = enc * (4 * 32 + 64 + 64 + d + 2 * d) + d + dec * (8 * 32 + 64 + 64 + d + 3 * d) + d + 128
    if method == "bitfit":
        return projector + biases
    if method == "lora":
        lora_r = 128 if bart else 150
        return projector + (biases if bart else 0) + (enc * 2 + dec * 4) * (lora_r * d + d * lora_r)
    if method == "hyperformer":
        task_dim, hidden, proj, tasks = 512, 128, 8, 4

        def controller(layers, blocks):
            per_block = (proj * small * d + small * d) + (proj * small + small) \
                + (proj * d * small + d * small) + (proj * d + d)
            return layers * task_dim + (2 * task_dim * hidden + hidden) + (hidden * proj + proj) + 2 * proj \
                + blocks * per_block
        return projector + all_norms + tasks * task_dim + controller(enc, 2) + controller(dec, 3)
    raise AssertionError(method)


def full_count(kind, folder):
    """Full fine-tuning on a VLM: everything but the frozen vision part (as the paper kept CLIP frozen)."""
    plain = hf_class(kind).from_pretrained(folder)
    frozen = ("model.vision_tower.",) if kind == "florence2" else ("vision_model.", "qformer.", "query_tokens")
    return sum(p.numel() for n, p in plain.named_parameters() if not n.startswith(frozen))


# -- every preset on every VLM -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", VLMS)
@pytest.mark.parametrize("method", PRESETS)
def test_preset_trains_exactly_its_set(vlm_folders, kind, method):
    model = VLModel.build(vlm_folders[kind], method)
    assert model.native_inputs and model.visual_embedding is None and model.processor is None
    trainable, _ = model.parameter_counts()
    expected = full_count(kind, vlm_folders[kind]) if method == "full" else expected_trainable(kind, method)
    assert trainable == expected

    kw, labels = batch(kind)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tuned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = model(**kw, labels=labels, **task_kw(method))
    assert out.logits.shape == (2, 4, 128) and torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad and not (method == "hyperformer" and "task_embeddings" in n and not n.endswith("vqa")):
            assert p.grad is not None, n
        elif not p.requires_grad:
            assert p.grad is None, n
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1).step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, tuned[n]) for n, p in model.named_parameters() if n in tuned)

    model.eval()
    ids = model.generate(**kw, max_new_tokens=3, **task_kw(method))
    assert ids.shape[0] == 2 and 2 <= ids.shape[1] <= 4


# -- equality with the plain Hugging Face model ----------------------------------------------------------------
def _perturb(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", VLMS)
def test_no_pet_modules_and_disabled_equal_the_plain_model(vlm_folders, kind):
    kw, labels = batch(kind)
    plain = hf_class(kind).from_pretrained(vlm_folders[kind]).eval()
    none = VLModel.build(vlm_folders[kind], MethodConfig(name="none", trainable=())).eval()
    tuned = VLModel.build(vlm_folders[kind], "vl-pet-large").eval()
    _perturb(tuned)  # adapters, gates, encoder norms and the projector all move away from the base
    with torch.no_grad():  # same autograd mode on both sides: CPU attention kernels differ with grad
        ref = plain(**kw, labels=labels).logits
        assert (none(**kw, labels=labels).logits - ref).abs().max().item() == 0
        before = tuned(**kw, labels=labels).logits
        assert (before - ref).abs().max().item() > 1e-3
        with tuned.disable_adapters():
            assert (tuned(**kw, labels=labels).logits - ref).abs().max().item() == 0
        assert torch.equal(tuned(**kw, labels=labels).logits, before)  # tuned values restored


@pytest.mark.parametrize("kind", VLMS)
def test_image_features_path_equals_pixel_values(vlm_folders, kind):
    model = VLModel.build(vlm_folders[kind], "vl-pet-large").eval()
    kw, labels = batch(kind)
    feats = model.frozen_image_features(kw["pixel_values"])
    assert not feats.requires_grad
    expected_shape = {"florence2": (2, 32, 4, 4), "blip2": (2, 4, 32), "instructblip": (2, 17, 32)}[kind]
    assert tuple(feats.shape) == expected_shape
    pixels = {k: v for k, v in kw.items() if k != "pixel_values"}
    with torch.no_grad():
        a = model(**kw, labels=labels).logits
        b = model(**pixels, image_features=feats, labels=labels).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    key = model.image_features_key()
    assert len(key) == 16 and key == model.image_features_key()
    with torch.no_grad():  # another vision tower gives another key; the language model does not matter
        first = next(p for n, p in model.backbone.named_parameters() if n.startswith(("model.vision", "vision")))
        saved = first.clone()
        first.add_(1.0)
        assert model.image_features_key() != key
        first.copy_(saved)
        for p in model.language_model.parameters():
            p.add_(1.0)
    assert model.image_features_key() == key


@pytest.mark.parametrize("kind", VLMS)
def test_save_load_round_trip(vlm_folders, kind, tmp_path):
    kw, labels = batch(kind)
    model = VLModel.build(vlm_folders[kind], "vl-pet-large").eval()
    _perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    again = VLModel.from_pretrained(tmp_path / "adapter").eval()
    onto = VLModel.from_pretrained(tmp_path / "adapter", base_model=hf_class(kind).from_pretrained(vlm_folders[kind]))
    onto.eval()
    with torch.no_grad():
        ref = model(**kw, labels=labels).logits
        assert torch.equal(again(**kw, labels=labels).logits, ref)
        assert torch.equal(onto(**kw, labels=labels).logits, ref)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ("florence2", "blip2"))
def test_value_adapter_runs_once_per_encoder_output(vlm_folders, kind):
    from vlpet.methods.adapter import ParallelLinear

    model = VLModel.build(vlm_folders[kind], "vl-pet-large").eval()
    vpas = [m for m in model.modules() if isinstance(m, ParallelLinear)]
    assert len(vpas) == 1  # one decoder layer
    calls = []
    vpas[0].delta.register_forward_hook(lambda *a: calls.append(1))
    kw, _ = batch(kind)
    ids = model.generate(**kw, max_new_tokens=5, min_new_tokens=5)
    assert ids.shape[1] == 6 and len(calls) == 1


# -- PEFT-style wrapping of a model you already hold ----------------------------------------------------------
def _plain_seq2seq(arch, folder):
    from conftest import save_tiny_backbone

    save_tiny_backbone(folder, arch)
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(folder)


@pytest.mark.parametrize("kind", ("bart", "t5") + VLMS)
def test_get_vlpet_model_wraps_in_place(kind, vlm_folders, tmp_path, capsys):
    if kind in VLMS:
        load = lambda: hf_class(kind).from_pretrained(vlm_folders[kind])  # noqa: E731
        kw, labels = batch(kind)
    else:
        _plain_seq2seq(kind, tmp_path / "base")
        from transformers import AutoModelForSeq2SeqLM

        load = lambda: AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base")  # noqa: E731
        ids = torch.randint(3, 100, (2, 7))
        kw, labels = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(3, 100, (2, 4))
    plain = load().eval()
    hf = load()
    model = get_vlpet_model(hf, "vl-pet-large").eval()
    assert model.backbone is hf and model.native_inputs
    assert any(type(m).__name__ == "GatedSublayer" for m in hf.modules())  # placed in the model itself
    assert model.visual_config is None and model.backbone.get_input_embeddings().num_embeddings == \
        plain.get_input_embeddings().num_embeddings  # no 200 added rows, no VL-BART wrappers
    model.print_trainable_parameters()
    assert "trainable%" in capsys.readouterr().out
    _perturb(model)
    with torch.no_grad():
        ref = plain(**kw, labels=labels).logits
        with model.disable_adapters():
            assert (model(**kw, labels=labels).logits - ref).abs().max().item() == 0
        tuned = model(**kw, labels=labels).logits
    model.save_pretrained(tmp_path / "adapter")
    back = VLModel.from_pretrained(tmp_path / "adapter", base_model=load()).eval()
    with torch.no_grad():
        assert torch.equal(back(**kw, labels=labels).logits, tuned)
    with pytest.raises(ConfigError, match="already"):
        get_vlpet_model(model)


def test_trainer_trains_a_wrapped_florence2(vlm_folders, tmp_path):
    """The documented transformers Trainer example (docs/vlm-backbones.md), a few steps on a tiny model."""
    model = get_vlpet_model(hf_class("florence2").from_pretrained(vlm_folders["florence2"]), "vl-pet-large")
    kw, labels = batch("florence2", b=4)
    rows = [{"input_ids": kw["input_ids"][i], "attention_mask": kw["attention_mask"][i],
             "pixel_values": kw["pixel_values"][i], "labels": labels[i]} for i in range(4)]

    losses, changed = trainer_run(model, rows, tmp_path / "run")
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert not changed  # no frozen tensor moved


# -- errors ----------------------------------------------------------------------------------------------------
def test_unsupported_vlms_are_one_line_errors(tmp_path):
    from transformers import Blip2Config, LlavaConfig

    # LLaVA itself is supported since issue 20; with a Gemma-2 LM (extra norms per sub-layer) it is not
    LlavaConfig(text_config={"model_type": "gemma2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2},
                vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
                               "patch_size": 8}).save_pretrained(tmp_path / "llava")
    cfg = dict(BLIP)
    cfg["text_config"] = {"model_type": "opt", "vocab_size": 64, "hidden_size": 32, "ffn_dim": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "word_embed_proj_dim": 32}
    Blip2Config(**cfg).save_pretrained(tmp_path / "blip2-opt")
    for name, words in (("llava", ["'llava'", "'gemma2'"]), ("blip2-opt", ["'blip-2'", "'opt'"])):
        with pytest.raises(ConfigError) as ei:
            VLModel.build(str(tmp_path / name), "vl-pet-large")
        msg = str(ei.value)
        assert "\n" not in msg and "Florence2ForConditionalGeneration" in msg and "InstructBlip" in msg
        assert all(w in msg for w in words), msg


def test_vlm_input_errors(vlm_folders):
    model = VLModel.build(vlm_folders["blip2"], "vl-pet-large")
    kw, labels = batch("blip2")
    with pytest.raises(VLPetError, match="image tokens"):
        model(input_ids=kw["input_ids"][:, 1:], pixel_values=kw["pixel_values"], labels=labels)
    with pytest.raises(VLPetError, match="vis_feats"):
        model(**kw, vis_feats=torch.zeros(2, 4, 16), labels=labels)
    iblip = VLModel.build(vlm_folders["instructblip"], "vl-pet-large")
    kw, labels = batch("instructblip")
    kw.pop("qformer_input_ids")
    with pytest.raises(VLPetError, match="qformer_input_ids"):
        iblip(**kw, labels=labels)


# -- built-in offline names at real sizes ----------------------------------------------------------------------
@pytest.mark.parametrize("name,billions,d_model,r", [("florence2-base", 0.23, 768, 96),
                                                     ("florence2-large", 0.77, 1024, 128),
                                                     ("blip2-flan-t5-xl", 3.88, 2048, 512)])
def test_builtin_vlms_build_offline_on_meta(name, billions, d_model, r):
    from vlpet.backbones.loading import load_backbone

    assert round(sum(p.numel() for p in load_backbone(name, meta=True).parameters()) / 1e9, 2) == billions
    model = VLModel.build(name, "vl-pet-large", meta=True, load_tok=False)
    spec = model.method.modules[0]
    assert model.d_model == d_model and spec.r == r and spec.gate.r_g == r and spec.n_heads == 4
    assert model.method.modules[1].r == d_model // 8


def test_benchmark_tiny_smoke(tmp_path):
    """benchmarks/train_step.py --backbones <VLM> dispatches to the VLM matrix; its CPU --tiny path runs."""
    import json

    train_step = import_benchmark("train_step")

    rc = train_step.main(["--backbones", "florence2-base", "--methods",
                          "floor,vl-pet-large,vl-pet-large-cached,plain-peft-lora", "--device", "cpu", "--tiny",
                          "--steps", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "vlm_train_step-tiny.json").read_text())
    rows = data["results"]["florence2-base"]["methods"]
    assert data["results"]["florence2-base"]["batch"] == 2 and set(rows) == {
        "floor", "vl-pet-large", "vl-pet-large-cached", "plain-peft-lora"}
    assert rows["vl-pet-large"]["trainable"] == rows["vl-pet-large-cached"]["trainable"] > 0
    assert rows["floor"]["trainable"] == 0


def _tiny_blip2_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Blip2Processor, PreTrainedTokenizerFast

    try:
        from transformers import BlipImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import BlipImageProcessor as ImageProcessor
    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)] + ["what", "is", "this", "Question:", "Answer:"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens(["<image>"], special_tokens=True)  # id 100: the tiny config's image_token_index
    return Blip2Processor(image_processor=ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                          num_query_tokens=4)


def test_model_takes_the_processor_output(vlm_folders, tmp_path):
    """`model(**processor(images=..., text=...), labels=...)` with the processor found in the model folder."""
    import shutil

    import numpy as np
    from PIL import Image

    folder = tmp_path / "blip2"
    shutil.copytree(vlm_folders["blip2"], folder)
    _tiny_blip2_processor().save_pretrained(folder)
    model = VLModel.build(str(folder), "vl-pet-large").eval()
    assert model.processor is not None and model.tokenizer is model.processor.tokenizer
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")) for _ in range(2)]
    inputs = model.processor(images=images, text=["Question: what is this Answer:", "what is"], padding=True,
                             return_tensors="pt")
    labels = torch.tensor([[5, 6, 1], [7, 1, -100]])
    plain = hf_class("blip2").from_pretrained(vlm_folders["blip2"]).eval()
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        ref = plain(**inputs, labels=labels)
        with model.disable_adapters():
            assert torch.equal(model(**inputs, labels=labels).logits, ref.logits)
    assert out.logits.shape == ref.logits.shape and torch.isfinite(out.loss)
    assert model.generate(**inputs, max_new_tokens=2).shape[0] == 2


def test_params_cli_on_florence2_large_offline(capsys):
    import json

    from vlpet.cli import main

    assert main(["params", "--backbone", "florence2-large", "--method", "vl-pet-large", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    d, layers, r = 1024, 12, 128  # BART family at width 1024: r = r_g = r_dec = d/8
    projector = 2048 * d + 2 * d + 2 * 50 * 1024  # image_projection (DaViT 2048 -> 1024), LayerNorm, 50 x 1024 row/col
    norms = 2 * d + layers * 2 * 2 * d  # layernorm_embedding + 2 LayerNorms per encoder layer
    adapters = layers * 2 * (bottleneck(d, r) + gate("large", d, r)) + layers * bottleneck(d, r)
    assert out["trainable"] == projector + norms + adapters
    assert round(out["total"] / 1e9, 2) == 0.79  # 0.77B backbone + the modules


@pytest.mark.parametrize("kind", ("florence2", "blip2", "instructblip"))
def test_gate_reads_the_spec_input(vlm_folders, kind):
    """Spec §1.5: post-LN BART (Florence-2) gates read the layer / sub-layer input; pre-LN T5 (Flan-T5) gates read
    the residual stream before the sub-layer's norm (the FFN is T5DenseGatedActDense, `DenseReluDense`)."""
    model = VLModel.build(vlm_folders[kind], "vl-pet-large").eval()
    layer = model.language_model.get_encoder().layers[0] if kind == "florence2" else \
        model.language_model.encoder.block[0]
    seen = {}

    def keep(name):
        def hook(mod, args, kwargs=None):  # returns None: the inputs are left as they are
            seen.setdefault(name, args[0] if args else kwargs["hidden_states"])
        return hook
    if kind == "florence2":
        layer.register_forward_pre_hook(keep("attn_in"), with_kwargs=True)
        layer.fc1.register_forward_pre_hook(keep("ffn_in"))
        attn_gate, ffn_gate = layer.self_attn.pet.gate, layer.fc2.pet.gate
    else:
        assert type(layer.layer[1].DenseReluDense.base_layer).__name__ == "T5DenseGatedActDense"
        layer.layer[0].layer_norm.register_forward_pre_hook(keep("attn_in"))
        layer.layer[1].layer_norm.register_forward_pre_hook(keep("ffn_in"))
        attn_gate, ffn_gate = layer.layer[0].SelfAttention.pet.gate, layer.layer[1].DenseReluDense.pet.gate
    attn_gate.register_forward_pre_hook(keep("attn_x"))
    ffn_gate.register_forward_pre_hook(keep("ffn_x"))
    kw, labels = batch(kind)
    with torch.no_grad():
        model(**kw, labels=labels)
    assert seen["attn_x"] is seen["attn_in"] and seen["ffn_x"] is seen["ffn_in"]


@pytest.mark.parametrize("kind", VLMS)
def test_generate_disabled_equals_the_vlms_own_generate(vlm_folders, kind):
    """Beam search through vlpet (encoder output handed to the language model's generate) matches the plain VLM's
    own `generate` under the same settings; the tuned model's scores differ."""
    import copy

    plain = hf_class(kind).from_pretrained(vlm_folders[kind]).eval()
    model = VLModel.build(vlm_folders[kind], "vl-pet-large").eval()
    _perturb(model)
    kw, _ = batch(kind)
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=2, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, forced_eos_token_id=2 if kind == "florence2" else 1)
    config = copy.deepcopy(model._seq2seq.generation_config)
    config.update(**settings)
    with torch.no_grad():
        ref = plain.generate(**kw, generation_config=config)
    with model.disable_adapters():
        got = model.generate(**kw, **settings)
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, ref.scores))
    tuned = model.generate(**kw, **settings)
    assert not all(torch.equal(a, b) for a, b in zip(tuned.scores, ref.scores))


@pytest.mark.parametrize("kind", ("blip2", "instructblip"))
def test_frozen_vision_part_has_no_dropout_in_training(vlm_folders, kind):
    """In train mode the frozen vision tower / Q-Former stay in eval mode (the tiny Q-Former has dropout 0.1), so a
    training forward from pixels equals one from cached features under the same RNG state."""
    model = VLModel.build(vlm_folders[kind], "vl-pet-large")
    assert not model.backbone.qformer.training
    model.train()
    assert model.training and not model.backbone.qformer.training and model.language_model.training
    kw, labels = batch(kind)
    feats = model.frozen_image_features(kw["pixel_values"])
    assert model.training and not model.backbone.vision_model.training
    pixels = {k: v for k, v in kw.items() if k != "pixel_values"}
    torch.manual_seed(3)
    a = model(**kw, labels=labels).logits
    torch.manual_seed(3)
    b = model(**pixels, image_features=feats, labels=labels).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_hub_ids_are_not_taken_for_folders():
    """"owner/name" is a Hugging Face id (offline here: a one-line load error), "./a/b" a missing folder."""
    from vlpet.backbones.loading import load_backbone

    with pytest.raises(ConfigError) as ei:
        load_backbone("florence-community/Florence-2-base")
    assert "backbone 'florence-community/Florence-2-base' is not in the Hugging Face cache" in str(ei.value)
    assert "\n" not in str(ei.value)
    with pytest.raises(ConfigError, match="folder './no/such' does not exist"):
        load_backbone("./no/such")


@pytest.mark.parametrize("kind", ("florence2", "blip2"))
def test_masked_mean_small_gate_excludes_padding(vlm_folders, kind):
    """G_small with masked_mean on the VLM path: the encoder gate's G is the mean of σ(w · [X ; Y] + b) over the
    non-padded tokens of the merged image + text input, computed here by hand from the gate's X, Y."""
    from conftest import shrink

    from vlpet.backbones.arch import arch_for
    from vlpet.presets import get_preset

    cfg = hf_class(kind).config_class.from_pretrained(vlm_folders[kind])
    method = shrink(get_preset("vl-pet-small", arch_for(cfg.model_type, cfg).family, d_model=D),
                    r=None, r_g=None, r_vpa=None, gate={"masked_mean": True})
    model = VLModel.build(vlm_folders[kind], method).eval()
    _perturb(model)
    enc = model.language_model.get_encoder()
    gate_mod = (enc.layers[0].self_attn if kind == "florence2" else enc.block[0].layer[0].SelfAttention).pet.gate
    seen = {}
    gate_mod.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=args[1], g=out))
    kw, labels = batch(kind)
    with torch.no_grad():
        model(**kw, labels=labels)
    w, b = gate_mod.proj.weight[0], gate_mod.proj.bias
    s = torch.sigmoid(seen["x"] @ w[:D] + seen["y"] @ w[D:] + b)  # [B, N]
    m = kw["attention_mask"].float()
    assert m[1].sum() < m.shape[1]  # the second example is padded
    expected = (s * m).sum(1) / m.sum(1)
    torch.testing.assert_close(seen["g"].reshape(-1), expected)
    assert not torch.allclose(expected[1], s[1].mean())  # the padding would change it


def test_images_without_input_ids_fail_before_the_vision_tower(vlm_folders):
    model = VLModel.build(vlm_folders["florence2"], "vl-pet-large")
    ran = []
    model.backbone.model.vision_tower.register_forward_hook(lambda *a: ran.append(1))
    kw, labels = batch("florence2")
    embeds = model.backbone.get_input_embeddings()(kw["input_ids"])
    with pytest.raises(VLPetError, match="images need input_ids"):
        model(inputs_embeds=embeds, attention_mask=kw["attention_mask"], pixel_values=kw["pixel_values"],
              labels=labels)
    assert not ran


def test_load_processor_none_only_for_missing_files(vlm_folders, monkeypatch, caplog):
    """A folder without processor files gives None and the reason in the log; any other failure is raised."""
    import logging

    import transformers

    from vlpet.backbones.loading import load_processor

    with caplog.at_level(logging.INFO, logger="vlpet.backbones.loading"):
        assert load_processor(vlm_folders["florence2"]) is None
    assert "no processor for" in caplog.text and "image processor" in caplog.text

    def broken(*a, **k):
        raise RuntimeError("a bug in the processor code")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        load_processor(vlm_folders["florence2"])
