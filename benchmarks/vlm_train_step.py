"""Train-step speed and memory of VL-PET on today's VLMs vs PEFT's LoRA (issue 18, "Speed and memory").

    python benchmarks/train_step.py --backbones florence2-large,blip2-flan-t5-xl        # dispatches here
    python benchmarks/vlm_train_step.py --device cpu --tiny                              # CPU smoke test

Built-in names with random weights at real size, bf16 weights of the frozen part (vlpet: trainable tensors
fp32, bf16 autocast; plain rows: the whole HF model loaded in bf16 under bf16 autocast, as its users run it),
one image per example at the model's own size (Florence-2 768 px -> 577 image tokens; BLIP-2 224 px ->
32 query tokens), 20 text tokens after the image tokens, 10 target tokens. One step = forward, the model's
token-mean cross-entropy (labels), backward, clip_grad_norm_(5.0), AdamW, zero_grad. The batch is the
largest of --batches (default 64, 32, 16) at which every method of a backbone fits; the JSON says which.

Methods:
  floor                the frozen plain bf16 model: forward + backward down to the language encoder's input
                       embeddings (no parameter gradient, no optimizer): what every method pays at least
  vl-pet-large         vlpet, images through the vision tower every step
  vl-pet-large-cached  vlpet, features from `frozen_image_features` computed once (the per-image cache)
  lora                 vlpet's LoRA preset (the paper's LoRA row: q, v of every attention + biases)
  plain-peft-lora      PEFT LoRA r 128 / alpha 32 on q and v of the language model's encoder self-attention
                       and decoder self- and cross-attention, on the plain HF model, vision tower every step
  full                 vlpet full fine-tuning of the language model + projector (the vision part stays frozen)
  <method>+rc          a vlpet method with its PET activations recomputed in the backward (vlpet.recompute)
  <method>+compile     a vlpet method run through torch.compile (inductor, default mode; compile time not timed)
  <method>+blocks      vlpet.compile.compile_blocks: each repeated block (layer, vision stage) compiled in place
                       (regional compilation); also plain-peft-lora+blocks, the same on PEFT's model
  <method>+cg          with +compile / +blocks: mode reduce-overhead (CUDA graphs)
Figures: median step time over --steps after --warmup (synchronised wall clock), peak =
torch.cuda.max_memory_allocated since a reset before the method's model is built (GiB), first_step_s = the
first (warm-up) step, which includes any compilation (dynamo is reset before each row, so a row does not reuse
an earlier row's graphs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from _bench import git_commit, peak_gib, split_suffixes, sync  # noqa: E402

VLM_BACKBONES = ("florence2-base", "florence2-large", "blip2-flan-t5-xl")
METHODS = ("floor", "vl-pet-large", "vl-pet-large-cached", "lora", "plain-peft-lora", "full")
IMAGE_SIZE = {"florence2": 768, "blip2": 224, "instructblip": 224}
TEXT_LEN, TARGET_LEN, CLIP = 20, 10, 5.0


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -- models -----------------------------------------------------------------------------------------------
def tiny_folder(kind: str) -> str:
    """A tiny random model of the same class, saved to a folder (the --tiny smoke path)."""
    import transformers

    florence = {"vision_config": {"depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2],
                                  "patch_padding": [3, 1], "patch_prenorm": [False, True], "embed_dim": [16, 32],
                                  "num_heads": [2, 4], "num_groups": [2, 4], "window_size": 4, "projection_dim": 32,
                                  "max_position_embeddings": 16, "max_temporal_embeddings": 8, "drop_path_rate": 0.0},
                "text_config": {"model_type": "bart", "vocab_size": 128, "d_model": 32, "encoder_layers": 1,
                                "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                                "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
                                "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2},
                "image_token_id": 100}
    blip = {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
            "qformer_config": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 64, "encoder_hidden_size": 32},
            "text_config": {"model_type": "t5", "vocab_size": 128, "d_model": 32, "d_kv": 16, "d_ff": 64,
                            "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "feed_forward_proj": "gated-gelu",
                            "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
                            "decoder_start_token_id": 0},
            "num_query_tokens": 4, "image_token_index": 100}
    if kind == "florence2":
        model = transformers.Florence2ForConditionalGeneration(transformers.Florence2Config(**florence))
    else:
        model = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**blip))
    folder = tempfile.mkdtemp(prefix=f"vlpet-tiny-{kind}-")
    model.save_pretrained(folder)
    return folder


def image_tokens(config, kind: str, size: int) -> int:
    return _florence_tokens(config, size) if kind == "florence2" else config.num_query_tokens


def _florence_tokens(config, size: int) -> int:
    side = size
    for stride in config.vision_config.patch_stride:
        side = -(-side // stride)
    return side * side + 1  # the spatial tokens + one temporal token (768 px: 24 x 24 + 1 = 577)


def make_batch(config, kind: str, b: int, size: int, device, vocab: int):
    from vlpet.backbones.vlm import image_token_id

    g = torch.Generator().manual_seed(0)
    n_img = image_tokens(config, kind, size)
    text = torch.randint(4, min(vocab, 30000) - 1, (b, TEXT_LEN), generator=g)
    text[text == image_token_id(config)] = 5
    ids = torch.cat([torch.full((b, n_img), image_token_id(config)), text], 1)
    labels = torch.randint(4, min(vocab, 30000) - 1, (b, TARGET_LEN), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(b, 3, size, size, generator=g).to(device)}, labels.to(device)


def build_vlpet(name: str, method: str, device, dtype):
    from vlpet import VLModel

    with torch.device(device):  # random init on the GPU: seconds instead of minutes for 3.9B parameters on a CPU
        model = VLModel.build(name, method, load_tok=False)
    if dtype != torch.float32:
        model.set_frozen_dtype(dtype)
    return model.to(device).train()


def build_plain(name: str, device, dtype):
    from vlpet.backbones.loading import load_backbone

    with torch.device(device):  # random init on the GPU (see build_vlpet)
        model = load_backbone(name, dtype=dtype)
    return model.to(device=device, dtype=dtype).train()


def peft_lora(model, kind: str):
    from peft import LoraConfig, get_peft_model

    if kind == "florence2":
        target = (r"^model\.language_model\.(encoder\.layers\.\d+\.self_attn|decoder\.layers\.\d+\.(self_attn|"
                  r"encoder_attn))\.(q_proj|v_proj)$")
    else:
        target = (r"^language_model\.(encoder\.block\.\d+\.layer\.0\.SelfAttention|decoder\.block\.\d+\.layer\."
                  r"(0\.SelfAttention|1\.EncDecAttention))\.(q|v)$")
    return get_peft_model(model, LoraConfig(r=128, lora_alpha=32, lora_dropout=0.0, target_modules=target))


# -- one step ---------------------------------------------------------------------------------------------
def autocast(device, dtype):
    if dtype == torch.float32:
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_step(method, kind, name, device, dtype, inputs, labels):
    """Returns (step function, trainable count, total count); builds the model for `method`."""
    from vlpet.backbones import vlm
    from vlpet.compile import compile_blocks

    if method == "floor":
        model = build_plain(name, device, dtype)
        model.requires_grad_(False)
        path = vlm.seq2seq_module(model, kind)

        def step():
            with autocast(device, dtype):
                with torch.no_grad():
                    feats = vlm.frozen_features(model, kind, inputs["pixel_values"].to(dtype))
                    emb = vlm.merge_image_tokens(model.config, inputs["input_ids"],
                                                 model.get_input_embeddings()(inputs["input_ids"]),
                                                 vlm.project(model, kind, feats))
                emb = emb.detach().requires_grad_(True)
                out = path(inputs_embeds=emb, attention_mask=inputs["attention_mask"], labels=labels, use_cache=False)
            out.loss.backward()
        return step, 0, sum(p.numel() for p in model.parameters())

    method, suffixes = split_suffixes(method)
    mode = "reduce-overhead" if "cg" in suffixes else None
    if method == "plain-peft-lora":
        model = peft_lora(build_plain(name, device, dtype), kind)
        if "blocks" in suffixes:
            compile_blocks(model, mode=mode)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        pix = inputs["pixel_values"].to(dtype)

        def step():
            if mode:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, dtype):
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pix,
                            labels=labels, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())

    recompute = "rc" in suffixes  # issue 19: PET activations recomputed in the backward
    cached = method.endswith("-cached")
    model = build_vlpet(name, method.removesuffix("-cached"), device, dtype)
    if recompute:
        from vlpet.recompute import set_recompute

        set_recompute(model, True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if cached:  # computed once, outside the timed steps: the per-image cache
        with autocast(device, dtype):
            # a copy: with +cg the features are a CUDA-graph output, overwritten by the graph's next replay
            kw["image_features"] = model.frozen_image_features(inputs["pixel_values"].to(dtype)).clone()
    else:
        kw["pixel_values"] = inputs["pixel_values"].to(dtype)
    # after the cache is filled: a cache is built once, eagerly (and CUDA graphs of blocks that share one graph
    # cannot run the frozen tower without gradients, see vlpet.train.loop's --compile-scope check)
    run_model = torch.compile(model, mode=mode) if "compile" in suffixes else model  # inductor
    if "blocks" in suffixes:
        compile_blocks(model, mode=mode)

    def step():
        if mode:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, dtype):
            out = run_model(**kw, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    t, n = model.parameter_counts()
    return step, t, n


SUFFIXES = ("rc", "compile", "blocks", "cg")


def measure(method, kind, name, device, dtype, b, size, steps, warmup, profile=0):
    from vlpet.backbones.loading import builtin_config, BUILTIN_BACKBONES

    import torch._dynamo

    torch._dynamo.reset()  # each row compiles its own graphs (first_step_s counts them; cache entries do not pile up)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if name in BUILTIN_BACKBONES:
        config = builtin_config(name)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name)
    from vlpet.backbones.vlm import text_config

    inputs, labels = make_batch(config, kind, b, size, device, text_config(config).vocab_size)
    step, trainable, total = make_step(method, kind, name, device, dtype, inputs, labels)
    warm = [timed(step, device) for _ in range(warmup)]  # the first includes any compilation
    times = [timed(step, device) for _ in range(steps)]
    first = warm[0] if warm else None
    peak = peak_gib(device)
    top = profile_step(step, device, profile) if profile else None
    row = {"batch": b, "median_ms": round(1000 * statistics.median(times), 2),
            "samples_per_s": round(b / statistics.median(times), 2), "peak_gib": None if peak is None else round(peak, 2),
            "trainable": trainable, "total": total, "percent": round(100 * trainable / total, 4),
            "first_step_s": None if first is None else round(first, 1)}
    return row | ({"top_ops": top} if top else {})


def timed(step, device) -> float:
    """Seconds of one step, synchronised at both ends."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def profile_step(step, device, n: int) -> list:
    """One more step under torch.profiler: the n ops with the most device time (self), in ms, also logged."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    top = [[e.key[:90], round(getattr(e, key) / 1000, 2), e.count] for e in events]
    log("\n".join(f"    {ms:9.2f} ms  x{count:<5} {name}" for name, ms, count in top))
    return top


def run(args, save=None) -> dict:
    """The matrix; `save(data)` runs after every row (a run cut short keeps what it measured)."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    data = {"benchmark": "vlm_train_step", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "torch": torch.__version__, "dtype": str(dtype), "text_len": TEXT_LEN, "target_len": TARGET_LEN,
            "tiny": args.tiny, "commit": git_commit(),  # VLPET_COMMIT first (the GPU copy has stale git metadata)
            "results": {}, "ratios": {}, "errors": {}}
    from vlpet.backbones.loading import load_backbone

    for name in args.backbones:
        from vlpet.backbones.arch import arch_for

        source = name
        meta_model = load_backbone(name, meta=True)
        kind = arch_for(meta_model.config.model_type, meta_model.config).image_path
        del meta_model
        if args.tiny:
            source = tiny_folder(kind)
        size = 32 if args.tiny else IMAGE_SIZE[kind]
        chosen = None
        for b in args.batches:
            rows, failed = {}, None
            for method in args.methods:
                log(f"{name} {method} batch {b} ...")
                try:
                    rows[method] = measure(method, kind, source, device, dtype, b, size, args.steps, args.warmup,
                                            args.profile)
                    log(f"  {rows[method]}")
                    data["results"][name] = {"batch": b, "image_size": size, "methods": rows, "partial": True}
                    if save:
                        save(data)
                except torch.cuda.OutOfMemoryError:
                    failed = method
                except Exception as exc:  # noqa: BLE001 - recorded, the matrix goes on
                    data["errors"][f"{name}/{method}/{b}"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                    log(traceback.format_exc())
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if failed:
                    log(f"  out of memory at batch {b} ({method}): trying a smaller batch")
                    break
            if not failed:
                chosen = b
                break
        data["results"][name] = {"batch": chosen, "image_size": size, "methods": rows if chosen else {}}
        if args.tiny:
            import shutil

            shutil.rmtree(source, ignore_errors=True)  # the temporary tiny model folder
        if chosen:
            base = rows.get("plain-peft-lora", {})
            ratios = {}
            for method, row in rows.items():
                for key, what in (("median_ms", "time"), ("peak_gib", "memory")):
                    if method != "plain-peft-lora" and row.get(key) and base.get(key):
                        ratios[f"{method} / plain-peft-lora {what}"] = round(row[key] / base[key], 3)
            ratios["targets"] = "vl-pet-large <= 0.85x time at <= 1.0x memory; vl-pet-large-cached <= 0.5x time"
            data["ratios"][name] = ratios
    return data


def markdown(data) -> str:
    lines = ["| backbone | batch | method | step ms | samples/s | peak GiB | trainable % | first step s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in data["results"].items():
        for method, row in res["methods"].items():
            lines.append(f"| {name} | {res['batch']} | {method} | {row['median_ms']} | {row['samples_per_s']} | "
                         f"{row['peak_gib'] if row['peak_gib'] is not None else '-'} | {row['percent']} | {row.get('first_step_s')} |")
    for name, rat in data["ratios"].items():
        lines.append(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in rat.items() if k != "targets"))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", type=lambda s: [x for x in s.split(",") if x], default=["florence2-large",
                                                                                         "blip2-flan-t5-xl"])
    p.add_argument("--methods", type=lambda s: [x for x in s.split(",") if x], default=list(METHODS))
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help="batch sizes to try, largest first (default 64,32,16; --tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; --tiny 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, profile one more step and log / record the N ops with the most "
                        "device time (default 0: no profile)")
    p.add_argument("--tiny", action="store_true", help="tiny random models of the same classes (CPU smoke test)")
    p.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results unless --tiny, and $OUT when set)")
    a = p.parse_args(argv)
    a.batches = a.batches or ([2] if a.tiny else [64, 32, 16])
    a.steps = a.steps or (2 if a.tiny else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    vlpet_methods = {m for m in METHODS if m not in ("floor", "plain-peft-lora")}

    def known(m):
        base, suffixes = split_suffixes(m)
        if "cg" in suffixes and not suffixes & {"compile", "blocks"}:
            return False
        if base == "plain-peft-lora":
            return suffixes <= {"blocks", "cg"}
        return m in METHODS or (base in vlpet_methods and suffixes <= set(SUFFIXES))
    unknown = sorted(m for m in a.methods if not known(m))
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; allowed: {', '.join(METHODS)}, a vlpet method with "
                f"'+rc', '+compile' and/or '+blocks', plain-peft-lora+blocks; '+cg' with '+compile' or '+blocks'")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    name = "vlm_train_step" + ("-tiny" if args.tiny else "") + ".json"
    # a --tiny smoke run writes to benchmarks/results only when asked (--out), as train_step.py does
    folders = [Path(args.out)] if args.out else ([] if args.tiny else [HERE / "results"]) + (
        [Path(os.environ["OUT"])] if os.environ.get("OUT") else [])

    def save(data):
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(data, indent=1) + "\n")
    data = run(args, save)
    save(data)
    print(markdown(data))
    return 0 if not data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
