"""Train-step speed and memory of vlpet's methods on VL-BART-base / VL-T5-base (issue 8).

    python benchmarks/train_step.py                       # the whole matrix on the GPU
    python benchmarks/train_step.py --baselines           # + plain transformers reference rows
    python benchmarks/train_step.py --device cpu --tiny   # CPU smoke test of the same code path
    python benchmarks/train_step.py --backbones florence2-large,blip2-flan-t5-xl   # VLMs: vlm_train_step.py
    python benchmarks/train_step.py --backbones smolvlm-2b,llava-1.5-7b   # decoder-only VLMs (issue 20):
        # vl-pet-large against plain-peft-lora, bf16 (benchmarks/_decoder_only_bench.py)

One step = forward (autocast for bf16), cross-entropy over the 10 target tokens
(vlpet.train.losses.task_loss), backward, clip_grad_norm_(5.0) over the trainable tensors, AdamW step
(vlpet.train.optim.build_optimizer: fused on CUDA), zero_grad(set_to_none=True) -- the step of
vlpet.train.loop without its per-step `.item()` sync. Figures: median over --steps steps after
--warmup (CUDA events), samples/s = batch / median, peak = torch.cuda.max_memory_allocated (GiB,
2^30 bytes) since a reset just before the config (model weights, inputs, grads, optimizer state and
activations all count).

The model is built once per (backbone, method) and reused across precisions (fresh optimizer and
peak-memory reset per precision). Results: JSON in benchmarks/results/ and --out / $OUT, rewritten after
every config; a Markdown table printed last on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402
import _decoder_only_bench as DO  # noqa: E402

DEFAULT_METHODS = ("floor", "full", "lora", "vl-adapter", "vl-pet-small", "vl-pet-middlex", "vl-pet-middley",
                   "vl-pet-large")
VL_PET = ("vl-pet-small", "vl-pet-middlex", "vl-pet-middley", "vl-pet-large")
PLAIN = ("plain-frozen", "plain-full", "plain-peft-lora")
CLIP = 5.0
RC = "+rc"  # method suffix: the same preset with the PET activations recomputed in the backward (issue 19)


def split_rc(method: str) -> tuple[str, bool]:
    """("vl-pet-large+rc") -> ("vl-pet-large", True)."""
    return (method[: -len(RC)], True) if method.endswith(RC) else (method, False)


def expand_recompute(methods: list[str], mode: str) -> list[str]:
    """--recompute off: as given; on: every PET method gets +rc; both: each PET method, then its +rc twin."""
    out = []
    for m in methods:
        base, rc = split_rc(m)
        pet = not rc and base not in PLAIN and base not in ("floor", "full", "lora")
        if mode == "on" and pet:
            out.append(base + RC)
        else:
            out.append(m)
            if mode == "both" and pet:
                out.append(base + RC)
    return list(dict.fromkeys(out))


# -- plain transformers reference rows (no vlpet module in the model) -----------------------------------
class PlainVL(nn.Module):
    """A stock HF seq2seq model fed [text embeddings ; Linear(2048 -> d)(6x6-pooled features)] as
    inputs_embeds: the issue's "plain transformers" rows."""

    def __init__(self, hf: nn.Module, d_model: int, feat_dim: int = B.FEAT_DIM):
        super().__init__()
        self.hf = hf
        self.proj = nn.Linear(feat_dim, d_model)

    def forward(self, input_ids, attention_mask, vis_feats, labels=None, decoder_input_ids=None):
        n, v, f = vis_feats.shape
        side = int(v ** 0.5)
        grid = vis_feats.transpose(1, 2).reshape(n, f, side, side)
        feats = torch.nn.functional.adaptive_max_pool2d(grid, (6, 6)).flatten(2).transpose(1, 2)
        text = self.hf.get_input_embeddings()(input_ids)
        vis = self.proj(feats).to(text.dtype)
        embeds = torch.cat([text, vis], dim=1)
        mask = torch.cat([attention_mask, torch.ones(n, vis.shape[1], dtype=attention_mask.dtype,
                                                     device=attention_mask.device)], dim=1)
        return self.hf(inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_input_ids=decoder_input_ids,
                       return_dict=True)


def build_plain(backbone: str, method: str, tiny: bool, seed: int = 0):
    from transformers import AutoModelForSeq2SeqLM

    cfg = B.hf_config(backbone, tiny)
    with B.fork_rng(seed):
        hf = AutoModelForSeq2SeqLM.from_config(cfg)
        start = hf  # keeps prepare_decoder_input_ids_from_labels reachable before PEFT wraps it
        if method == "plain-peft-lora":
            from peft import LoraConfig, get_peft_model

            t5 = B.arch_family(backbone) == "t5"
            # The paper's LoRA row: r=128 (T5: 150, as vlpet's preset), alpha 32, dropout 0.1, q and v of
            # every attention (self and cross), all biases trainable.
            lcfg = LoraConfig(r=150 if t5 else 128, lora_alpha=32, lora_dropout=0.1,
                              target_modules=["q", "v"] if t5 else ["q_proj", "v_proj"], bias="all",
                              task_type="SEQ_2_SEQ_LM")
            hf = get_peft_model(hf, lcfg)
        model = PlainVL(hf, cfg.d_model)
    if method == "plain-frozen":
        model.hf.requires_grad_(False)
    elif method == "plain-full":
        model.requires_grad_(True)
    model.proj.requires_grad_(True)  # PEFT froze the rest itself
    model.prepare_decoder_input_ids_from_labels = start.prepare_decoder_input_ids_from_labels
    return model


def plain_optimizer(model: nn.Module, lr: float, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, **kwargs)


# -- the step ---------------------------------------------------------------------------------------
def make_step(model, opt, batch: dict, device, precision: str, loss_path: str, plain: bool, compiled: bool,
              phases: bool = False, compile_mode: str = "default", sdpa_backend: str = "default"):
    """Returns step() -> detached loss. loss_path "labels": labels= go into the HF forward, as
    vlpet.train.loop passes them (so HF also computes its own loss; vlpet rows then take task_loss of the
    logits, plain rows HF's out.loss, as their users do); "decoder-ids": decoder_input_ids from the
    labels go in, and the one loss is task_loss of the logits."""
    from vlpet.train.losses import task_loss

    mode = None if compile_mode == "default" else compile_mode
    fwd = torch.compile(model, mode=mode) if compiled else model
    # with --compile the loss is compiled too (as `vlpet train --compile` does): inductor fuses the
    # vocabulary-wide log-softmax with the bf16 -> fp32 cast
    loss_fn = torch.compile(task_loss, mode=mode) if compiled else task_loss
    graphs = compiled and compile_mode == "reduce-overhead"
    if sdpa_backend == "auto":  # vlpet rows: the trainer's order; plain rows: PyTorch's, as stock users get
        sdpa_backend = "default" if plain else "efficient-first"
    if sdpa_backend in ("default", "efficient-first"):
        from vlpet.backbones.attention import preferred_attention

        attention = lambda: preferred_attention(sdpa_backend)  # noqa: E731
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[sdpa_backend]
        attention = lambda: sdpa_kernel(backend)  # noqa: E731
    params = [p for g in opt.param_groups for p in g["params"]]
    ids, mask, feats, labels = batch["input_ids"], batch["attention_mask"], batch["vis_feats"], batch["labels"]
    if plain:
        dec = model.prepare_decoder_input_ids_from_labels(labels=labels)
    else:
        dec = model.backbone.prepare_decoder_input_ids_from_labels(labels=labels)
    kw = {"labels": labels} if loss_path == "labels" else {"decoder_input_ids": dec}
    if not plain:
        kw["task"] = "vqa"
    rf = torch.profiler.record_function if phases else (lambda name: _null())

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with attention(), B.autocast(device, precision):
            with rf("bench/forward"):
                out = fwd(ids, mask, vis_feats=feats, **kw)
            with rf("bench/loss"):
                loss = out.loss if (plain and loss_path == "labels") else loss_fn(out.logits, labels)
        with rf("bench/backward"), attention():
            loss.backward()
        with rf("bench/clip"):
            torch.nn.utils.clip_grad_norm_(params, CLIP)
        with rf("bench/optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def explain_graphs(model, batch, device, precision: str, key: str) -> None:
    """torch._dynamo.explain of the forward: how many graphs, and why it breaks (printed to stderr)."""
    dec = model.backbone.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    torch._dynamo.reset()
    with B.autocast(device, precision):
        ex = torch._dynamo.explain(model)(batch["input_ids"], batch["attention_mask"], vis_feats=batch["vis_feats"],
                                          decoder_input_ids=dec, task="vqa")
    B.log(f"[explain] {key}: {ex.graph_count} graphs, {ex.graph_break_count} breaks")
    for r in ex.break_reasons[:6]:
        where = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in r.user_stack[-3:])
        B.log(f"[explain]   {str(r.reason)[:300]} @ {where}")
    torch._dynamo.reset()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build(backbone: str, method: str, args, device):
    """(model, optimizer factory, is_plain)."""
    from vlpet.train.optim import build_optimizer

    plain = method in PLAIN
    method, rc = split_rc(method)
    if plain:
        model = build_plain(backbone, method, args.tiny)
        lr = 1e-4 if method == "plain-full" else 1e-3
        make_opt = lambda: plain_optimizer(model, lr, device)  # noqa: E731
    else:
        model = B.build_vl(backbone, method, args.tiny)
        if rc:
            from vlpet.recompute import set_recompute

            if not set_recompute(model, True):
                raise ValueError(f"--methods {method}{RC}: {method} has no PET module to recompute")
        lr = B.learning_rate(method, backbone)
        make_opt = lambda: build_optimizer(model, lr)  # noqa: E731  (fused when the params are on CUDA)
    model.to(device).train()
    return model, make_opt, plain


def apply_frozen_dtype(model, plain: bool, choice: str, precision: str) -> str:
    """vlpet rows: store the frozen backbone as `vlpet train --frozen-dtype` would (auto: bf16 for bf16).
    Plain transformers rows keep fp32 weights under autocast, as their users run them."""
    if plain:
        return "fp32"
    from vlpet.frozen_precision import resolve_frozen_dtype

    dtype = resolve_frozen_dtype(choice, precision)
    model.set_frozen_dtype(dtype)  # also back to fp32 after a bf16 config (the values stay bf16-rounded)
    return str(dtype).replace("torch.", "")


def vocab_of(model, plain: bool) -> int:
    hf = model.hf if plain else model.backbone
    return hf.get_input_embeddings().num_embeddings


def run_matrix(args, device, data: dict, writer: B.ResultWriter) -> None:
    deadline = B.Deadline(args.max_minutes)
    results, errors = data["results"], data["errors"]
    batches: dict = {}
    for backbone in args.backbones:
        bsz = args.batch or (4 if args.tiny else B.PAPER_BATCH[backbone])
        methods = list(args.methods) + ([m for m in PLAIN if m not in args.methods] if args.baselines else [])
        methods = expand_recompute(methods, args.recompute)
        for method in methods:
            key = f"{backbone}/{method}"
            if deadline.passed():
                errors[key] = "skipped: --max-minutes reached"
                B.log(f"[skip] {key}: --max-minutes reached")
                continue
            model = opt = step = None
            B.reset_memory(device)
            try:
                t0 = time.perf_counter()
                model, make_opt, plain = build(backbone, method, args, device)
                build_s = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 -- record and go on with the matrix
                errors[key] = f"build: {type(exc).__name__}: {exc}"
                B.log(f"[error] {key} build: {traceback.format_exc()}")
                del model
                continue
            trainable, total = B.param_counts(model)
            vocab = min(vocab_of(model, plain), B.TOKEN_HIGH)
            bkey = (backbone, bsz, vocab)
            if bkey not in batches:
                batches.clear()
                batches[bkey] = B.random_batch(bsz, device, vocab, seed=args.seed)
            batch = batches[bkey]
            for precision in args.precisions:
                ckey = f"{backbone}/{precision}/{method}"
                if deadline.passed():
                    errors[ckey] = "skipped: --max-minutes reached"
                    continue
                try:
                    frozen = apply_frozen_dtype(model, plain, args.frozen_dtype, precision)
                    opt = make_opt()
                    B.reset_memory(device)
                    if args.explain and not plain:
                        explain_graphs(model, batch, device, precision, key)
                    step = make_step(model, opt, batch, device, precision, args.loss_path, plain, args.compile,
                                     compile_mode=args.compile_mode, sdpa_backend=args.sdpa_backend)
                    t0 = time.perf_counter()
                    for _ in range(args.warmup):
                        loss = step()
                    B.sync(device)
                    warm_s = time.perf_counter() - t0
                    times, wall = B.time_steps(step, args.steps, device)
                    loss = step()
                    final_loss = float(loss)
                    peak = B.peak_gib(device)
                    s = B.summarise(times)
                    rec = {
                        "step_ms": B.rnd(s["median"]), "samples_per_s": B.rnd(bsz / s["median"] * 1e3, 1),
                        "peak_mem_gb": B.rnd(peak), "step_ms_mean": B.rnd(s["mean"]), "step_ms_min": B.rnd(s["min"]),
                        "step_ms_p90": B.rnd(s["p90"]), "wall_ms_per_step": B.rnd(wall / args.steps),
                        "batch": bsz, "steps": args.steps, "warmup": args.warmup,
                        "trainable_params": trainable, "total_params": total,
                        "trainable_percent": round(100 * trainable / total, 3),
                        "attn_implementation": B.attn_impl(model.hf if plain else model.backbone),
                        "final_loss": round(final_loss, 4), "build_s": round(build_s, 2), "warmup_s": round(warm_s, 2),
                        "plain_transformers": plain, "frozen_dtype": frozen, "compile": args.compile,
                        "pet_recompute": split_rc(method)[1],
                        "sdpa": ("default" if plain else "efficient-first") if args.sdpa_backend == "auto"
                        else args.sdpa_backend,
                    }
                    results.setdefault(backbone, {}).setdefault(precision, {})[method] = rec
                    B.log(f"[ok] {ckey}: {rec['step_ms']:.2f} ms/step, {rec['samples_per_s']:.0f} samples/s, "
                          f"peak {rec['peak_mem_gb'] if peak is not None else '-'} GiB, loss {final_loss:.3f}")
                except Exception as exc:  # noqa: BLE001 (OOM included) -- record and go on
                    errors[ckey] = f"{type(exc).__name__}: {str(exc)[:500]}"
                    B.log(f"[error] {ckey}: {traceback.format_exc()}")
                finally:
                    opt = step = loss = None  # noqa: F841
                    if model is not None:
                        model.zero_grad(set_to_none=True)
                    if args.compile:
                        torch._dynamo.reset()
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                data["ratios"] = ratios(results)
                data["targets"] = targets(results, data["ratios"], device, args.tiny, args.compile)
                writer.write(data)
            del model, batch
            B.reset_memory(device)
        batches.clear()


# -- ratios and targets -----------------------------------------------------------------------------
def ratios(results: dict) -> dict:
    out = {}
    for backbone, per_prec in results.items():
        for precision, r in per_prec.items():
            def get(m, k):
                return r.get(m, {}).get(k)

            d = {
                "vl-pet-large/floor step": B.ratio(get("vl-pet-large", "step_ms"), get("floor", "step_ms")),
                "full/vl-pet-large step": B.ratio(get("full", "step_ms"), get("vl-pet-large", "step_ms")),
                "vl-pet-large/full mem": B.ratio(get("vl-pet-large", "peak_mem_gb"), get("full", "peak_mem_gb")),
                "vl-pet-large/floor mem": B.ratio(get("vl-pet-large", "peak_mem_gb"), get("floor", "peak_mem_gb")),
            }
            for v in VL_PET:
                d[f"{v}/lora step"] = B.ratio(get(v, "step_ms"), get("lora", "step_ms"))
            for v in VL_PET:
                d[f"{v}/lora mem"] = B.ratio(get(v, "peak_mem_gb"), get("lora", "peak_mem_gb"))
            d["vl-adapter/lora step"] = B.ratio(get("vl-adapter", "step_ms"), get("lora", "step_ms"))
            for p in PLAIN:
                d[f"vl-pet-large/{p} step"] = B.ratio(get("vl-pet-large", "step_ms"), get(p, "step_ms"))
                d[f"vl-pet-large/{p} mem"] = B.ratio(get("vl-pet-large", "peak_mem_gb"), get(p, "peak_mem_gb"))
            # issue 19: what recomputing the PET activations changes, and where each row stands to the floor
            for m in list(r):
                base, rc = split_rc(m)
                if rc:
                    d[f"{m}/{base} step"] = B.ratio(get(m, "step_ms"), get(base, "step_ms"))
                    d[f"{m}/{base} mem"] = B.ratio(get(m, "peak_mem_gb"), get(base, "peak_mem_gb"))
                    d[f"{m}/floor step"] = B.ratio(get(m, "step_ms"), get("floor", "step_ms"))
                    d[f"{m}/floor mem"] = B.ratio(get(m, "peak_mem_gb"), get("floor", "peak_mem_gb"))
            d["floor/plain-frozen step"] = B.ratio(get("floor", "step_ms"), get("plain-frozen", "step_ms"))
            d["full/plain-full step"] = B.ratio(get("full", "step_ms"), get("plain-full", "step_ms"))
            d["lora/plain-peft-lora step"] = B.ratio(get("lora", "step_ms"), get("plain-peft-lora", "step_ms"))
            out.setdefault(backbone, {})[precision] = {k: v for k, v in d.items() if v is not None}
    return out


def targets(results: dict, rat: dict, device, tiny: bool, compiled: bool = False) -> list[dict]:
    """Issue 8's targets, checked where the figures exist. Absolute ones (40 ms, 8 GiB) are for
    VL-BART-base bf16 at the paper batch on a GPU; the ratio ones are reported for every backbone/precision."""
    out = []

    def add(name, backbone, precision, value, op, limit):
        if value is None:
            return
        met = value <= limit if op == "<=" else value >= limit
        out.append({"target": name, "backbone": backbone, "precision": precision, "value": value, "op": op,
                    "limit": limit, "met": met})

    for backbone, per_prec in rat.items():
        for precision, d in per_prec.items():
            r = results[backbone][precision]
            if backbone == "bart-base" and precision == "bf16" and device.type == "cuda" and not tiny:
                vpl = r.get("vl-pet-large", {})
                add("vl-pet-large step ms", backbone, precision, vpl.get("step_ms"), "<=", 40.0)
                add("vl-pet-large peak GiB", backbone, precision, vpl.get("peak_mem_gb"), "<=", 8.0)
            add("vl-pet-large/floor step", backbone, precision, d.get("vl-pet-large/floor step"), "<=", 1.15)
            add("full/vl-pet-large step", backbone, precision, d.get("full/vl-pet-large step"), ">=", 1.4)
            add("vl-pet-large/full mem", backbone, precision, d.get("vl-pet-large/full mem"), "<=", 0.6)
            for v in VL_PET:
                add(f"{v}/lora step", backbone, precision, d.get(f"{v}/lora step"), "<=", 1.0)
            # issue 19 (bf16): BART compiled <= 1.05x floor time (eager 1.15x), <= 1.10x memory;
            # T5 compiled <= 1.10x time, <= 1.15x memory
            if precision == "bf16" and backbone in ("bart-base", "t5-base"):
                t5 = backbone == "t5-base"
                step_lim = (1.10 if t5 else 1.05) if compiled else (None if t5 else 1.15)
                mem_lim = 1.15 if t5 else 1.10
                for m in ("vl-pet-large", "vl-pet-large" + RC):
                    if step_lim:
                        add(f"issue19 {m}/floor step", backbone, precision, d.get(f"{m}/floor step"), "<=", step_lim)
                    if compiled:
                        add(f"issue19 {m}/floor mem", backbone, precision, d.get(f"{m}/floor mem"), "<=", mem_lim)
    return out


# -- report -----------------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    env = data["meta"]
    parts = [B.report_title("train_step", env) + f" · peft {env['peft']}",
             f"loss path `{env['loss_path']}`, compile {env['compile']}, frozen dtype {env.get('frozen_dtype')}, TF32 {env['tf32']} "
             f"(float32 matmul precision `{env['float32_matmul_precision']}`), steps {env['steps']} "
             f"after {env['warmup']} warm-up{', TINY smoke-test shapes' if env['tiny'] else ''}", ""]
    rows = []
    for backbone, per_prec in data["results"].items():
        for precision, r in per_prec.items():
            for method, rec in r.items():
                rows.append([backbone, precision, method, rec["batch"], rec["step_ms"], rec["samples_per_s"],
                             rec["peak_mem_gb"], rec["trainable_percent"], rec["attn_implementation"]])
    if rows:
        parts.append(B.md_table(["backbone", "precision", "method", "batch", "step ms (median)", "samples/s",
                                 "peak GiB", "trainable %", "attention"], rows))
    combos = [(b, p) for b, pp in data["ratios"].items() for p in pp]
    names = []
    for b, p in combos:
        for k in data["ratios"][b][p]:
            if k not in names:
                names.append(k)
    if names:
        parts += ["", B.md_table(["ratio"] + [f"{b} {p}" for b, p in combos],
                                 [[n] + [data["ratios"][b][p].get(n) for b, p in combos] for n in names])]
    if data["targets"]:
        if env["tiny"] or env["device"] == "cpu":
            parts += ["", "(targets below are for the GPU at the paper batch; on a CPU / --tiny they mean nothing)"]
        parts += ["", B.md_table(["target", "backbone", "precision", "value", "limit", "met"],
                                 [[t["target"], t["backbone"], t["precision"], t["value"], f"{t['op']} {t['limit']}",
                                   "yes" if t["met"] else "NO"] for t in data["targets"]])]
    parts += B.error_lines(data)
    if data.get("profile"):
        parts += ["", f"profile: {data['profile']}"]
    return "\n".join(parts)


# -- profile ----------------------------------------------------------------------------------------
def run_profile(args, device, folders: list[Path], data: dict) -> None:
    backbone, method, precision = (args.profile.split(":") + ["", "", ""])[:3]
    precision = precision or "bf16"
    B.reset_memory(device)
    model, make_opt, plain = build(backbone, method, args, device)
    bsz = args.batch or (4 if args.tiny else B.PAPER_BATCH[backbone])
    batch = B.random_batch(bsz, device, vocab_of(model, plain), seed=args.seed)
    apply_frozen_dtype(model, plain, args.frozen_dtype, precision)
    opt = make_opt()
    step = make_step(model, opt, batch, device, precision, args.loss_path, plain, args.compile, phases=True,
                     compile_mode=args.compile_mode, sdpa_backend=args.sdpa_backend)
    for _ in range(max(args.warmup, 3)):
        step()
    B.sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    n = args.profile_steps
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        B.sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / n
    ka = prof.key_averages()
    if device.type == "cuda":
        # torch >= 2.4 names it self_device_time_total (an instance attribute of each row)
        dev_key = "self_device_time_total" if len(ka) and hasattr(ka[0], "self_device_time_total") \
            else "self_cuda_time_total"
    else:
        dev_key = "self_cpu_time_total"

    def kernel_us(e):
        # as the profiler's own "Self CUDA time total": device-side events, user annotations excluded
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            return 0.0
        return getattr(e, "self_device_time_total", 0.0)

    kernel_ms = sum(kernel_us(e) for e in ka) / 1e3 / n if device.type == "cuda" else None
    head = [f"profile: {backbone} {method} {precision} batch {bsz}, {n} steps, loss path {args.loss_path}, "
            f"compile {args.compile}, card {data['meta']['card']}, commit {data['meta']['commit']}",
            f"wall per step (profiler on, synchronised): {wall_ms:.2f} ms",
            f"GPU kernel time per step (sum of self device time): {kernel_ms:.2f} ms" if kernel_ms is not None
            else "GPU kernel time: n/a (CPU)",
            "Rows `bench/<phase>` are the step's phases (forward, loss, backward, clip, optimizer): their CPU total"
            " is the host time of that phase; their device total the GPU time of the kernels it launched.", ""]
    body = [f"== top ops by {dev_key} ==", ka.table(sort_by=dev_key, row_limit=args.profile_rows), ""]
    if device.type == "cuda":
        body += ["== top ops by self_cpu_time_total ==", ka.table(sort_by="self_cpu_time_total",
                                                                  row_limit=args.profile_rows), ""]
    body += ["== step phases and ops by cpu_time_total ==", ka.table(sort_by="cpu_time_total",
                                                                    row_limit=args.profile_rows), ""]
    shapes = prof.key_averages(group_by_input_shape=True)
    body += [f"== top ops by {dev_key}, grouped by input shape ==",
             shapes.table(sort_by=dev_key, row_limit=min(args.profile_rows, 30)), ""]
    text = "\n".join(head + body)
    name = f"profile-{data['meta']['card_short']}-{data['meta']['date']}-{backbone}-{method}-{precision}"
    written = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.txt").write_text(text)
        written.append(str(folder / f"{name}.txt"))
        if args.profile_trace:
            prof.export_chrome_trace(str(folder / f"{name}.trace.json"))
    data["profile"] = {"config": f"{backbone}:{method}:{precision}", "wall_ms_per_step": round(wall_ms, 3),
                       "gpu_kernel_ms_per_step": B.rnd(kernel_ms), "files": written}
    B.log("\n".join(head))
    B.log(ka.table(sort_by=dev_key, row_limit=15))
    del model, opt, step, batch, prof
    B.reset_memory(device)


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", type=B.csv_list, default=["bart-base", "t5-base"])
    p.add_argument("--methods", type=B.csv_list, default=None,
                   help=f"vlpet presets and/or 'floor' (default: {','.join(DEFAULT_METHODS)}; decoder-only "
                        f"backbones: vl-pet-large,plain-peft-lora)")
    p.add_argument("--precisions", type=B.csv_list, default=["fp32", "bf16"], help="fp32, bf16 (autocast), fp16")
    p.add_argument("--baselines", action="store_true",
                   help="add plain transformers rows: plain-frozen (only a Linear(2048->d) visual projection "
                        "trains), plain-full, plain-peft-lora (get_peft_model, r=128, alpha 32, q/v, biases)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; --tiny 1)")
    p.add_argument("--batch", type=int, default=None, help="override the paper batch (500 BART, 300 T5)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny architectures of the same families, batch 4, 3 steps: a CPU smoke test")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward (mode default)")
    p.add_argument("--frozen-dtype", choices=("auto", "fp32"), default="auto",
                   help="vlpet rows: auto stores the frozen backbone in bf16 for bf16 (as `vlpet train` does); "
                        "fp32 keeps plain autocast over fp32 weights")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                   default="default", help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--sdpa-backend", choices=("auto", "efficient-first", "default", "flash", "efficient", "cudnn",
                                              "math"), default="auto",
                   help="attention kernels: auto (vlpet rows as `vlpet train` runs them, efficient-first; plain rows "
                        "PyTorch's default), an order, or one forced kernel")
    p.add_argument("--recompute", choices=("off", "on", "both"), default="off",
                   help="issue 19: recompute the PET activations in the backward (vlpet.recompute) for the PET "
                        "methods: off, on (rows named <method>+rc), or both (each PET method, then its +rc twin, "
                        "in one run); a method may also be named <method>+rc directly")
    p.add_argument("--explain", action="store_true", help="print torch._dynamo.explain graph breaks per config")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="with --compile: torch._functorch.config.activation_memory_budget (1.0 = save what the "
                        "default partitioner saves; lower recomputes more to save memory)")
    p.add_argument("--tag", default="", help="appended to the JSON file name (e.g. -compile)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="fp32 without TF32 (default: TF32 allowed, as the official scripts run)")
    p.add_argument("--loss-path", choices=("labels", "decoder-ids"), default="decoder-ids",
                   help="labels: pass labels= into the HF forward as vlpet's trainer does (HF then also computes "
                        "its own loss); decoder-ids: pass decoder_input_ids, compute only task_loss")
    p.add_argument("--out", default=None, help="folder for the JSON (default $OUT when set)")
    p.add_argument("--results-dir", default=None,
                   help="also write here (default benchmarks/results/, skipped for --tiny)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting new configs after this many minutes (results so far are kept)")
    p.add_argument("--profile", nargs="?", const="bart-base:vl-pet-large:bf16", default=None,
                   metavar="BACKBONE:METHOD:PRECISION",
                   help="after the matrix, torch.profiler over a few steps of one config (default "
                        "bart-base:vl-pet-large:bf16); writes profile-*.txt next to the JSON")
    p.add_argument("--profile-only", action="store_true", help="skip the matrix, only profile")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--profile-rows", type=int, default=40)
    p.add_argument("--profile-trace", action="store_true", help="also export a Chrome trace (large)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.tiny else 20
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 5
    if args.profile_only and not args.profile:
        args.profile = "bart-base:vl-pet-large:bf16"
    if args.tiny and args.profile:
        args.profile_steps = min(args.profile_steps, 2)
    decoder = [b for b in args.backbones if b in DO.BACKBONES]
    if decoder:  # decoder-only VLMs (issue 20): their own matrix, _decoder_only_bench.py
        if len(decoder) != len(args.backbones):
            p.error(f"--backbones: decoder-only names ({', '.join(DO.BACKBONES)}) run alone, not with "
                    f"{', '.join(b for b in args.backbones if b not in DO.BACKBONES)}")
        if args.recompute != "off":  # their matrix (_decoder_only_bench) names recomputed rows itself
            p.error("--recompute: for decoder-only backbones name the rows <preset>+rc in --methods")
        args.methods = args.methods or ["vl-pet-large", "plain-peft-lora"]
        from vlpet.decoder_only import DECODER_PRESETS

        for m in args.methods:
            base, suffixes = B.split_suffixes(m)
            allowed = {"compile"} if base == "plain-peft-lora" else {"rc", "compile"}
            if base not in (*DECODER_PRESETS, "floor", "plain-peft-lora") or not suffixes <= allowed:
                p.error(f"--methods: {m!r} is not offered on decoder-only VLMs; allowed: "
                        f"{', '.join(DECODER_PRESETS)}, floor, plain-peft-lora (a preset may end in +rc, +compile or "
                        f"+rc+compile; plain-peft-lora in +compile)")
        return args
    args.methods = args.methods or list(DEFAULT_METHODS)
    for b in args.backbones:
        if b not in B.PAPER_BATCH:
            p.error(f"--backbones: {b!r} is not one of {', '.join((*B.PAPER_BATCH, *DO.BACKBONES))}")
    for m in args.methods:
        m = split_rc(m)[0]
        if m != "floor" and m not in PLAIN:
            B.method_config(m, "bart-base")  # raises ConfigError naming the allowed presets
    for pr in args.precisions:
        if pr not in ("fp32", "bf16", "fp16"):
            p.error(f"--precisions: {pr!r} is not fp32, bf16 or fp16")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _names_vlm(argv):  # Florence-2 / BLIP-2 (issue 18): their own matrix, images in, PEFT LoRA reference
        import vlm_train_step

        return vlm_train_step.main(argv)
    args = parse_args(argv)
    device = B.pick_device(args.device)
    B.cpu_threads_for_tiny(device, args.tiny)
    tf = B.configure_tf32(device, args.tf32)
    if args.memory_budget is not None:
        import torch._functorch.config as fconfig

        fconfig.activation_memory_budget = args.memory_budget
    extra = dict(tf, loss_path=args.loss_path, compile=args.compile, memory_budget=args.memory_budget,
                 compile_mode=args.compile_mode, sdpa_backend=args.sdpa_backend, frozen_dtype=args.frozen_dtype,
                 recompute=args.recompute, tiny=args.tiny, steps=args.steps,
                 warmup=args.warmup, text_len=B.TEXT_LEN, vis_feats_shape=[B.GRID, B.FEAT_DIM], visual_tokens=36,
                 target_len=B.TARGET_LEN, clip_norm=CLIP, optimizer="AdamW (fused on CUDA), eps 1e-6, wd 0.01",
                 peak_mem_unit="GiB (2^30 bytes), torch.cuda.max_memory_allocated")
    env = B.environment(device, extra)
    data = {"benchmark": "train_step", "meta": env, "results": {}, "ratios": {}, "targets": [], "errors": {}}
    folders = B.output_folders(args)
    writer = B.ResultWriter("train_step", env, folders, tag=("-tiny" if args.tiny else "") + args.tag)
    B.log(f"device {env['card']} · torch {env['torch']} · transformers {env['transformers']} · commit "
          f"{env['commit']} · writing {', '.join(map(str, writer.paths)) or 'nothing'}")
    if args.backbones[0] in DO.BACKBONES:
        DO.run(args, device, data, writer)
    elif not args.profile_only:
        run_matrix(args, device, data, writer)
    if args.profile:
        try:
            run_profile(args, device, folders, data)
        except Exception as exc:  # noqa: BLE001
            data["errors"]["profile"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            B.log(f"[error] profile: {traceback.format_exc()}")
    writer.write(data)
    print(markdown(data))
    return 0


def _names_vlm(argv: list[str]) -> bool:
    from vlm_train_step import VLM_BACKBONES

    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--backbones" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--backbones=") else None)
        if value and any(b in VLM_BACKBONES for b in value.split(",")):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
