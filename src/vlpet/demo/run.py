"""`vlpet demo`: the paper's experiment in miniature, offline, through the same code path as a real run.

1. data     easy-VQA images -> VQA, a two-image true/false task (NLVR2-like) and captions (COCO-like),
            written in the VL-Adapter layout (vlpet.demo.build_data)
2. features real pretrained EfficientNet-Lite0 ImageNet weights -> [49, 1280] grid features (HDF5)
3. PLM      a tiny BART-architecture model pretrained here on text with BART's denoising objective,
            then FROZEN: it has never seen an image (vlpet.demo.pretrain)
4. tuning   `vlpet train` with the chosen preset(s) on the three tasks, then test-set evaluation
Everything is cached under $VLPET_CACHE (default ~/.cache/vlpet) and reused by later runs.

The presets' module sizes are defined for 768-wide BART-base (r = 96 = 768/8); on the demo's smaller
PLM they are scaled by d_model/768 (r = d/8 etc.) so that the Params % stay in the paper's range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

from ..checkpoint import atomic_write_json
from ..errors import ConfigError

DEMO_TASKS = ("vqa", "nlvr", "caption")
COMPARE_METHODS = ("full", "lora", "vl-adapter", "vl-pet-small", "vl-pet-middlex", "vl-pet-middley", "vl-pet-large")
FEATURE_DIRNAME = "data_efficientnet-lite0_att"
DATA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    n_train_images: int = 1000
    n_val_images: int = 100
    n_test_images: int = 400
    nlvr_sets_per_image: float = 0.125  # ~1,000 training statements
    n_vqa_train_images: int | None = None  # VQA's train images (default n_train_images; more: VQA only)
    balance_vqa_train: bool = False  # yes/no answers balanced per question template (build_data.balance_yes_no)
    # every easy-VQA question of an image (~9.6; 4 before): the H100 sweep (docs/demo/why-not-95.md) gave
    # VL-PET-large 87.0 instead of 85.4 with the same steps, the gain on the questions that read the image
    max_questions_per_image: int | None = None
    epochs: int = 20
    max_steps: int | None = 1200  # the tuning budget (optimizer steps), the same for every method
    batch_size: int = 32  # VQA batch; NLVR2 and captions scale as in the paper (x20/60, x50/60)
    visual_pool: int = 3  # 7x7 grid -> 3x3 visual tokens (the paper's 6x6 costs 4x the CPU time)
    lr_scale: float = 3.0  # the tiny PLM and short budget take a larger step than BART-base's recipe
    plm_model: dict | None = None
    # PLM pretraining: a fixed number of steps (90 copy warm-up + 300 denoising), never a time
    # budget, so that the same seed gives the same PLM on any machine (up to floating-point rounding)
    plm_train: dict | None = dataclasses.field(default_factory=lambda: {"copy_warmup_steps": 90})
    plm_max_steps: int = 300
    limit_eval: int | None = None


QUICK = DemoSettings(n_train_images=24, n_val_images=8, n_test_images=12, nlvr_sets_per_image=0.125,
                     max_questions_per_image=None, epochs=50, max_steps=600, batch_size=8, lr_scale=10.0,
                     plm_model={"d_model": 96, "encoder_layers": 2, "decoder_layers": 2,
                                "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                                "encoder_ffn_dim": 192, "decoder_ffn_dim": 192},
                     plm_train={"vocab_size": 600, "english_max_chars": 60_000, "batch_size": 8,
                                "copy_warmup_steps": 200},
                     plm_max_steps=200)


def _say(msg: str) -> None:
    print(f"[vlpet demo] {msg}", flush=True)


def cache_root(cache: str | os.PathLike | None) -> Path:
    return Path(cache or os.environ.get("VLPET_CACHE") or Path.home() / ".cache" / "vlpet")


def prepare_data(root: Path, s: DemoSettings, seed: int, progress: bool = True) -> Path:
    """Build (or reuse) the demo data set and its EfficientNet-Lite0 features; returns the data root."""
    from ..features.extract import extract_features
    from .build_data import build_demo_data

    key = {"v": DATA_VERSION, "n": [s.n_train_images, s.n_val_images, s.n_test_images],
           "nlvr": s.nlvr_sets_per_image, "seed": seed}
    if s.max_questions_per_image != 4:  # the key of the 4-question data sets stays as it was
        key["max_q"] = s.max_questions_per_image
    if s.n_vqa_train_images not in (None, s.n_train_images):  # so do the keys of the other data sets
        key["n_vqa"] = s.n_vqa_train_images
    if s.balance_vqa_train:
        key["balance"] = True
    key = json.dumps(key)
    data_root = root / f"demo-data-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    done = data_root / ".complete"
    if not done.exists():
        _say(f"building the data set from easy-VQA in {data_root}")
        tmp = data_root.with_name(data_root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_data(tmp, s.n_train_images, s.n_test_images, seed, n_val_images=s.n_val_images,
                        nlvr_sets_per_image=s.nlvr_sets_per_image, max_questions_per_image=s.max_questions_per_image,
                        n_vqa_train_images=s.n_vqa_train_images, balance_vqa_train=s.balance_vqa_train)
        shutil.rmtree(data_root, ignore_errors=True)
        os.replace(tmp, data_root)
        images = json.loads((data_root / "images.json").read_text())
        # Features depend on the image alone: one shared cache for every data-set version.
        shared = root / "features-efficientnet-lite0"
        _say(f"extracting EfficientNet-Lite0 grid features of {len(images)} images (real ImageNet weights; "
             f"cached in {shared})")
        summary = extract_features(images, shared, encoder="efficientnet-lite0", progress=progress)
        _say(f"features: {summary.get('n_written', 0)} computed, {summary.get('n_cached', 0)} from the cache")
        # Both tasks' feature folders point at it (the NLVR2-like task reads the same images).
        for task_dir in ("COCO", "nlvr"):
            parent = data_root / task_dir / "clip_features"
            parent.mkdir(parents=True, exist_ok=True)
            link = parent / FEATURE_DIRNAME
            if not link.exists():
                os.symlink(os.path.relpath(shared, parent), link)
        done.write_text(json.dumps({"features": summary}, default=str))
    return data_root


def scale_method(method, d_model: int, ref: int = 768):
    """Scale a preset's module sizes from BART-base width to another d_model (r, r_g, LoRA r, prompt MLP)."""
    f = d_model / ref

    def r_of(r, heads=1):
        return max(heads, int(round(r * f / heads)) * heads)

    modules = []
    for m in method.modules:
        gate = dataclasses.replace(m.gate, r_g=r_of(m.gate.r_g))
        modules.append(dataclasses.replace(m, r=r_of(m.r, m.n_heads), gate=gate))
    changes = {"modules": tuple(modules)}
    if method.lora is not None:
        changes["lora"] = dataclasses.replace(method.lora, r=r_of(method.lora.r))
    if method.prompt is not None:
        changes["prompt"] = dataclasses.replace(method.prompt, mid_dim=r_of(method.prompt.mid_dim))
    if method.hyperformer is not None:
        changes["hyperformer"] = dataclasses.replace(method.hyperformer, r=r_of(method.hyperformer.r))
    return dataclasses.replace(method, **changes)


def train_one(method_name: str, plm: Path, data_root: Path, out: Path, s: DemoSettings, seed: int,
              progress: bool, tasks: tuple[str, ...] = DEMO_TASKS, **train_overrides) -> dict:
    """Tune ``method_name`` on the demo tasks; ``train_overrides`` go to TrainConfig as they are (sweeps)."""
    from transformers import AutoConfig

    from ..presets import get_preset, train_defaults
    from ..train.loop import TrainConfig, train

    d_model = AutoConfig.from_pretrained(plm).d_model
    method = scale_method(get_preset(method_name, "bart"), d_model)
    overrides = {k: v for k, v in method.to_dict().items() if k in ("modules", "lora", "prompt", "hyperformer")}
    lr = train_defaults(method_name, "bart").lr * s.lr_scale
    cfg = TrainConfig(backbone=str(plm), method=method_name, data_root=str(data_root), output=str(out),
                      tasks=tasks, epochs=s.epochs, max_steps=s.max_steps, batch_size=s.batch_size, lr=lr,
                      seed=seed, visual_pool=s.visual_pool,
                      feature_dirname=FEATURE_DIRNAME, caption_metrics=("BLEU-4", "ROUGE-L", "CIDEr"),
                      limit_eval=s.limit_eval, method_overrides=overrides, overwrite=True, progress=progress,
                      device="cpu" if not _cuda() else None, **train_overrides)
    return train(cfg)


def _positive(option: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"{option} must be a positive integer, got {n!r}")
    return n


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gold_answers(data_root: str | os.PathLike, split: str) -> list[tuple[str, str]]:
    """(question, answer) of every easy-VQA record of a split (its 10 answers agree, so the top label)."""
    records = json.loads((Path(data_root) / "vqa" / f"karpathy_{split}.json").read_text())
    return [(r["sent"], max(r["label"], key=r["label"].get)) for r in records]


def vqa_majority_baseline(data_root: str | os.PathLike) -> dict:
    """Accuracy in % of always giving the most frequent answer of the easy-VQA test questions
    (VQA accuracy is exact match here): the bar any method must clear."""
    from collections import Counter

    test = _gold_answers(data_root, "test")
    answer, n = Counter(a for _, a in test).most_common(1)[0]
    return {"answer": answer, "accuracy": 100.0 * n / max(1, len(test)), "n_questions": len(test)}


def vqa_template_prior(data_root: str | os.PathLike) -> dict:
    """Accuracy in % of answering each test question with the most frequent *training* answer of its
    question template (vlpet.demo.facts.question_template), overall and on the yes/no questions: what a
    model scores that reads the question and never the image."""
    from collections import Counter, defaultdict

    from .facts import question_template

    by_template: dict[str, Counter] = defaultdict(Counter)
    for q, a in _gold_answers(data_root, "train"):
        by_template[question_template(q)][a] += 1
    prior = {t: c.most_common(1)[0][0] for t, c in by_template.items()}
    test = [(prior.get(question_template(q)) == a, a in ("yes", "no")) for q, a in _gold_answers(data_root, "test")]
    yes_no = [ok for ok, yn in test if yn]
    pct = lambda hits: 100.0 * sum(hits) / max(1, len(hits))  # noqa: E731
    return {"accuracy": pct([ok for ok, _ in test]), "accuracy_yes_no": pct(yes_no), "n_questions": len(test),
            "n_yes_no": len(yes_no)}


def _fmt_score(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def summarize(results: dict[str, dict], prior: dict | None = None) -> tuple[list[dict], str]:
    """One row per method run, and the Markdown tables: the paper's Table 2 layout, then easy-VQA by
    question type (with the question-only prior ``prior`` of :func:`vqa_template_prior` when given)."""
    rows = []
    for name, r in results.items():
        test = r.get("test", {}).get("last", {})
        row = {"method": name, "params_percent": round(r["params"]["percent"], 3),
               "trainable": r["params"]["trainable"], "total": r["params"]["total"],
               "vqa": test.get("vqa", {}).get("accuracy"), "nlvr": test.get("nlvr", {}).get("accuracy"),
               "vqa_yes_no": test.get("vqa", {}).get("accuracy/yes/no"),
               "vqa_other": test.get("vqa", {}).get("accuracy/other"),
               "nlvr_consistency": test.get("nlvr", {}).get("consistency"),
               "caption": test.get("caption", {}).get("CIDEr"), "caption_bleu4": test.get("caption", {}).get("BLEU-4"),
               "train_seconds": round(r["train_seconds"], 1)}
        vals = [row[t] for t in DEMO_TASKS if row[t] is not None]
        row["avg"] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    lines = ["| Method | Params % | easy-VQA acc | pair T/F acc | caption CIDEr | Avg | train time |",
             "|---|---|---|---|---|---|---|"]
    fmt = _fmt_score
    for r in rows:
        lines.append(f"| {r['method']} | {r['params_percent']:.2f} | {fmt(r['vqa'])} | {fmt(r['nlvr'])} | "
                     f"{fmt(r['caption'])} | {fmt(r['avg'])} | {r['train_seconds']:.0f} s |")
    lines += ["", "| Method | easy-VQA yes/no | easy-VQA other |", "|---|---|---|"]
    lines += [f"| {r['method']} | {fmt(r['vqa_yes_no'])} | {fmt(r['vqa_other'])} |" for r in rows]
    if prior is not None:
        lines.append(f"| question-only prior | {prior['accuracy_yes_no']:.2f} | - |")
    return rows, "\n".join(lines)


def run_demo(output="vlpet-demo", method="vl-pet-large", compare=False, methods=None, seed=0, epochs=None,
             quick=False, cache=None, progress=True, max_steps=None, vqa_train_images=None) -> dict:
    """``max_steps`` / ``vqa_train_images`` (CLI ``--max-steps`` / ``--vqa-train-images``) lift the 10-minute
    budget: VL-PET-large learns easy-VQA's colour questions only with several times the default steps
    (docs/demo/why-not-95.md section 6)."""
    t_start = time.time()
    s = QUICK if quick else DemoSettings()
    if epochs is not None:
        s = dataclasses.replace(s, epochs=_positive("--epochs", epochs))
    if max_steps is not None:
        s = dataclasses.replace(s, max_steps=_positive("--max-steps", max_steps))
    if vqa_train_images is not None:
        from .build_data import EASY_VQA_TRAIN_IMAGES

        lo, hi = s.n_train_images, EASY_VQA_TRAIN_IMAGES - s.n_val_images  # val images are easy-VQA train images
        if not lo <= _positive("--vqa-train-images", vqa_train_images) <= hi:
            raise ConfigError(f"--vqa-train-images must be in [{s.n_train_images}, {hi}] (the demo's "
                              f"{s.n_train_images} train images up to easy-VQA's {EASY_VQA_TRAIN_IMAGES} train "
                              f"images less the {s.n_val_images} val images), got {vqa_train_images}")
        s = dataclasses.replace(s, n_vqa_train_images=vqa_train_images)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    root = cache_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    names = tuple(methods) if methods else (COMPARE_METHODS if compare else (method,))
    from ..presets import get_preset

    for n in names:
        get_preset(n)  # unknown names fail before any work
    _say(f"output {out.resolve()} | cache {root} | methods {', '.join(names)} | seed {seed}")
    t0 = time.time()
    data_root = prepare_data(root, s, seed, progress)
    t_data = time.time() - t0

    from .pretrain import PLM_NOTE, pretrain_demo_plm

    t0 = time.time()
    _say("pretraining (or reusing) the demo PLM: " + PLM_NOTE)
    plm = pretrain_demo_plm(root, seed=seed, progress=progress, model_config=s.plm_model,
                            train_config=s.plm_train, max_steps=s.plm_max_steps)
    t_plm = time.time() - t0

    results = {}
    for n in names:
        _say(f"tuning the frozen PLM with {n} on {', '.join(DEMO_TASKS)}")
        results[n] = train_one(n, Path(plm), data_root, out / "runs" / n, s, seed, progress)
    majority = vqa_majority_baseline(data_root)
    prior = vqa_template_prior(data_root)
    rows, table = summarize(results, prior)
    note = (f"easy-VQA majority baseline: always \"{majority['answer']}\" scores {majority['accuracy']:.2f} "
            f"on the {majority['n_questions']} test questions; the question-only prior (each question "
            f"template's most frequent training answer) scores {prior['accuracy']:.2f} "
            f"({prior['accuracy_yes_no']:.2f} on the {prior['n_yes_no']} yes/no questions)")
    from ..train.plots import plot_score_vs_params

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_score_vs_params(rows, plots / "score_vs_params.png", "avg")
    for n in names:
        for png in ("learning_curves.png", "gate_heatmap.png"):
            src = out / "runs" / n / "plots" / png
            if src.exists():
                shutil.copy(src, plots / f"{n}-{png}")
    summary = {
        "note": PLM_NOTE, "tasks": list(DEMO_TASKS), "seed": seed, "quick": quick,
        "settings": dataclasses.asdict(s), "plm": str(plm), "data_root": str(data_root),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds": {"data_and_features": round(t_data, 1), "pretraining": round(t_plm, 1),
                    "total": round(time.time() - t_start, 1)},
        "methods": {r["method"]: r for r in rows},
        "baselines": {"vqa_majority": majority, "vqa_template_prior": prior},
    }
    atomic_write_json(out / "results.json", summary)
    (out / "results.md").write_text(table + "\n\n" + note + "\n")
    print()
    print(table)
    print()
    _say(note)
    _say(PLM_NOTE)
    _say(f"done in {summary['seconds']['total']:.0f} s; results in {out / 'results.json'}, plots in {plots}")
    return summary
