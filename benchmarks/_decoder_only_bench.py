"""Train-step speed and memory on the built-in decoder-only VLMs (issue 20): `train_step.py --backbones
smolvlm-2b,llava-1.5-7b` runs this instead of the VL-BART/VL-T5 matrix.

    python benchmarks/train_step.py --backbones smolvlm-2b,llava-1.5-7b --methods vl-pet-large,plain-peft-lora
    python benchmarks/train_step.py --backbones smolvlm-2b,llava-1.5-7b --device cpu --tiny   # CPU smoke test

One example = one image (SmolVLM: one 384x384 tile, 81 image tokens; LLaVA-1.5: 336x336, 576 image tokens)
+ PROMPT_LEN prompt tokens, and a TARGET_LEN-token answer; random weights and inputs. One step = forward with
the answer as labels (bf16 autocast), backward, clip_grad_norm_(5.0), AdamW step, zero_grad.

Rows:
- vlpet presets (`VLModel.build(name, preset)`): frozen backbone stored in bf16, trainable tensors fp32,
  autocast bf16 (as `vlpet train` runs bf16); the forward computes logits for the answer positions only
  (vlpet's seq2seq-style interface: `input_ids` = prompt, `labels` = answer);
- floor: the same vlpet model with no PET module (only the projector trains, so the backward still runs
  through the whole LM): what every vlpet row pays at least;
- <preset>+rc: the preset with its PET activations recomputed in the backward (vlpet.recompute, issue 19);
- <preset>+compile: the vlpet model through torch.compile (inductor, default mode; compile time not timed);
- plain-peft-lora: the plain Hugging Face model in bf16 with PEFT's `get_peft_model` LoRA (r 16, alpha 32,
  dropout 0.05, every linear layer of the language model: q, k, v, o, gate, up, down; adapters fp32, PEFT's
  default for a bf16 base), fed [prompt ; answer] with labels -100 on the prompt, as its users train it
  (logits over the whole sequence, the model's own loss); plain-peft-lora+compile: the same through
  torch.compile (for a compiled-against-compiled ratio; the issue's target is against the eager row).
"""

from __future__ import annotations

import gc

import torch

import _bench as B

BACKBONES = ("smolvlm-2b", "llava-1.5-7b")
PROMPT_LEN = 20  # text tokens after the image tokens (the paper's 20 text tokens)
TARGET_LEN = 10
BATCH = {"smolvlm-2b": 32, "llava-1.5-7b": 16}  # GPU default; --batch overrides
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "target_modules": r".*\.(language_model|text_model)\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"}

# --tiny: the same families at LM width 64, 2 layers (a CPU smoke test of the same code path)
_TINY_TEXT = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4}
_TINY = {
    "smolvlm-2b": {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "image_size": 48, "patch_size": 8},
                   "text_config": _TINY_TEXT, "image_token_id": 200},
    "llava-1.5-7b": {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 48, "patch_size": 8,
                                       "projection_dim": 32},
                     "text_config": _TINY_TEXT, "image_token_index": 200, "pad_token_id": 0},
}


def config(backbone: str, tiny: bool):
    from vlpet.backbones.loading import builtin_config

    cfg = builtin_config(backbone)
    if tiny:
        for part, values in _TINY[backbone].items():
            if isinstance(values, dict):
                for k, v in values.items():
                    setattr(getattr(cfg, part), k, v)
            else:
                setattr(cfg, part, values)
        cfg.text_config.pad_token_id = 0
    return cfg


def image_tokens(cfg) -> int:
    v = cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    if cfg.model_type == "idefics3":
        return patches // cfg.scale_factor ** 2
    return patches  # LLaVA: CLS dropped ("default" strategy)


def batch(cfg, n: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    v = cfg.vision_config
    image_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    vocab = cfg.text_config.vocab_size
    shape = (n, 1, 3, v.image_size, v.image_size) if cfg.model_type == "idefics3" else (n, 3, v.image_size, v.image_size)
    text = torch.randint(10, min(image_id, vocab) - 1, (n, PROMPT_LEN), generator=g)
    ids = torch.cat([torch.full((n, image_tokens(cfg)), image_id), text], 1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "labels": torch.randint(10, min(image_id, vocab) - 1, (n, TARGET_LEN), generator=g),
           "pixel_values": torch.randn(shape, generator=g)}
    return {k: t.to(device) for k, t in out.items()}


def build(backbone: str, cfg, method: str, device):
    """(model, trainable params, step inputs -> loss); `cfg` = config(backbone, tiny)."""
    import transformers

    from vlpet.backbones.loading import VLM_CLASSES
    from vlpet.model import VLModel

    cls = getattr(transformers, VLM_CLASSES[cfg.model_type])
    with B.fork_rng(0), torch.device(device):  # random weights drawn where they live (7B on a CPU is slow)
        hf = cls._from_config(cfg)
    preset, suffixes = B.split_suffixes(method)
    if preset == "plain-peft-lora":
        from peft import LoraConfig, get_peft_model

        hf.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = get_peft_model(hf, LoraConfig(**LORA))

        def loss(b):
            ids = torch.cat([b["input_ids"], b["labels"]], 1)
            labels = torch.cat([torch.full_like(b["input_ids"], -100), b["labels"]], 1)
            return fwd(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=b["pixel_values"],
                       labels=labels).loss
    else:
        from vlpet.backbones.vlm import lm_width
        from vlpet.presets import get_preset

        if preset == "floor":  # what every method pays at least: no PET module, the backward runs the whole LM
            method_config = B.method_config("floor", "bart-base")
        else:
            method_config = get_preset(preset, "decoder", d_model=lm_width(cfg))
        model = VLModel(hf, method_config, None, backbone_name=backbone, native_inputs=True)
        if "rc" in suffixes:  # issue 19: PET activations recomputed in the backward
            from vlpet.recompute import set_recompute

            set_recompute(model, True)
        if device.type == "cuda":
            model.set_frozen_dtype(torch.bfloat16)

        def loss(b):
            return fwd(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                       pixel_values=b["pixel_values"]).loss
    # +compile: the whole model (vlpet's, or PEFT's for a compiled-against-compiled ratio) through torch.compile,
    # inductor default mode; compile time not timed
    fwd = torch.compile(model) if "compile" in suffixes else model
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, loss


def run(args, device, data: dict, writer) -> None:
    precision = "bf16" if device.type == "cuda" else "fp32"
    for backbone in args.backbones:
        per = data["results"].setdefault(backbone, {}).setdefault(precision, {})
        cfg = config(backbone, args.tiny)
        n = args.batch or (2 if args.tiny else BATCH[backbone])
        inputs = batch(cfg, n, device, args.seed)
        for method in args.methods:
            key = f"{backbone}/{method}"
            try:
                B.reset_memory(device)
                model, params, loss_fn = build(backbone, cfg, method, device)
                kw = {"fused": True} if device.type == "cuda" else {}
                opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.01, **kw)

                def step():
                    with B.autocast(device, precision):
                        loss = loss_fn(inputs)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 5.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss.detach()

                for _ in range(args.warmup):
                    step()
                times, _ = B.time_steps(step, args.steps, device)
                s = B.summarise(times)
                trainable, total = B.param_counts(model)
                per[method] = {"batch": n, "step_ms": B.rnd(s["median"]), "samples_per_s": B.rnd(n * 1e3 / s["median"], 1),
                               "peak_mem_gb": B.rnd(B.peak_gib(device)),
                               "trainable_percent": B.rnd(100 * trainable / total, 4),
                               "attn_implementation": B.attn_impl(getattr(model, "backbone", model)),
                               "image_tokens": image_tokens(cfg), "prompt_len": PROMPT_LEN, "target_len": TARGET_LEN,
                               "loss": B.rnd(float(step()), 4)}
                B.log(f"[ok] {key}: {per[method]}")
                model = opt = params = loss_fn = None  # noqa: F841 - free the config before the next one
            except Exception as exc:  # noqa: BLE001 - a failed config is reported, the others still run
                data["errors"][key] = f"{type(exc).__name__}: {str(exc)[:500]}"
                B.log(f"[error] {key}: {exc}")
            gc.collect()
            B.reset_memory(device)
            update_ratios(data, backbone, precision, per)  # after every row: a run cut short keeps its ratios
            writer.write(data)


def update_ratios(data: dict, backbone: str, precision: str, per: dict) -> None:
    """The ratios of `backbone`'s rows so far, and the issue's targets: vl-pet-large (eager or compiled) against
    PEFT as its users run it (eager); against a compiled PEFT the ratio is reported too, with no target."""
    rat = data["ratios"].setdefault(backbone, {}).setdefault(precision, {})
    data["targets"] = [t for t in data["targets"] if (t["backbone"], t["precision"]) != (backbone, precision)]
    for ours, ref in (("vl-pet-large", "plain-peft-lora"), ("vl-pet-large+compile", "plain-peft-lora"),
                      ("vl-pet-large+compile", "plain-peft-lora+compile")):
        a, b = per.get(ours), per.get(ref)
        if not (a and b):
            continue
        for what, key, limit in (("step", "step_ms", 0.8), ("mem", "peak_mem_gb", 1.0)):
            name = f"{ours}/{ref} {what}"
            rat[name] = value = B.ratio(a[key], b[key])
            if value is not None and ref == "plain-peft-lora":
                data["targets"].append({"target": name, "backbone": backbone, "precision": precision,
                                        "value": value, "op": "<=", "limit": limit, "met": value <= limit})
