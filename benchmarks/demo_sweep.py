"""Sweep of `vlpet demo` settings (issue 5): which settings move easy-VQA accuracy, and on which questions.

Each configuration is one demo tuning run (the same code path as `vlpet demo`: data set, EfficientNet-Lite0
features and PLM from the demo cache, then `vlpet.demo.run.train_one`) with some `DemoSettings` fields
changed. Configurations run as parallel subprocesses (on a GPU machine they share the card; on a CPU they
share the cores). The shared pieces (data sets, features, PLM) are built once first.

    python benchmarks/demo_sweep.py --cache DIR --out OUT [--only base,p1qA2000,...] [--parallel 4] [--quick]

Prints one line per finished run (overall easy-VQA accuracy, its yes/no and other parts, the pair task and
CIDEr) and a Markdown table last; writes OUT/demo_sweep.json (rewritten after every run). `--quick` uses
the QUICK settings of the test suite (a smoke test of this script, not a measurement). Scores of a GPU
run differ slightly from a CPU run of the same settings (floating-point order, and a PLM pretrained on
another machine's Python has another corpus); compare within one file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> (method, overrides: DemoSettings fields, plus "tasks", "seed" and "train" = TrainConfig fields, see
# split_overrides); "q4" = 4 easy-VQA questions per image (the demo's default until commit e3b1b8d, when this
# sweep ran), "qA" = every question (~9.6, the default since); "p<k>" = k x k tokens
_D128 = {"d_model": 128, "encoder_ffn_dim": 512, "decoder_ffn_dim": 512}
_D192 = {"d_model": 192, "encoder_ffn_dim": 768, "decoder_ffn_dim": 768}


def _heads(h: int) -> dict:
    return {"encoder_attention_heads": h, "decoder_attention_heads": h}


def _seed(k: int) -> str:
    """The name part of a tuning seed: none for seed 0, "seed<k>" otherwise."""
    return "" if k == 0 else f"seed{k}"


CONFIGS: dict[str, tuple[str, dict]] = {
    "base": ("vl-pet-large", {"max_questions_per_image": 4}),
    "p1q4s1800": ("vl-pet-large", {"visual_pool": 1, "max_steps": 1800, "max_questions_per_image": 4}),
    "p3qA1200": ("vl-pet-large", {"max_questions_per_image": None}),
    "p1qA1200": ("vl-pet-large", {"visual_pool": 1, "max_questions_per_image": None}),
    "p3qA2000": ("vl-pet-large", {"max_questions_per_image": None, "max_steps": 2000}),
    "p1qA2000": ("vl-pet-large", {"visual_pool": 1, "max_questions_per_image": None, "max_steps": 2000}),
    "p2qA2000": ("vl-pet-large", {"visual_pool": 2, "max_questions_per_image": None, "max_steps": 2000}),
    "p1qA3000": ("vl-pet-large", {"visual_pool": 1, "max_questions_per_image": None, "max_steps": 3000}),
    "p3qA2000lr6": ("vl-pet-large", {"max_questions_per_image": None, "max_steps": 2000, "lr_scale": 6.0}),
    "p1qA2000lr6": ("vl-pet-large", {"visual_pool": 1, "max_questions_per_image": None, "max_steps": 2000,
                                     "lr_scale": 6.0}),
    "full-p3qA1200": ("full", {"max_questions_per_image": None}),
    "full-p1qA2000": ("full", {"visual_pool": 1, "max_questions_per_image": None, "max_steps": 2000}),
    # 2026-11-26 (defaults then: p3, qA, batch 32, 1,200 steps): the learning-rate schedule, smaller batches
    # with more steps, and which other task slows VQA down ("tasks"); "c" = constant lr after the warm-up
    "c1200": ("vl-pet-large", {"train": {"lr_schedule": "constant"}}),
    "s2400": ("vl-pet-large", {"max_steps": 2400}),
    "bs16s2400": ("vl-pet-large", {"batch_size": 16, "max_steps": 2400}),
    "bs16s2400c": ("vl-pet-large", {"batch_size": 16, "max_steps": 2400, "train": {"lr_schedule": "constant"}}),
    "p1bs16s2400c": ("vl-pet-large", {"visual_pool": 1, "batch_size": 16, "max_steps": 2400,
                                      "train": {"lr_schedule": "constant"}}),
    "bs8s4800c": ("vl-pet-large", {"batch_size": 8, "max_steps": 4800, "train": {"lr_schedule": "constant"}}),
    "lr6c1200": ("vl-pet-large", {"lr_scale": 6.0, "train": {"lr_schedule": "constant"}}),
    "vqa1200": ("vl-pet-large", {"tasks": ("vqa",)}),
    "vqacap1200": ("vl-pet-large", {"tasks": ("vqa", "caption")}),
    "vqanlvr1200": ("vl-pet-large", {"tasks": ("vqa", "nlvr")}),
    # how many examples the yes/no questions need: more steps, or larger batches (x2, x4) at the same steps
    "s3600": ("vl-pet-large", {"max_steps": 3600}),
    "s4800": ("vl-pet-large", {"max_steps": 4800}),
    "bs64s1200": ("vl-pet-large", {"batch_size": 64}),
    "bs64s1200lr6": ("vl-pet-large", {"batch_size": 64, "lr_scale": 6.0}),
    "bs64s2400": ("vl-pet-large", {"batch_size": 64, "max_steps": 2400}),
    "bs128s1200": ("vl-pet-large", {"batch_size": 128}),
    "p2bs64s1800": ("vl-pet-large", {"visual_pool": 2, "batch_size": 64, "max_steps": 1800}),
    "full-s2400": ("full", {"max_steps": 2400}),
    "vqa2400": ("vl-pet-large", {"tasks": ("vqa",), "max_steps": 2400}),
    "p1q4vqa1200": ("vl-pet-large", {"visual_pool": 1, "max_questions_per_image": 4, "tasks": ("vqa",)}),
    "p3q4vqa1200": ("vl-pet-large", {"max_questions_per_image": 4, "tasks": ("vqa",)}),
    "p1vqa1200": ("vl-pet-large", {"visual_pool": 1, "tasks": ("vqa",)}),
    # a PLM pretrained longer (denoising steps), the PET learning rate, other PET methods at 2,400 steps
    "plm600s1200": ("vl-pet-large", {"plm_max_steps": 600}),
    "plm600s2400": ("vl-pet-large", {"plm_max_steps": 600, "max_steps": 2400}),
    "plm1200s1200": ("vl-pet-large", {"plm_max_steps": 1200}),
    "plm1200s2400": ("vl-pet-large", {"plm_max_steps": 1200, "max_steps": 2400}),
    "lr1s2400": ("vl-pet-large", {"lr_scale": 1.0, "max_steps": 2400}),
    "lr1s1200": ("vl-pet-large", {"lr_scale": 1.0}),
    "lora-s2400": ("lora", {"max_steps": 2400}),
    "vl-adapter-s2400": ("vl-adapter", {"max_steps": 2400}),
    "middlex-s2400": ("vl-pet-middlex", {"max_steps": 2400}),
    "full-s1200": ("full", {}),
    # the tuning seed (module init and batch order; data and PLM stay those of seed 0)
    **{f"seed{k}s1200": ("vl-pet-large", {"seed": k}) for k in (1, 2, 3)},
    **{f"seed{k}s2400": ("vl-pet-large", {"seed": k, "max_steps": 2400}) for k in (1, 2, 3)},
    **{f"full-seed{k}s2400": ("full", {"seed": k, "max_steps": 2400}) for k in (1, 2)},
    # a smaller PLM (d_model 128 or 192, FFN 4x; 2+2 layers): cheaper steps, so more of them fit the CPU budget
    **{f"d128s{n}": ("vl-pet-large", {"plm_model": _D128, "max_steps": n}) for n in (1200, 2400, 3600)},
    **{f"d128seed{k}s3600": ("vl-pet-large", {"plm_model": _D128, "max_steps": 3600, "seed": k}) for k in (1, 2)},
    "d128L2s3600": ("vl-pet-large", {"plm_model": {**_D128, "encoder_layers": 2, "decoder_layers": 2},
                                     "max_steps": 3600}),
    **{f"d192s{n}": ("vl-pet-large", {"plm_model": _D192, "max_steps": n}) for n in (2400, 3600)},
    "d128-full-s2400": ("full", {"plm_model": _D128, "max_steps": 2400}),
    # d_model 192 (the first sweep's best): seeds, steps, 2+2 layers, 2x2 visual tokens, lr, d_model 160
    **{f"d192seed{k}s3600": ("vl-pet-large", {"plm_model": _D192, "max_steps": 3600, "seed": k}) for k in (1, 2)},
    **{f"d192s{n}": ("vl-pet-large", {"plm_model": _D192, "max_steps": n}) for n in (3000, 4800)},
    "d192L2s3600": ("vl-pet-large", {"plm_model": {**_D192, "encoder_layers": 2, "decoder_layers": 2},
                                     "max_steps": 3600}),
    "d192p2s3600": ("vl-pet-large", {"plm_model": _D192, "visual_pool": 2, "max_steps": 3600}),
    "d192lr4.5s3600": ("vl-pet-large", {"plm_model": _D192, "lr_scale": 4.5, "max_steps": 3600}),
    "d160s3600": ("vl-pet-large", {"plm_model": {"d_model": 160, "encoder_ffn_dim": 640, "decoder_ffn_dim": 640},
                                   "max_steps": 3600}),
    # 2026-11-26, second session: more training images. "v3900" = VQA on 3,900 easy-VQA train images
    # (37.6k questions; captions and the pair task keep the 1,000-image pool, so VQA takes ~80% of the
    # steps of the paper's size-proportional schedule); "tr3900" = all three tasks on 3,900 images
    **{f"v3900s{n}": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": n}) for n in (1200, 1800, 2400)},
    **{f"v3900seed{k}s{n}": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": n, "seed": k})
       for k in (1, 2) for n in (1200, 2400)},
    "v3900p1s1200": ("vl-pet-large", {"n_vqa_train_images": 3900, "visual_pool": 1}),
    "full-v3900s1200": ("full", {"n_vqa_train_images": 3900}),
    "tr3900s1200": ("vl-pet-large", {"n_train_images": 3900}),
    "tr3900vqa2400": ("vl-pet-large", {"n_train_images": 3900, "tasks": ("vqa",), "max_steps": 2400}),
    "tr3900vqa4000": ("vl-pet-large", {"n_train_images": 3900, "tasks": ("vqa",), "max_steps": 4000}),
    "vqa4000": ("vl-pet-large", {"tasks": ("vqa",), "max_steps": 4000}),
    "d192v3900s2400": ("vl-pet-large", {"plm_model": _D192, "n_vqa_train_images": 3900, "max_steps": 2400}),
    # full fine-tuning leaves the prior at 1,200 steps with v3900 (97.1%), VL-PET-large does not: lr, a longer
    # pretrained PLM, batch, other PET methods, VQA alone
    "v3900lr1s2400": ("vl-pet-large", {"n_vqa_train_images": 3900, "lr_scale": 1.0, "max_steps": 2400}),
    "v3900lr6s1200": ("vl-pet-large", {"n_vqa_train_images": 3900, "lr_scale": 6.0}),
    **{f"v3900plm1200s{n}": ("vl-pet-large", {"n_vqa_train_images": 3900, "plm_max_steps": 1200, "max_steps": n})
       for n in (1200, 2400)},
    "v3900bs64s1200": ("vl-pet-large", {"n_vqa_train_images": 3900, "batch_size": 64}),
    "v3900s3600": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": 3600}),
    "tr3900vqa1200": ("vl-pet-large", {"n_train_images": 3900, "tasks": ("vqa",)}),
    **{f"{m}-v3900s1200": (m, {"n_vqa_train_images": 3900}) for m in ("lora", "vl-adapter", "vl-pet-middlex")},
    "full-v3900s600": ("full", {"n_vqa_train_images": 3900, "max_steps": 600}),
    "full-v3900seed1s1200": ("full", {"n_vqa_train_images": 3900, "seed": 1}),
    # "bal" = the VQA train questions' yes/no answers balanced per template (build_data.balance_yes_no), as
    # VQAv2 and GQA are balanced against language priors; val and test questions unchanged
    **{f"bal{_seed(k)}s1200": ("vl-pet-large", {"balance_vqa_train": True, "seed": k})
       for k in (0, 1, 2)},
    "bals2400": ("vl-pet-large", {"balance_vqa_train": True, "max_steps": 2400}),
    **{f"v{n}bal{_seed(k)}s1200": ("vl-pet-large", {"n_vqa_train_images": n,
                                                                        "balance_vqa_train": True, "seed": k})
       for n, ks in ((3900, (0, 1, 2)), (2000, (0, 1))) for k in ks},
    "v3900bals800": ("vl-pet-large", {"n_vqa_train_images": 3900, "balance_vqa_train": True, "max_steps": 800}),
    **{f"{m}-v3900bals1200": (m, {"n_vqa_train_images": 3900, "balance_vqa_train": True})
       for m in ("full", "lora", "vl-adapter")},
    # how reliable full fine-tuning's escape is, and what VL-PET-large needs with v3900
    **{f"full-v3900seed{k}s1200": ("full", {"n_vqa_train_images": 3900, "seed": k}) for k in (2, 3)},
    **{f"v3900seed{k}s3600": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": 3600, "seed": k})
       for k in (1, 2)},
    "v3900plm1200s3600": ("vl-pet-large", {"n_vqa_train_images": 3900, "plm_max_steps": 1200, "max_steps": 3600}),
    "v3900plm1200seed1s2400": ("vl-pet-large", {"n_vqa_train_images": 3900, "plm_max_steps": 1200,
                                                "max_steps": 2400, "seed": 1}),
    "tr3900vqaseed1s2400": ("vl-pet-large", {"n_train_images": 3900, "tasks": ("vqa",), "max_steps": 2400,
                                             "seed": 1}),
    **{f"{m}v3900bals2400": (mm, {"n_vqa_train_images": 3900, "balance_vqa_train": True, "max_steps": 2400})
       for m, mm in (("", "vl-pet-large"), ("full-", "full"))},
    # a PLM whose text also holds text-only scenes with questions and answers (corpus.scene_documents):
    # "sc25p1200" = 25% scene documents, 25% demo text, 50% English, 1,200 denoising steps
    **{f"sc{f}p{p}{d}s{n}": ("vl-pet-large", {"plm_train": {"copy_warmup_steps": 90, "scene_fraction": f / 100,
                                                          "demo_fraction": 0.25},
                                            "plm_max_steps": p, "max_steps": n,
                                            **({"n_vqa_train_images": 3900} if d else {})})
       for f, p, d, n in ((25, 300, "", 1200), (25, 1200, "", 1200), (25, 1200, "v3900", 1200),
                          (25, 1200, "v3900", 2400), (25, 2400, "v3900", 1200), (25, 2400, "v3900", 2400),
                          (50, 2400, "v3900", 1200), (50, 2400, "v3900", 2400), (50, 1200, "v3900", 2400))},
    # 2026-11-26, third session: does the PET side need more frozen attention heads ("h8", "h16": 8 or 16 heads
    # of the d_model-256 PLM, same FLOPs), deeper frozen stacks ("L6": 6+6 layers), or larger modules ("r96":
    # r and r_g as in BART-base instead of scaled to d_model, via "r_ref" = the width the preset is scaled
    # from); and does VQA alone ever learn the colour questions given many more steps
    **{f"h{h}v3900s{n}": ("vl-pet-large", {"plm_model": _heads(h), "n_vqa_train_images": 3900, "max_steps": n})
       for h, n in ((8, 1200), (8, 2400), (16, 2400))},
    "h8seed1v3900s2400": ("vl-pet-large", {"plm_model": _heads(8), "n_vqa_train_images": 3900, "max_steps": 2400,
                                           "seed": 1}),
    "h8s1200": ("vl-pet-large", {"plm_model": _heads(8)}),
    "full-h8v3900s1200": ("full", {"plm_model": _heads(8), "n_vqa_train_images": 3900}),
    **{f"r96v3900s{n}": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": n, "r_ref": 256})
       for n in (1200, 2400)},
    "r96seed1v3900s2400": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": 2400, "r_ref": 256,
                                            "seed": 1}),
    "h8r96v3900s2400": ("vl-pet-large", {"plm_model": _heads(8), "n_vqa_train_images": 3900, "max_steps": 2400,
                                         "r_ref": 256}),
    "L6v3900s2400": ("vl-pet-large", {"plm_model": {"encoder_layers": 6, "decoder_layers": 6},
                                      "n_vqa_train_images": 3900, "max_steps": 2400}),
    "tr3900vqa6000": ("vl-pet-large", {"n_train_images": 3900, "tasks": ("vqa",), "max_steps": 6000}),
    "tr3900vqaseed1s6000": ("vl-pet-large", {"n_train_images": 3900, "tasks": ("vqa",), "max_steps": 6000,
                                             "seed": 1}),
    "tr3900vqabs8s6000": ("vl-pet-large", {"n_train_images": 3900, "tasks": ("vqa",), "max_steps": 6000,
                                           "batch_size": 8}),
    "vqa6000": ("vl-pet-large", {"tasks": ("vqa",), "max_steps": 6000}),
    "v3900s7500": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": 7500}),
    # v3900s7500 learns the colour questions by its first epoch's end (step 2,936, val 98.6%) while its lr is
    # still high; v3900s3600 decays it sooner and does not: the demo's three tasks with a constant lr after
    # the warm-up ("c"), how many steps, seeds, a larger lr, one visual token
    **{f"cv3900{_seed(k)}s{n}": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": n,
                                                                     "seed": k, "train": {"lr_schedule": "constant"}})
       for n, ks in ((1500, (0, 1, 2)), (2000, (0, 1, 2)), (2500, (0, 1))) for k in ks},
    **{f"cv3900lr4.5{_seed(k)}s1500": ("vl-pet-large", {
        "n_vqa_train_images": 3900, "max_steps": 1500, "lr_scale": 4.5, "seed": k,
        "train": {"lr_schedule": "constant"}}) for k in (0, 1)},
    **{f"v3900{_seed(k)}s5000": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": 5000,
                                                                     "seed": k}) for k in (0, 1, 2)},
    "cv3900p1s2000": ("vl-pet-large", {"n_vqa_train_images": 3900, "max_steps": 2000, "visual_pool": 1,
                                       "train": {"lr_schedule": "constant"}}),
    # which weights full fine-tuning must change: LoRA at full rank (r = d_model = 256, alpha = r) on every
    # attention projection ("all": encoder self, decoder self and cross, q k v o) or on the encoder's only
    **{f"lora-{where}r256{_seed(k)}v3900s1200": (
        "lora", {"n_vqa_train_images": 3900, "seed": k,
                 "lora": {"placements": tuple(f"{sub}.{p}" for sub in subs for p in "qkvo"), "r": 256, "alpha": 256}})
       for where, subs, ks in (("all", ("encoder.self_attn", "decoder.self_attn", "decoder.cross_attn"), (0, 2)),
                               ("enc", ("encoder.self_attn",), (0,)))
       for k in ks},
}


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """A configuration's overrides -> (DemoSettings fields, train_one keywords): "tasks" (a subset of the
    demo's), "seed" (the tuning seed; data and PLM stay seed 0's), "r_ref" (module sizes scaled from this width
    instead of 768), "lora" (LoraSpec fields set after the scaling) and "train" (TrainConfig fields) go to
    ``vlpet.demo.run.train_one``, everything else is a DemoSettings field."""
    from vlpet.demo import run as demo

    fields = {k: v for k, v in overrides.items() if k not in ("tasks", "seed", "train", "r_ref", "lora")}
    extra = {"tasks": tuple(overrides.get("tasks", demo.DEMO_TASKS)), "seed": overrides.get("seed", 0),
             "r_ref": overrides.get("r_ref", 768), "lora": overrides.get("lora"), **overrides.get("train", {})}
    return fields, extra


def _settings(quick: bool, overrides: dict):
    from vlpet.demo import run as demo

    return dataclasses.replace(demo.QUICK if quick else demo.DemoSettings(), **overrides)


def _shared(cache: Path, s) -> tuple[Path, Path]:
    """The data set and the PLM of settings ``s``: built on the first call, read from the cache after."""
    from vlpet.demo import run as demo
    from vlpet.demo.pretrain import pretrain_demo_plm

    data_root = demo.prepare_data(cache, s, 0, progress=False)
    plm = pretrain_demo_plm(cache, seed=0, progress=False, model_config=s.plm_model, train_config=s.plm_train,
                            max_steps=s.plm_max_steps)
    return data_root, Path(plm)


def probe_scene_qa(plm: Path, n: int = 400, seed: int = 1) -> dict:
    """Does the PLM answer a question about a text scene? "<caption> <question> <mask>." -> greedy
    reconstruction; the word after the question in it must be the answer (corpus.answer_for)."""
    import random

    import torch
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from vlpet.demo.corpus import scene_documents

    tok = AutoTokenizer.from_pretrained(plm)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = BartForConditionalGeneration.from_pretrained(plm).eval().to(dev)
    rng = random.Random(seed)
    docs = scene_documents(seed=seed + 100)  # other draws than the pretraining text's (seed 0)
    hits: dict = {}
    for doc in rng.sample(docs, n):
        j = rng.randrange(1, len(doc))
        q, ans = doc[j].rsplit(" ", 1)
        ans = ans.rstrip(".")
        kind = "other" if q.startswith("what") else "yes/no colour" if "shape" in q else "yes/no shape"
        ids = tok(f"{doc[0]}. {q} <mask>.", return_tensors="pt").input_ids.to(dev)
        with torch.no_grad():
            out = tok.decode(model.generate(ids, max_new_tokens=48, num_beams=1, do_sample=False)[0],
                             skip_special_tokens=True)
        after = out.split(q, 1)[1].split() if q in out else []
        got = after[0].strip(".") if after else ""
        h = hits.setdefault(kind, [0, 0])
        h[0] += got == ans
        h[1] += 1
    return {k: round(100 * a / b, 1) for k, (a, b) in sorted(hits.items())} | {"n": n}


def run_one(name: str, cache: Path, out: Path, runs: Path, quick: bool) -> None:
    import torch

    from vlpet.demo import run as demo

    method, overrides = CONFIGS[name]
    fields, extra = split_overrides(overrides)
    s = _settings(quick, fields)
    data_root, plm = _shared(cache, s)
    seed = extra.pop("seed")
    r_ref, lora = extra.pop("r_ref"), extra.pop("lora")
    if r_ref != 768 or lora:  # modules sized as for a PLM of width r_ref (768: BART-base's sizes, scaled)
        scale = demo.scale_method

        def scaled(method, d_model):
            m = scale(method, d_model, ref=r_ref)
            return dataclasses.replace(m, lora=dataclasses.replace(m.lora, **lora)) if lora else m

        demo.scale_method = scaled
    r = demo.train_one(method, plm, data_root, runs / name, s, seed, progress=False, **extra)
    (row,), _ = demo.summarize({method: r})  # the demo's own row: scores, per-type split, train time
    res = {"name": name, "settings": overrides, **row,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "vqa_majority": demo.vqa_majority_baseline(data_root)}
    (out / f".{name}.json").write_text(json.dumps(res, indent=1))


def _line(r: dict) -> list:
    return [r["name"], r["method"], json.dumps(r["settings"]), r["vqa"], r["vqa_yes_no"], r["vqa_other"], r["nlvr"],
            r["caption"], r["train_seconds"]]


def _fmt(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, type=Path, help="demo cache folder (data, features, PLM)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "demo-sweep")))
    ap.add_argument("--runs", type=Path, default=None, help="run folders (default OUT/runs)")
    ap.add_argument("--only", default="", help=f"comma-separated names, in this order; known: {', '.join(CONFIGS)}")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--child-threads", type=int, default=None, help="torch CPU threads of each run")
    ap.add_argument("--quick", action="store_true", help="QUICK settings: a smoke test of the script")
    ap.add_argument("--probe", action="store_true", help="first print each PLM's text-scene QA accuracy")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    runs = a.runs or a.out / "runs"
    if a.one:
        run_one(a.one, a.cache, a.out, runs, a.quick)
        return 0
    names = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"--only: unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    a.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    # Build every data set / PLM the runs need before they start (parallel runs must not race to build one);
    # _shared returns at once for what the cache already holds
    plms: dict[Path, str] = {}  # each distinct PLM -> the first configuration that uses it
    for n in names:
        plms.setdefault(_shared(a.cache, _settings(a.quick, split_overrides(CONFIGS[n][1])[0]))[1], n)
    print(f"shared data, features and PLM ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if a.probe:
        for plm, n in plms.items():
            print(f"[probe] {plm.name} ({n}): text-scene QA accuracy {probe_scene_qa(plm)}", file=sys.stderr,
                  flush=True)

    env = dict(os.environ)
    if a.child_threads:
        env["OMP_NUM_THREADS"] = str(a.child_threads)
    cmd = [sys.executable, __file__, "--cache", str(a.cache), "--out", str(a.out), "--runs", str(runs)]
    cmd += ["--quick"] if a.quick else []
    results, failed, pending, running = {}, {}, list(names), []
    while pending or running:
        while pending and len(running) < max(1, a.parallel):
            n = pending.pop(0)
            runs.mkdir(parents=True, exist_ok=True)
            log = open(runs / f"{n}.log", "w")  # next to the run folders: OUT keeps only the results
            running.append((n, log, subprocess.Popen(cmd + ["--one", n], stdout=log, stderr=subprocess.STDOUT,
                                                     env=env)))
        time.sleep(1)
        for item in list(running):
            n, log, p = item
            if p.poll() is None:
                continue
            running.remove(item)
            log.close()
            res_file = a.out / f".{n}.json"
            if p.returncode == 0 and res_file.exists():
                results[n] = json.loads(res_file.read_text())
                res_file.unlink()
                row = _line(results[n])
                print(f"[done] {n}: vqa {_fmt(row[3])} (yes/no {_fmt(row[4])}, other {_fmt(row[5])}), "
                      f"pair {_fmt(row[6])}, CIDEr {_fmt(row[7])}, {row[8]} s", file=sys.stderr, flush=True)
            else:
                tail = (runs / f"{n}.log").read_text()[-2000:]
                failed[n] = f"exit {p.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
                print(f"[failed] {n}: see {runs / f'{n}.log'}\n{tail}", file=sys.stderr, flush=True)
            (a.out / "demo_sweep.json").write_text(json.dumps({"results": results, "failed": failed}, indent=1))
    head = ["config", "method", "settings", "easy-VQA", "yes/no", "other", "pair T/F", "CIDEr", "train s"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for n in names:
        if n in results:
            print("| " + " | ".join(_fmt(x) for x in _line(results[n])) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
