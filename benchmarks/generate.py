"""Decoding speed of vl-pet-large against the plain backbone (the `floor` model: the same VL model
with no PET module) on the same inputs (issue 8).

    python benchmarks/generate.py                       # GPU: both backbones, fp32 and bf16
    python benchmarks/generate.py --device cpu --tiny   # CPU smoke test of the same code path

Tasks (random weights, so the output length is forced to make the comparison like for like):
  vqa      greedy (num_beams=1), max_new_tokens=10 and min_new_tokens=10; batch 500; 20 text tokens
  caption  beam search num_beams=5, max_length=40 and min_length=40 (39 generated tokens after the
           decoder start token); batch 100 (500 hypotheses in flight); 5 text tokens (a short prompt)
Both with [B, 49, 2048] random normal features (pooled to 36 visual tokens by the model), KV cache on,
do_sample=False, nothing else set. `--no-force-length` lets EOS end sequences (then the token counts
differ between models and per-token time is the fairer figure).

Figures per (backbone, precision, task, method): median batch time over --steps calls after --warmup
(CUDA events), ms per generated token (batch time / all generated tokens of the batch, the decoder
start token not counted; each returned sequence counted up to and including its first EOS), ms per
decoding step (batch time / the longest sequence's generated tokens), peak memory (GiB).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

TASKS = {
    "vqa": dict(batch=500, text_len=B.TEXT_LEN, settings=dict(num_beams=1, max_new_tokens=10),
                force=dict(min_new_tokens=10)),
    "caption": dict(batch=100, text_len=5, settings=dict(num_beams=5, max_length=40),
                    force=dict(min_length=40)),
}


def count_generated(seqs: torch.Tensor, eos_id: int | None) -> tuple[int, int, bool]:
    """(all generated tokens of the batch, the longest, every sequence ran to full length).
    Column 0 is the decoder start token; a sequence ends at its first EOS (counted)."""
    gen = seqs[:, 1:]
    n, length = gen.shape
    if eos_id is None or length == 0:
        return n * length, length, True
    is_eos = gen.eq(eos_id)
    has = is_eos.any(1)
    first = torch.where(has, is_eos.float().argmax(1) + 1, torch.full_like(has, length, dtype=torch.long))
    lens = first.long()
    return int(lens.sum()), int(lens.max()), bool((lens == length).all())


def run(args, device, data: dict, writer: B.ResultWriter) -> None:
    deadline = B.Deadline(args.max_minutes)
    results, errors = data["results"], data["errors"]
    for backbone in args.backbones:
        for method in args.methods:
            key = f"{backbone}/{method}"
            if deadline.passed():
                errors[key] = "skipped: --max-minutes reached"
                continue
            B.reset_memory(device)
            try:
                t0 = time.perf_counter()
                model = B.build_vl(backbone, method, args.tiny).to(device).eval()
                build_s = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001
                errors[key] = f"build: {type(exc).__name__}: {exc}"
                B.log(f"[error] {key} build: {traceback.format_exc()}")
                continue
            hf = model.backbone
            vocab = min(hf.get_input_embeddings().num_embeddings, B.TOKEN_HIGH)
            eos = hf.generation_config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            for precision in args.precisions:
                from vlpet.frozen_precision import apply_frozen_dtype

                apply_frozen_dtype(model, args.frozen_dtype, precision)
                for task in args.tasks:
                    ckey = f"{backbone}/{precision}/{task}/{method}"
                    if deadline.passed():
                        errors[ckey] = "skipped: --max-minutes reached"
                        continue
                    spec = TASKS[task]
                    bsz = args.batch or (args.tiny_batch[task] if args.tiny else spec["batch"])
                    if task == "vqa" and args.vqa_batch:
                        bsz = args.vqa_batch
                    if task == "caption" and args.caption_batch:
                        bsz = args.caption_batch
                    settings = dict(spec["settings"], do_sample=False, use_cache=True)
                    if args.force_length:
                        settings.update(spec["force"])
                    try:
                        inp = B.random_batch(bsz, device, vocab, text_len=spec["text_len"], seed=args.seed)
                        B.reset_memory(device)
                        out_box = {}

                        def call():
                            from vlpet.backbones.attention import preferred_attention

                            with preferred_attention(args.sdpa), B.autocast(device, precision):
                                out_box["seqs"] = model.generate(inp["input_ids"], inp["attention_mask"],
                                                                 vis_feats=inp["vis_feats"], task=task, **settings)

                        for _ in range(args.warmup):
                            call()
                        times, wall = B.time_steps(call, args.steps, device)
                        tokens, longest, full = count_generated(out_box["seqs"], eos)
                        s = B.summarise(times)
                        rec = {
                            "batch_ms": B.rnd(s["median"]),
                            "ms_per_token": B.rnd(s["median"] / max(tokens, 1), 5),
                            "ms_per_step": B.rnd(s["median"] / max(longest, 1), 4),
                            "sequences_per_s": B.rnd(bsz / s["median"] * 1e3, 1),
                            "peak_mem_gb": B.rnd(B.peak_gib(device)),
                            "batch_ms_mean": B.rnd(s["mean"]), "batch_ms_min": B.rnd(s["min"]),
                            "batch_ms_p90": B.rnd(s["p90"]), "wall_ms_per_batch": B.rnd(wall / args.steps),
                            "batch": bsz, "text_len": spec["text_len"], "generated_tokens_per_batch": tokens,
                            "generated_tokens_per_sequence_max": longest, "all_full_length": full,
                            "settings": {k: v for k, v in settings.items()}, "steps": args.steps,
                            "warmup": args.warmup, "build_s": round(build_s, 2),
                            "attn_implementation": B.attn_impl(hf),
                        }
                        results.setdefault(backbone, {}).setdefault(precision, {}).setdefault(task, {})[method] = rec
                        B.log(f"[ok] {ckey}: {rec['batch_ms']:.1f} ms/batch, {rec['ms_per_token']:.4f} ms/token, "
                              f"{tokens} tokens/batch (max {longest}/seq), peak {rec['peak_mem_gb']} GiB")
                    except Exception as exc:  # noqa: BLE001 (OOM included)
                        errors[ckey] = f"{type(exc).__name__}: {str(exc)[:500]}"
                        B.log(f"[error] {ckey}: {traceback.format_exc()}")
                    finally:
                        out_box = inp = None
                        B.reset_memory(device)
                    data["ratios"] = ratios(results)
                    data["targets"] = targets(data["ratios"])
                    writer.write(data)
            del model, hf
            B.reset_memory(device)


def ratios(results: dict) -> dict:
    out = {}
    for backbone, pp in results.items():
        for precision, tt in pp.items():
            for task, r in tt.items():
                a, b = r.get("vl-pet-large", {}), r.get("floor", {})
                d = {"vl-pet-large/plain batch": B.ratio(a.get("batch_ms"), b.get("batch_ms")),
                     "vl-pet-large/plain per token": B.ratio(a.get("ms_per_token"), b.get("ms_per_token")),
                     "vl-pet-large/plain mem": B.ratio(a.get("peak_mem_gb"), b.get("peak_mem_gb"))}
                d = {k: v for k, v in d.items() if v is not None}
                if d:
                    out.setdefault(backbone, {}).setdefault(precision, {})[task] = d
    return out


def targets(rat: dict) -> list[dict]:
    out = []
    for backbone, pp in rat.items():
        for precision, tt in pp.items():
            for task, d in tt.items():
                v = d.get("vl-pet-large/plain batch")
                if v is not None:
                    out.append({"target": "generation vl-pet-large/plain", "backbone": backbone,
                                "precision": precision, "task": task, "value": v, "op": "<=", "limit": 1.1,
                                "met": v <= 1.1})
    return out


def markdown(data: dict) -> str:
    env = data["meta"]
    parts = [B.report_title("generate", env),
             f"forced length {env['force_length']}, TF32 {env['tf32']}, steps {env['steps']} after {env['warmup']} "
             f"warm-up{', TINY smoke-test shapes' if env['tiny'] else ''}; 'floor' = the plain backbone "
             f"(same VL model, no PET module)", ""]
    rows = []
    for backbone, pp in data["results"].items():
        for precision, tt in pp.items():
            for task, r in tt.items():
                for method, rec in r.items():
                    rows.append([backbone, precision, task, method, rec["batch"], rec["batch_ms"], rec["ms_per_token"],
                                 rec["ms_per_step"], rec["generated_tokens_per_batch"], rec["peak_mem_gb"]])
    if rows:
        parts.append(B.md_table(["backbone", "precision", "task", "method", "batch", "batch ms (median)",
                                 "ms/token", "ms/step", "tokens/batch", "peak GiB"], rows))
    rrows = []
    for backbone, pp in data["ratios"].items():
        for precision, tt in pp.items():
            for task, d in tt.items():
                rrows.append([backbone, precision, task, d.get("vl-pet-large/plain batch"),
                              d.get("vl-pet-large/plain per token"), d.get("vl-pet-large/plain mem")])
    if rrows:
        parts += ["", B.md_table(["backbone", "precision", "task", "vl-pet-large/plain batch ms (target <= 1.1)",
                                  "per token", "peak mem"], rrows)]
    parts += B.error_lines(data)
    return "\n".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", type=B.csv_list, default=["bart-base", "t5-base"])
    p.add_argument("--methods", type=B.csv_list, default=["floor", "vl-pet-large"],
                   help="'floor' (the plain backbone) and vlpet presets (default: %(default)s)")
    p.add_argument("--precisions", type=B.csv_list, default=["fp32", "bf16"])
    p.add_argument("--tasks", type=B.csv_list, default=list(TASKS), help="vqa, caption")
    p.add_argument("--steps", type=int, default=None, help="timed calls (default 10; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2; --tiny 1)")
    p.add_argument("--batch", type=int, default=None, help="override both batches")
    p.add_argument("--vqa-batch", type=int, default=None, help="default 500")
    p.add_argument("--caption-batch", type=int, default=None, help="default 100")
    p.add_argument("--no-force-length", dest="force_length", action="store_false",
                   help="do not force full-length outputs (min_new_tokens / min_length)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny architectures, batch 4 (vqa) / 2 (caption): CPU smoke test")
    p.add_argument("--no-tf32", dest="tf32", action="store_false")
    p.add_argument("--sdpa", choices=("efficient-first", "default"), default="efficient-first",
                   help="attention kernel order (default: as `vlpet evaluate` runs, efficient-first)")
    p.add_argument("--frozen-dtype", choices=("auto", "fp32"), default="auto",
                   help="auto stores the frozen backbone in bf16 for bf16 (as `vlpet evaluate/predict` do); "
                        "fp32 keeps plain autocast over fp32 weights")
    p.add_argument("--out", default=None, help="folder for the JSON (default $OUT when set)")
    p.add_argument("--results-dir", default=None, help="also write here (default benchmarks/results/, not for --tiny)")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tiny_batch = {"vqa": 4, "caption": 2}
    if args.steps is None:
        args.steps = 2 if args.tiny else 10
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    for t in args.tasks:
        if t not in TASKS:
            p.error(f"--tasks: {t!r} is not one of {', '.join(TASKS)}")
    for b in args.backbones:
        if b not in B.PAPER_BATCH:
            p.error(f"--backbones: {b!r} is not one of {', '.join(B.PAPER_BATCH)}")
    for m in args.methods:
        B.method_config(m, "bart-base")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = B.pick_device(args.device)
    B.cpu_threads_for_tiny(device, args.tiny)
    tf = B.configure_tf32(device, args.tf32)
    extra = dict(tf, force_length=args.force_length, frozen_dtype=args.frozen_dtype, sdpa=args.sdpa, tiny=args.tiny, steps=args.steps, warmup=args.warmup,
                 tasks={t: {k: v for k, v in TASKS[t].items()} for t in args.tasks},
                 vis_feats_shape=[B.GRID, B.FEAT_DIM], peak_mem_unit="GiB (2^30 bytes)")
    env = B.environment(device, extra)
    data = {"benchmark": "generate", "meta": env, "results": {}, "ratios": {}, "targets": [], "errors": {}}
    writer = B.ResultWriter("generate", env, B.output_folders(args), tag="-tiny" if args.tiny else "")
    B.log(f"device {env['card']} · torch {env['torch']} · transformers {env['transformers']} · commit "
          f"{env['commit']} · writing {', '.join(map(str, writer.paths)) or 'nothing'}")
    run(args, device, data, writer)
    writer.write(data)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
