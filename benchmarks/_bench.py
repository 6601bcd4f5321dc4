"""Shared helpers of the vlpet GPU benchmarks (train_step.py, generate.py).

Nothing here is timed: model construction (VL models through vlpet, plain HF models for the
reference rows), random inputs, timers, environment facts and result files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from vlpet.rng import fork_rng  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"

# The paper's VQA setting (spec §4.5): batch per backbone family, 20 text tokens, a 7x7 grid of
# 2048-d features (pooled to 6x6 = 36 visual tokens by the model), 10 target tokens.
PAPER_BATCH = {"bart-base": 500, "t5-base": 300}
TEXT_LEN = 20
GRID = 49
FEAT_DIM = 2048
TARGET_LEN = 10
# Token ids are drawn from [TOKEN_LOW, TOKEN_HIGH): clear of the special ids of both tokenizers
# and inside both original vocabularies (BART 50265, T5 32128).
TOKEN_LOW, TOKEN_HIGH = 4, 30000

# --tiny: the real code path on a tiny architecture of the same family (CPU smoke test).
TINY_OVERRIDES = {
    "bart": dict(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128),
    "t5": dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
}

GIB = 2 ** 30


# -- environment --------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False (use --device cpu --tiny for a smoke test)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def cpu_threads_for_tiny(device: torch.device, tiny: bool) -> None:
    """Tiny CPU smoke tests run faster (and steadier on a shared machine) on one thread."""
    if tiny and device.type == "cpu":
        torch.set_num_threads(1)


def configure_tf32(device: torch.device, tf32: bool) -> dict:
    """fp32 matmuls/convs on TF32 tensor cores (as the official scripts ran: PyTorch's default for
    cuDNN convs, and `allow_tf32` for matmuls). Returns what was set, for the result file."""
    info = {}
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        info["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    info["tf32"] = bool(tf32) if device.type == "cuda" else None
    return info


def card_name(device: torch.device) -> tuple[str, str]:
    """(full name, short name for file names): ('NVIDIA H100 80GB HBM3', 'H100')."""
    if device.type != "cuda":
        return platform.processor() or platform.machine() or "cpu", "cpu"
    full = torch.cuda.get_device_name(device)
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", full.replace("NVIDIA", ""))
    short = m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", full).strip("-")
    return full, short


def git_commit() -> str:
    # VLPET_COMMIT first: the lent GPU machine's copy carries stale git metadata (HEAD of an older commit)
    if os.environ.get("VLPET_COMMIT"):
        return os.environ["VLPET_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(device: torch.device, extra: dict | None = None) -> dict:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:  # pragma: no cover
        peft_version = None
    full, short = card_name(device)
    env = {
        "card": full,
        "card_short": short,
        "device": str(device),
        "date": _dt.date.today().isoformat(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "argv": sys.argv[1:],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["card_memory_gib"] = round(props.total_memory / GIB, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    env.update(extra or {})
    return env


# -- models -------------------------------------------------------------------------------------
def arch_family(backbone: str) -> str:
    return "t5" if backbone.startswith("t5") else "bart"


def hf_config(backbone: str, tiny: bool):
    from vlpet.backbones.loading import builtin_config

    cfg = builtin_config(backbone)
    if tiny:
        for k, v in TINY_OVERRIDES[arch_family(backbone)].items():
            setattr(cfg, k, v)
    return cfg


def split_suffixes(method: str) -> tuple[str, set[str]]:
    """"vl-pet-large-cached+rc+compile" -> ("vl-pet-large-cached", {"rc", "compile"}), in any order."""
    base, *rest = method.split("+")
    return base, set(rest)


def method_config(method: str, backbone: str):
    """A vlpet preset, or the floor: the same VL model with no PET module, only the visual embedding trains."""
    from vlpet.method import MethodConfig
    from vlpet.presets import get_preset

    if method == "floor":
        return MethodConfig(name="floor", trainable=("visual_embedding",),
                            description="benchmark floor: frozen backbone, no PET module, visual embedding trains")
    return get_preset(method, arch_family(backbone))


def learning_rate(method: str, backbone: str) -> float:
    from vlpet.presets import train_defaults

    return train_defaults("vl-pet-large" if method == "floor" else method, arch_family(backbone)).lr


def build_vl(backbone: str, method: str, tiny: bool, seed: int = 0):
    """`VLModel.build(backbone, method, load_tok=False)` (random weights, offline); with `tiny`, the
    same constructor around a tiny HF model of the same family."""
    from vlpet.model import VisualConfig, VLModel

    mc = method_config(method, backbone)
    if not tiny:
        return VLModel.build(backbone, mc, load_tok=False, seed=seed)
    from transformers import AutoModelForSeq2SeqLM

    cfg = hf_config(backbone, tiny=True)
    with fork_rng(seed):
        hf = AutoModelForSeq2SeqLM.from_config(cfg)
    return VLModel(hf, mc, VisualConfig.for_task(), backbone_name=f"{backbone}-tiny",
                   vocab_rows=cfg.vocab_size + 200, seed=seed)


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def attn_impl(hf_model) -> str | None:
    cfg = getattr(hf_model, "config", None)
    return getattr(cfg, "_attn_implementation", None)


# -- inputs -------------------------------------------------------------------------------------
def random_batch(batch: int, device: torch.device, vocab: int, text_len: int = TEXT_LEN,
                 target_len: int = TARGET_LEN, seed: int = 0) -> dict:
    """Random token ids and random normal features (never zeros), made on the CPU under a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    high = min(TOKEN_HIGH, vocab)
    out = {
        "input_ids": torch.randint(TOKEN_LOW, high, (batch, text_len), generator=g),
        "attention_mask": torch.ones(batch, text_len, dtype=torch.long),
        "vis_feats": torch.randn(batch, GRID, FEAT_DIM, generator=g),
        "labels": torch.randint(TOKEN_LOW, high, (batch, target_len), generator=g),
    }
    return {k: v.to(device) for k, v in out.items()}


# -- precision / timing -------------------------------------------------------------------------
def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, n: int, device: torch.device) -> tuple[list[float], float]:
    """Run `fn` n times; per-call milliseconds (CUDA events on a GPU, perf_counter on CPU) and the
    wall-clock milliseconds of all n calls (synchronised at both ends)."""
    sync(device)
    t0 = time.perf_counter()
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times, (time.perf_counter() - t0) * 1e3


def summarise(times: list[float]) -> dict:
    s = sorted(times)
    return {"median": statistics.median(s), "mean": statistics.fmean(s), "min": s[0],
            "p90": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]}


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def rnd(x, nd=3):
    return None if x is None else round(float(x), nd)


def ratio(a, b, nd=3):
    if a is None or b is None or b == 0:
        return None
    return round(a / b, nd)


# -- output -------------------------------------------------------------------------------------
class ResultWriter:
    """Writes one JSON file per run, named `<kind>-<card>-<date>.json` (with -2, -3... when a file of
    that name exists), into every target folder; rewritten after each config so that a run cut
    short still leaves its figures."""

    def __init__(self, kind: str, env: dict, folders: list[Path], tag: str = ""):
        self.paths = []
        stem = f"{kind}-{env['card_short']}-{env['date']}{tag}"
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stem}.json"
            k = 2
            while path.exists():
                path = folder / f"{stem}-{k}.json"
                k += 1
            self.paths.append(path)

    def write(self, data: dict) -> None:
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
        for path in self.paths:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text)
            tmp.replace(path)


def output_folders(args) -> list[Path]:
    """--out DIR, else $OUT; plus benchmarks/results/ (skipped for --tiny unless --results-dir is given)."""
    folders = []
    if args.out:
        folders.append(Path(args.out))
    elif os.environ.get("OUT"):
        folders.append(Path(os.environ["OUT"]))
    if args.results_dir:
        folders.append(Path(args.results_dir))
    elif not args.tiny:
        folders.append(RESULTS_DIR)
    seen, out = set(), []
    for f in folders:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def report_title(kind: str, env: dict) -> str:
    return (f"### {kind} — {env['card']} · {env['date']} · commit {env['commit']} · torch {env['torch']} · "
            f"transformers {env['transformers']}")


def error_lines(data: dict) -> list[str]:
    if not data["errors"]:
        return []
    return ["", "errors / skipped:"] + [f"- {k}: {v}" for k, v in data["errors"].items()]


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


class Deadline:
    def __init__(self, minutes: float | None):
        self.t_end = time.monotonic() + 60 * minutes if minutes else None

    def passed(self) -> bool:
        return self.t_end is not None and time.monotonic() > self.t_end


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
