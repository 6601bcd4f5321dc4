"""Does the decoder-only mapping learn? (issue 20, point 4) Every decoder preset on easy-VQA, same budget.

    python benchmarks/decoder_only_easyvqa.py [--cache DIR] [--out DIR] [--quick]

One command, everything seeded (seed 0), on the CPU:

1. data: the demo's easy-VQA data set (`vlpet.demo.build_data`: VQA questions and COCO-style captions over
   the real 64x64 easy-VQA images), read as raw RGB pixels;
2. a tiny LLaVA (`LlavaForConditionalGeneration` from a config), built here in two cached stages:
   a. its LM, a small Llama, pretrained with the causal LM objective on the demo PLM's text (the demo
      corpus and its byte-level BPE tokenizer, `vlpet.demo.pretrain` / `vlpet.demo.corpus`: easy-VQA
      *train* question strings without answers, captions, statements, and English prose);
   b. its vision tower (a tiny CLIP ViT, random at first: no pretrained CLIP exists offline) and projector,
      trained to caption the *train* images of the demo's caption task with the LM frozen (LLaVA's stage-1
      alignment, here also teaching the tower to see). No VQA question or answer is used in a or b;
3. every decoder preset tuned on the VQA train split at the same budget (steps, batch, data order, seed;
   learning rate 1e-3 for the PET methods, 1e-4 for full fine-tuning, the VL-Adapter paper's ratio) through
   vlpet's API (`VLModel(hf_llava, decoder_preset(...), native_inputs=True)`, its forward with `labels=`,
   its `generate`), vision tower frozen, and scored with `vlpet.metrics.vqa_accuracy` on test questions of
   held-out easy-VQA test images; plus the frozen model with no tuning (zero-shot) as a floor, the majority
   train answer per question template (what the question alone gives, no model); plus
   vl-pet-large with the value adapter on "all" positions against the default "prefix", over extra seeds.

Prints a Markdown table and writes JSON to OUT/decoder_only_easyvqa-cpu-<date>-<commit>.json (default OUT:
benchmarks/results). `--quick`: a tiny model and a few steps (a smoke test of this script, its numbers mean
nothing). The pretrained LM / vision tower are cached under `--cache` (default $VLPET_CACHE or
~/.cache/vlpet) as `decoder-only-vlm-<hash>`, the hash covering every setting that made them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench import git_commit  # noqa: E402
from vlpet.demo.pretrain import _digest  # noqa: E402  (the demo's cache keys, same hash)
from vlpet.train.loop import seed_everything  # noqa: E402

CODE_VERSION = 1  # bump when a change alters the data, the LM, the vision tower or the tuning


@dataclasses.dataclass(frozen=True)
class Settings:
    # data (vlpet.demo.build_data)
    n_train_images: int = 1000
    n_test_images: int = 400
    questions_per_image: int = 4
    n_eval: int = 800  # test questions scored (the first n of a seeded shuffle); 0 = all
    # tokenizer / corpus (vlpet.demo.pretrain)
    vocab_size: int = 3000
    english_max_chars: int = 1_000_000
    # LM (Llama)
    width: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 512
    lm_steps: int = 600
    lm_batch: int = 32
    lm_seq: int = 48
    lm_lr: float = 2e-3
    # vision tower (CLIP ViT) + projector, stage 1
    image_size: int = 64
    patch: int = 16
    v_width: int = 128
    v_layers: int = 2
    v_heads: int = 4
    v_ffn: int = 256
    s1_steps: int = 1200
    s1_batch: int = 32
    s1_lr: float = 1e-3
    s1_train_lm: bool = True  # see build_vlm: a frozen tiny LM left the tower blind
    # tuning
    steps: int = 1000
    batch: int = 32
    lr_pet: float = 1e-3
    lr_full: float = 1e-4
    seed: int = 0
    extra_seeds: tuple[int, ...] = (1, 2)  # vl-pet-large "prefix" vs "all" only
    eval_batch: int = 100


QUICK = Settings(n_train_images=12, n_test_images=6, questions_per_image=2, n_eval=8, vocab_size=400,
                 english_max_chars=20_000, width=32, layers=1, heads=2, ffn=64, lm_steps=3, lm_batch=4,
                 lm_seq=24, image_size=32, patch=16, v_width=32, v_layers=1, v_heads=2, v_ffn=64, s1_steps=2,
                 s1_batch=4, steps=2, batch=4, extra_seeds=(1,), eval_batch=8)

#: (row name, preset, value positions or None); the zero-shot floor is added first
ROWS = (
    ("vl-pet-small", "vl-pet-small", "prefix"),
    ("vl-pet-middlex", "vl-pet-middlex", "prefix"),
    ("vl-pet-middley", "vl-pet-middley", "prefix"),
    ("vl-pet-large", "vl-pet-large", "prefix"),
    ("vl-pet-large (value: all)", "vl-pet-large", "all"),
    ("vl-adapter", "vl-adapter", None),
    ("lora", "lora", None),
    ("bitfit", "bitfit", None),
    ("full", "full", None),
)
ZERO_SHOT = "zero-shot (no tuning)"
TEXT_PRIOR = "text-only prior (no model)"

PAD, BOS, EOS = 1, 0, 2  # the demo tokenizer's ids (vlpet.demo.pretrain.SPECIAL_TOKENS)


def say(msg: str) -> None:
    print(msg, flush=True)


def _pad(seqs, value, left=False) -> torch.Tensor:
    """Token id lists -> one [n, longest] tensor, filled with ``value`` on the right (on the left: ``left``)."""
    n = max(map(len, seqs))
    out = torch.full((len(seqs), n), value)
    for i, q in enumerate(seqs):
        if left:
            out[i, n - len(q):] = torch.tensor(q)
        else:
            out[i, : len(q)] = torch.tensor(q)
    return out


def _eval_loss(model, **inputs) -> float:
    """The loss of ``model`` on ``inputs`` in eval mode without gradients; the model is left training."""
    model.eval()
    with torch.no_grad():
        out = float(model(**inputs).loss)
    model.train()
    return out


def _cached_stage(cache: Path, stage: str, key: str, log_name: str):
    """(folder, saved log, None) when the stage ``decoder-only-<stage>-<key>`` was built before; else (folder,
    None, a fresh temporary folder to build it in, moved into place by :func:`_save_stage`)."""
    folder = cache / f"decoder-only-{stage}-{key}"
    if (folder / log_name).is_file():
        say(f"[{stage}] reusing {folder}")
        return folder, json.loads((folder / log_name).read_text()), None
    tmp = cache / f".decoder-only-{stage}-{key}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    return folder, None, tmp


def _save_stage(model, log: dict, log_name: str, tmp: Path, folder: Path) -> None:
    model.save_pretrained(tmp)
    (tmp / log_name).write_text(json.dumps(log, indent=1))
    _replace(tmp, folder)


def _pretrain(model, params, opt, steps: int, peak_lr: float, next_inputs, report) -> list[float]:
    """``steps`` optimizer steps on ``model(**next_inputs()).loss`` (warm-up / decay of :func:`_lr_at`, clip 1.0);
    ``report(step, curve)`` after each. Returns the loss curve."""
    curve: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, peak_lr)
        loss = model(**next_inputs()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.item())
        report(step, curve)
    return curve


def _vqa_scores(preds: dict, test: list[dict]) -> dict:
    """VQA accuracy of ``preds`` ({qid: answer}) on ``test`` (one gold answer, given by all ten annotators)."""
    from vlpet.metrics import vqa_accuracy

    res = vqa_accuracy(preds, {r["qid"]: [r["a"]] * 10 for r in test},
                       answer_types={r["qid"]: r["atype"] for r in test})
    return {"overall": res["overall"], "yes/no": res["per_answer_type"].get("yes/no", float("nan")),
            "other": res["per_answer_type"].get("other", float("nan")), "n": res["n"]}


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def load_data(cache: Path, s: Settings) -> dict:
    """VQA train/test records, train captions and every image as a normalised [3, H, W] tensor."""
    from PIL import Image

    from vlpet.demo.build_data import build_demo_data

    root = cache / f"decoder-only-easyvqa-data-{_digest([CODE_VERSION, s.n_train_images, s.n_test_images, s.questions_per_image, s.seed])}"
    if not (root / "images.json").is_file():
        build_demo_data(root, s.n_train_images, s.n_test_images, s.seed, n_val_images=4,
                        max_questions_per_image=s.questions_per_image, nlvr_sets_per_image=0.01)
    read = lambda p: json.loads((root / p).read_text(encoding="utf-8"))  # noqa: E731
    paths = read("images.json")
    ids = sorted(paths)
    index = {k: i for i, k in enumerate(ids)}
    pix = []
    for k in ids:
        im = Image.open(paths[k]).convert("RGB")
        if im.size != (s.image_size, s.image_size):
            im = im.resize((s.image_size, s.image_size), Image.BILINEAR)
        pix.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0)
    pixels = (torch.stack(pix) - 0.5) / 0.5
    coco = read("COCO/dataset_coco.json")["images"]
    captions = [(index[im["filename"][:-4]], sent["raw"]) for im in coco
                if im["split"] in ("train", "restval") for sent in im["sentences"]]
    heldout_captions = [(index[im["filename"][:-4]], sent["raw"]) for im in coco
                        if im["split"] == "test" for sent in im["sentences"][:1]]

    def vqa(name):
        return [{"img": index[r["img_id"]], "q": r["sent"], "a": next(iter(r["label"])), "qid": r["question_id"],
                 "atype": r["answer_type"]} for r in read(f"vqa/{name}.json")]

    test = vqa("karpathy_test")
    order = list(range(len(test)))
    random.Random(f"{s.seed}-eval").shuffle(order)
    if s.n_eval:
        order = sorted(order[: s.n_eval])
    return {"root": str(root), "pixels": pixels, "captions": captions, "heldout_captions": heldout_captions,
            "train": vqa("karpathy_train"), "test": [test[i] for i in order], "n_test_all": len(test)}


# ------------------------------------------------------------------------------------------------
# the tiny LLaVA: LM pretraining, then stage-1 alignment of a vision tower + projector
# ------------------------------------------------------------------------------------------------
def _lm_batches(tok, corpus, s: Settings):
    """Causal-LM sequences of the demo PLM's training mix (half demo sentences, half English chunks)."""
    from vlpet.demo.pretrain import DEFAULT_TRAIN_CONFIG, _Sampler

    tcfg = {**DEFAULT_TRAIN_CONFIG, "seq_len": s.lm_seq, "english_max_chars": s.english_max_chars}
    sampler = _Sampler(tok, corpus, tcfg, s.seed)
    rng = np.random.default_rng(s.seed)

    def text(sents):
        return [t for j, (a, b) in enumerate(sents) for t in (a if j == 0 else b)][: s.lm_seq - 2]

    def example(split="train"):
        chunks = sampler.train_chunks if split == "train" else sampler.eval_chunks
        if split == "train" and rng.random() < 0.5 or not chunks:
            sents = sampler._demo_run(rng)
        else:
            sents = chunks[int(rng.integers(len(chunks)))]
        return [BOS, *text(sents), EOS]

    def collate(seqs):
        ids = _pad(seqs, PAD)
        labels = ids.masked_fill(ids == PAD, -100)
        return ids, (ids != PAD).long(), labels

    heldout = collate([example("eval") for _ in range(64)])
    return (lambda: collate([example() for _ in range(s.lm_batch)])), heldout


def _lr_at(step, total, peak, warmup=30):
    return peak * min(1.0, (step + 1) / warmup) * max(0.1, 1 - step / max(1, total))


LM_KEYS = ("vocab_size", "english_max_chars", "width", "layers", "heads", "ffn", "lm_steps", "lm_batch", "lm_seq",
           "lm_lr", "seed")
VISION_KEYS = ("n_train_images", "n_test_images", "questions_per_image", "image_size", "patch", "v_width", "v_layers",
               "v_heads", "v_ffn", "s1_steps", "s1_batch", "s1_lr", "s1_train_lm")


def build_lm(cache: Path, s: Settings) -> tuple[Path, dict]:
    """Stage a (cached): the demo tokenizer and a Llama pretrained with the causal LM objective on the demo text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlpet.demo.pretrain import DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, _load_corpus, _tokenizer_for
    from vlpet.train.optim import build_optimizer

    key = _digest([CODE_VERSION, {k: getattr(s, k) for k in LM_KEYS}, platform.python_version(), sys.base_prefix])
    folder, saved, tmp = _cached_stage(cache, "lm", key, "lm_log.json")
    if saved is not None:
        return folder, saved
    log: dict = {}
    t0 = time.perf_counter()
    corpus = _load_corpus(cache, s.english_max_chars, say)
    tcfg = {**DEFAULT_TRAIN_CONFIG, "vocab_size": s.vocab_size, "english_max_chars": s.english_max_chars}
    tok, _, _ = _tokenizer_for(corpus, DEFAULT_MODEL_CONFIG, tcfg, tmp)
    seed_everything(s.seed)
    lcfg = dict(vocab_size=len(tok) + 1, hidden_size=s.width, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=128,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)  # + the image token
    lm = LlamaForCausalLM(LlamaConfig(**lcfg))
    next_batch, heldout = _lm_batches(tok, corpus, s)

    def heldout_loss(m):
        return _eval_loss(m, input_ids=heldout[0], attention_mask=heldout[1], labels=heldout[2])

    def inputs():
        ids, mask, labels = next_batch()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def report(step, curve):
        if step % 100 == 0 or step == s.lm_steps - 1:
            say(f"[lm] step {step + 1}/{s.lm_steps} loss {np.mean(curve[-50:]):.3f} {time.perf_counter() - t0:.0f}s")

    log["lm_heldout_english_loss_before"] = heldout_loss(lm)
    opt = build_optimizer(lm, s.lm_lr, 0.01, fused=False, betas=(0.9, 0.98))
    curve = _pretrain(lm, list(lm.parameters()), opt, s.lm_steps, s.lm_lr, inputs, report)
    log["lm_heldout_english_loss_after"] = heldout_loss(lm)
    log["lm_train_loss_last50"] = float(np.mean(curve[-50:]))
    log["lm_time_s"] = round(time.perf_counter() - t0, 1)
    log["lm_config"] = lcfg
    _save_stage(lm, log, "lm_log.json", tmp, folder)
    return folder, log


def _replace(tmp: Path, folder: Path) -> None:
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def build_vlm(cache: Path, s: Settings, data: dict) -> tuple[Path, dict]:
    """The pretrained tiny LLaVA folder (cached) and its build log."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    lm_folder, lm_log = build_lm(cache, s)
    key = _digest([CODE_VERSION, lm_folder.name, {k: getattr(s, k) for k in VISION_KEYS}])
    folder, saved, tmp = _cached_stage(cache, "vlm", key, "build_log.json")
    if saved is not None:
        return folder, saved
    log: dict = {"note": "a TINY LLaVA built by benchmarks/decoder_only_easyvqa.py: Llama LM pretrained on ~1 MB of "
                         "offline text, CLIP-ViT tower trained from scratch on easy-VQA train captions; not a real VLM",
                 **{k: v for k, v in lm_log.items() if k != "lm_config"}}
    tok = AutoTokenizer.from_pretrained(lm_folder)
    tok.save_pretrained(tmp)
    lm = LlamaForCausalLM.from_pretrained(lm_folder)
    lcfg = lm_log["lm_config"]
    image_token = len(tok)

    # -- b. the LLaVA around it; stage 1: vision tower + projector (+ the LM unless s1_train_lm is off) caption
    # the train images
    t1 = time.perf_counter()
    seed_everything(s.seed)
    vcfg = CLIPVisionConfig(hidden_size=s.v_width, intermediate_size=s.v_ffn, num_hidden_layers=s.v_layers,
                            num_attention_heads=s.v_heads, image_size=s.image_size, patch_size=s.patch,
                            projection_dim=s.v_width)
    cfg = LlavaConfig(vision_config=vcfg.to_dict(), text_config={"model_type": "llama", **lcfg},
                      image_token_index=image_token, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    vlm = LlavaForConditionalGeneration(cfg)
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    if not s.s1_train_lm:  # LLaVA's stage 1 proper: only the new vision parts learn
        for p in vlm.model.language_model.parameters():
            p.requires_grad_(False)
        for p in vlm.lm_head.parameters():
            p.requires_grad_(False)
    n_img = (s.image_size // s.patch) ** 2
    pixels = data["pixels"]

    def caption_batch(pairs):
        seqs = [[BOS] + [image_token] * n_img + tok(" " + c, add_special_tokens=False)["input_ids"] + [EOS]
                for _, c in pairs]
        ids = _pad(seqs, PAD)
        labels = ids.masked_fill((ids == PAD) | (ids == image_token), -100)
        labels[:, 0] = -100
        return ids, (ids != PAD).long(), labels, pixels[[i for i, _ in pairs]]

    def caption_loss(pairs, shuffle=False):
        """Held-out caption loss; shuffle: each caption under another image (what the pixels are worth)."""
        ids, mask, labels, px = caption_batch(pairs)
        if shuffle:
            px = px[torch.randperm(len(px), generator=torch.Generator().manual_seed(s.seed))]
        return _eval_loss(vlm, input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)

    def inputs():
        ids, mask, labels, px = caption_batch(rng.sample(data["captions"], s.s1_batch))
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": px, "labels": labels}

    def report(step, curve):
        if step % 200 == 199 or step == s.s1_steps - 1:
            say(f"[vlm] stage 1 step {step + 1}/{s.s1_steps} caption loss {np.mean(curve[-50:]):.3f}, held-out "
                f"{caption_loss(held):.3f} (images shuffled: {caption_loss(held, shuffle=True):.3f}) "
                f"{time.perf_counter() - t1:.0f}s")

    held = data["heldout_captions"][:128]
    log["stage1_heldout_caption_loss_before"] = caption_loss(held)
    trainable = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=s.s1_lr, weight_decay=0.01)
    rng = random.Random(f"{s.seed}-stage1")
    _pretrain(vlm, trainable, opt, s.s1_steps, s.s1_lr, inputs, report)
    log["stage1_heldout_caption_loss_after"] = caption_loss(held)
    log["stage1_heldout_caption_loss_after_shuffled_images"] = caption_loss(held, shuffle=True)
    log["stage1_time_s"] = round(time.perf_counter() - t1, 1)
    log["image_tokens"] = n_img
    log["image_token_id"] = image_token
    log["n_params"] = sum(p.numel() for p in vlm.parameters())
    vlm.config.vlpet_note = log["note"]
    _save_stage(vlm, log, "build_log.json", tmp, folder)
    say(f"[vlm] saved {folder}: " + ", ".join(f"{k} {v:.3f}" for k, v in log.items() if isinstance(v, float)))
    return folder, log


# ------------------------------------------------------------------------------------------------
# tuning and scoring through vlpet
# ------------------------------------------------------------------------------------------------
def vqa_batch(recs, tok, data, n_img, image_token, with_labels=True):
    prompts = [[BOS] + [image_token] * n_img + tok(" " + r["q"], add_special_tokens=False)["input_ids"] for r in recs]
    ids = _pad(prompts, PAD, left=True)  # left padding: the answer follows the last prompt token
    mask = _pad([[1] * len(p) for p in prompts], 0, left=True)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": data["pixels"][[r["img"] for r in recs]]}
    if with_labels:
        answers = [tok(" " + r["a"], add_special_tokens=False)["input_ids"] + [EOS] for r in recs]
        out["labels"] = _pad(answers, -100)
    return out


def evaluate(model, tok, data, s, n_img, image_token) -> dict:
    model.eval()
    preds = {}
    with torch.no_grad():
        for i in range(0, len(data["test"]), s.eval_batch):
            recs = data["test"][i: i + s.eval_batch]
            b = vqa_batch(recs, tok, data, n_img, image_token, with_labels=False)
            new = model.generate(**b, max_new_tokens=4, do_sample=False, num_beams=1, eos_token_id=EOS,
                                 pad_token_id=PAD, suppress_tokens=[image_token])
            for r, row in zip(recs, new):
                preds[r["qid"]] = tok.decode(row, skip_special_tokens=True).strip()
    model.train()
    return {**_vqa_scores(preds, data["test"]), "examples": dict(list(preds.items())[:5])}


def text_prior(data) -> dict:
    """VQA accuracy of the majority train answer per question template (colour and shape words blanked): what
    a model that reads the question but never the image can reach (no model is involved)."""
    from collections import Counter

    from vlpet.demo.facts import question_template

    by_t: dict = {}
    for r in data["train"]:
        by_t.setdefault(question_template(r["q"]), Counter())[r["a"]] += 1
    overall = Counter(r["a"] for r in data["train"]).most_common(1)[0][0]
    preds = {r["qid"]: (by_t[t].most_common(1)[0][0] if (t := question_template(r["q"])) in by_t else overall)
             for r in data["test"]}
    return _vqa_scores(preds, data["test"])


def run_row(folder, tok, data, s, log, name, preset, positions, seed, steps) -> dict:
    from transformers import LlavaForConditionalGeneration

    from vlpet.decoder_only import decoder_preset
    from vlpet.model import VLModel
    from vlpet.train.optim import build_optimizer, build_scheduler

    seed_everything(seed)
    hf = LlavaForConditionalGeneration.from_pretrained(folder)
    kw = {"value_positions": positions} if positions else {}
    method = decoder_preset(preset, hf.config.text_config.hidden_size, **kw)
    model = VLModel(hf, method, None, backbone_name=str(folder), seed=seed, native_inputs=True)
    trainable, total = model.parameter_counts()
    lr = s.lr_full if preset == "full" else s.lr_pet
    n_img, image_token = log["image_tokens"], log["image_token_id"]
    losses, t0 = [], time.perf_counter()
    if steps:
        model.train()
        opt = build_optimizer(model, lr, 0.01, fused=False)
        sched = build_scheduler(opt, steps, 0.1)
        params = [p for p in model.parameters() if p.requires_grad]
        order: list[int] = []
        rng = random.Random(f"{seed}-tune")  # the same question order for every preset of one seed
        for step in range(steps):
            if len(order) < s.batch:
                perm = list(range(len(data["train"])))
                rng.shuffle(perm)
                order += perm
            recs = [data["train"][i] for i in order[: s.batch]]
            del order[: s.batch]
            loss = model(**vqa_batch(recs, tok, data, n_img, image_token)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(model, tok, data, s, n_img, image_token)
    row = {"row": name, "preset": preset if steps else None, "value_positions": positions, "seed": seed,
           "steps": steps, "batch": s.batch, "lr": lr if steps else None, "trainable": trainable, "total": total,
           "params_pct": 100.0 * trainable / total if steps else 0.0,
           "train_loss_first10": float(np.mean(losses[:10])) if losses else None,
           "train_loss_last20": float(np.mean(losses[-20:])) if losses else None,
           "vqa": {k: res[k] for k in ("overall", "yes/no", "other", "n")}, "examples": res["examples"],
           "train_time_s": round(t_train, 1), "eval_time_s": round(time.perf_counter() - t0, 1)}
    say(f"[tune] {name:28s} seed {seed}  VQA {res['overall']:6.2f} (yes/no {res['yes/no']:6.2f}, other "
        f"{res['other']:6.2f})  loss {row['train_loss_first10'] or 0:.3f} -> {row['train_loss_last20'] or 0:.3f}  "
        f"train {t_train:.0f}s eval {row['eval_time_s']:.0f}s")
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """One line per row name: mean and spread (max - min) over its seeds."""
    out = []
    for name in dict.fromkeys(r["row"] for r in rows):
        rs = [r for r in rows if r["row"] == name]
        line = {"row": name, "params_pct": rs[0]["params_pct"], "seeds": [r["seed"] for r in rs]}
        for k in ("overall", "yes/no", "other"):
            v = [r["vqa"][k] for r in rs]
            line[k] = float(np.mean(v))
            line[k + "_spread"] = float(max(v) - min(v))
        out.append(line)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| row | Params % | VQA | yes/no | other (colour, shape) | seeds |", "|---|---|---|---|---|---|"]
    for r in summary:
        def cell(k):
            return f"{r[k]:.1f}" + (f" ± {r[k + '_spread'] / 2:.1f}" if len(r["seeds"]) > 1 else "")
        lines.append(f"| {r['row']} | {r['params_pct']:.2f} | {cell('overall')} | {cell('yes/no')} | {cell('other')} | "
                     f"{','.join(map(str, r['seeds']))} |")
    return "\n".join(lines)


def _commit() -> str:
    """The commit for the file name: _bench.git_commit() (VLPET_COMMIT first), shortened, "-dirty" kept."""
    sha, _, rest = git_commit().partition("-")
    return sha[:7] + ("-" + rest if rest else "")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="cache folder (default $VLPET_CACHE or ~/.cache/vlpet)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few steps: a smoke test, not a measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    s = QUICK if a.quick else Settings()
    if a.threads:
        torch.set_num_threads(a.threads)
    from vlpet.demo.pretrain import default_cache_root

    cache = Path(a.cache).expanduser() if a.cache else default_cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a loading bar per row drowns the table
    t_start = time.perf_counter()
    data = load_data(cache, s)
    say(f"[data] {len(data['train'])} train questions, {len(data['test'])} of {data['n_test_all']} test questions "
        f"scored, {len(data['captions'])} train captions, {len(data['pixels'])} images")
    folder, log = build_vlm(cache, s, data)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)  # build_vlm saved it with the model
    rows = [run_row(folder, tok, data, s, log, ZERO_SHOT, "full", None, s.seed, 0)]
    # the floor a question-only model reaches (easy-VQA's yes/no answers follow the template)
    rows.append({"row": TEXT_PRIOR, "preset": None, "value_positions": None, "seed": s.seed, "steps": 0,
                 "params_pct": 0.0, "vqa": text_prior(data)})
    for name, preset, pos in ROWS:
        rows.append(run_row(folder, tok, data, s, log, name, preset, pos, s.seed, s.steps))
    for seed in s.extra_seeds:
        for name, preset, pos in ROWS:
            if preset == "vl-pet-large":
                rows.append(run_row(folder, tok, data, s, log, name, preset, pos, seed, s.steps))
    summary = summarize(rows)
    text = table(summary)
    print(text)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    result = {
        "meta": {"command": "python benchmarks/decoder_only_easyvqa.py" + (" --quick" if a.quick else ""),
                 "quick": a.quick, "date": date, "commit": _commit(), "machine": platform.machine(),
                 "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version(), "wall_s": round(time.perf_counter() - t_start, 1),
                 "data": data["root"], "vlm": str(folder)},
        "settings": dataclasses.asdict(s), "vlm_build": log, "summary": summary, "rows": rows, "table": text,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decoder_only_easyvqa-cpu-{date}-{result['meta']['commit']}{'-quick' if a.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    say(f"wrote {path} ({result['meta']['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
