"""Evaluation of the four image-text tasks (spec §3.7, §5) and the Table-2 style summary.

VQA / GQA: greedy generation; NLVR2: classification by the LM head's first-token logits of
"true" vs "false"; captions: beam search. Every generation setting comes from the task spec.

Video tasks (spec §3.9, §5): TVQA / How2QA accuracy of the generated "a<k>" (an unparsable answer
counts as wrong and is logged); TVC / YC2C caption metrics twice, ``multi_ref/*`` (all references
of a clip) and ``single_ref/*`` (the official validation's one reference per description); the
main number is ``multi_ref/CIDEr``. VALUE's test files carry no labels: they are predicted, not
scored (see ``vlpet.data.video.score_video_task``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.sampler import TaskBatchLoader
from ..data.tasks import TaskSpec, class_token_ids, is_video_task, task_entry


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def classification_prefix(tokenizer, word: str) -> list[int]:
    """Decoder tokens that precede a class word's first token in a training target (BART: [<s>];
    T5: none), so that classification reads the logits where training put that token."""
    with_special = tokenizer(word)["input_ids"]
    first = tokenizer(word, add_special_tokens=False)["input_ids"][0]
    return list(with_special[: with_special.index(first)])


@torch.no_grad()
def predict_task(model, loader: TaskBatchLoader, spec: TaskSpec, tokenizer, device: torch.device,
                 precision: str = "fp32", progress: bool = True, desc: str | None = None) -> dict[str, Any]:
    """Predictions keyed by question/image id, plus the gold data needed to score them."""
    model.eval()
    preds: dict[Any, Any] = {}
    gold: dict[str, dict] = {"label_dicts": {}, "labels": {}, "refs": {}, "identifiers": {}, "logits": {},
                             "answers": {}, "img_ids": {}}
    cls_ids = class_token_ids(spec, tokenizer) if spec.classes else None
    prefix = None
    if cls_ids is not None and not _decoder_only(model):  # decoder-only: no decoder start token (see below)
        start = decoder_start_token_id(model)
        prefix = [start] + classification_prefix(tokenizer, spec.classes[0])
    bar = tqdm(range(len(loader)), desc=desc or f"eval {spec.name}", disable=not progress, leave=False)
    for i in bar:
        batch = loader.get_batch(0, i)
        qids = batch["question_ids"]
        b = to_device(batch, device)
        vmask = b.get("vis_attention_mask")  # video: padded frames
        with autocast(device, precision):
            if batch.get("native"):  # a VLM read through its own inputs (vlpet.data.images)
                _predict_native(model, b, qids, spec, tokenizer, cls_ids, prefix, preds, gold)
            elif cls_ids is not None:
                dec = torch.tensor([prefix] * len(qids), device=device)
                out = model(b["input_ids"], b["attention_mask"], vis_feats=b["vis_feats"], decoder_input_ids=dec,
                            vis_attention_mask=vmask, task=spec.name)
                logits = out.logits[:, -1, cls_ids].float()
                for q, row in zip(qids, logits.tolist()):
                    preds[q] = int(row[1] > row[0])  # true iff logit[true] > logit[false]
                    gold["logits"][q] = row
            else:
                ids = model.generate(b["input_ids"], b["attention_mask"], vis_feats=b["vis_feats"], task=spec.name,
                                     vis_attention_mask=vmask, **spec.decode_kwargs())
                texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
                for q, t in zip(qids, texts):
                    preds[q] = t.strip()
        for k, q in enumerate(qids):
            if "label_dicts" in batch:
                gold["label_dicts"][q] = batch["label_dicts"][k]
            if "labels" in batch:
                gold["labels"][q] = int(batch["labels"][k])
                gold["identifiers"][q] = batch["identifiers"][k]
            if spec.name == "caption":
                gold["refs"][q] = list(batch["targets"][k])
            elif getattr(spec, "video", False):
                gold["img_ids"][q] = batch["img_ids"][k]
                if batch["targets"][k]:  # VALUE test files have no answers / descriptions
                    key = "refs" if task_entry(spec.name).kind == "caption" else "answers"
                    gold[key][q] = list(batch["targets"][k]) if key == "refs" else batch["targets"][k][0]
    return {"predictions": preds, "gold": gold}


def _decoder_only(model) -> bool:
    """A decoder-only VLM (its `arch` entry says so); False for anything without an architecture entry."""
    return bool(getattr(getattr(model, "arch", None), "decoder_only", False))


def decoder_start_token_id(model) -> int:
    """The token a decoder starts from: the generation config's, else the (language model's) config's."""
    backbone = getattr(model, "backbone", model)
    for cfg in (getattr(backbone, "generation_config", None), getattr(backbone, "config", None),
                getattr(getattr(backbone, "config", None), "text_config", None)):
        value = getattr(cfg, "decoder_start_token_id", None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(backbone).__name__}: no decoder_start_token_id in its generation config or config")


def _predict_native(model, b, qids, spec, tokenizer, cls_ids, prefix, preds, gold) -> None:
    from ..data.images import native_inputs

    from .native import decode_settings

    inputs = native_inputs(b)
    if cls_ids is not None:
        if _decoder_only(model):
            # the logits after the prompt, at each class word's first answer token as the collator tokenised it
            # after that prompt (class_token_ids: a word-initial space can change the token per family)
            last = model(**inputs, task=spec.name).logits[:, -1].float()
            logits = last.gather(1, b["class_token_ids"].to(last.device))
        else:
            dec = torch.tensor([prefix] * len(qids), device=b["input_ids"].device)
            logits = model(**inputs, decoder_input_ids=dec, task=spec.name).logits[:, -1, cls_ids].float()
        for q, row in zip(qids, logits.tolist()):
            preds[q] = int(row[1] > row[0])  # true iff logit[true] > logit[false]
            gold["logits"][q] = row
        return
    ids = model.generate(**inputs, task=spec.name, **decode_settings(model, spec))
    for q, t in zip(qids, tokenizer.batch_decode(ids, skip_special_tokens=True)):
        preds[q] = t.strip()


def score_task(task: str, result: dict[str, Any], vqa_annotations=None,
               caption_metrics=("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")) -> dict[str, float]:
    from .. import metrics as M

    preds, gold = result["predictions"], result["gold"]
    if task == "vqa":
        scores = {"topk": M.vqa_topk_score(preds, gold["label_dicts"])}
        if vqa_annotations is not None and all(q in vqa_annotations.answers for q in preds):
            acc = M.vqa_accuracy(preds, vqa_annotations.answers, answer_types=vqa_annotations.answer_types)
            scores["accuracy"] = acc["overall"]
            for t, v in acc.get("per_answer_type", {}).items():
                scores[f"accuracy/{t}"] = v
        else:  # no official annotations for these questions: the soft-label score
            scores["accuracy"] = scores["topk"]
        return scores
    if task == "gqa":
        return {"accuracy": M.gqa_accuracy(preds, gold["label_dicts"])}
    if task == "nlvr":
        s = M.nlvr2_scores(preds, gold["labels"], group_of=gold["identifiers"])
        return {"accuracy": s["accuracy"], "consistency": s["consistency"]}
    if task == "caption":
        return dict(M.caption_scores(preds, gold["refs"], metrics=caption_metrics))
    if is_video_task(task):
        from ..data.video import score_video_task

        return score_video_task(task, result, caption_metrics)
    raise ValueError(f"no scorer for task {task!r}")


def load_vqa_annotations_for(data_root: str | Path):
    """Merge the official train2014 / val2014 annotations that exist under the data root.

    The real files are hundreds of MB and every validation and test pass scores against them, so the
    parsed result is kept until the files change (callers only read it)."""
    from ..data.layout import VLAdapterLayout

    layout = VLAdapterLayout(Path(data_root))
    paths = [layout.vqa_annotations(w) for w in ("train", "val")]
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths if p.is_file())
    return _merged_vqa_annotations(stamp)


@functools.lru_cache(maxsize=2)
def _merged_vqa_annotations(stamp: tuple):
    from ..metrics import VQAAnnotations, load_vqa_annotations

    merged = None
    for path, _, _ in stamp:
        ann = load_vqa_annotations(path)
        if merged is None:
            merged = VQAAnnotations(dict(ann.answers), dict(ann.answer_types), dict(ann.question_types))
        else:
            merged.answers.update(ann.answers)
            merged.answer_types.update(ann.answer_types)
            merged.question_types.update(ann.question_types)
    return merged


def table_row(label: str, params_percent: float | None, task_scores: dict[str, dict[str, float]],
              tasks) -> tuple[float, str, str]:
    """(Avg, Markdown header, Markdown row) in the layout of the paper's Table 2."""
    values = [task_scores[t][task_entry(t).metric] for t in tasks]
    avg = sum(values) / len(values)
    header = "| Method | Params % | " + " | ".join(task_entry(t).column or t for t in tasks) + " | Avg |"
    sep = "|" + "---|" * (len(tasks) + 3)
    pp = f"{params_percent:.2f}" if params_percent is not None else "-"
    row = f"| {label} | {pp} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {avg:.2f} |"
    return avg, header + "\n" + sep, row


def evaluate_model(model, tokenizer, data_root, tasks, split: str, specs: dict, *, feat_dim: int,
                   feature_dirname: str, batch_sizes: dict, device, precision: str = "fp32",
                   limit: int | None = None, caption_metrics=("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"),
                   progress: bool = True, desc: str = "", skip_missing: bool = False, mask_padded_frames: bool = True,
                   image_root=None, model_type: str | None = None, collate_fn=None, prepare=None):
    """Scores and predictions of every task on one split: ({task: scores}, {task: predictions}).

    VLMs on raw images: ``image_root`` and ``model_type`` select the image datasets, ``collate_fn`` is the
    :class:`~vlpet.data.images.NativeCollator` and ``prepare(dataset)`` runs before a task is predicted
    (it fills the image feature cache)."""
    from ..data import DataError, build_dataset

    ann = load_vqa_annotations_for(data_root) if "vqa" in tasks else None
    scores, preds = {}, {}
    for t in tasks:
        try:
            ds = build_dataset(t, split, data_root, tokenizer, spec=specs[t], feat_dim=feat_dim,
                               feature_dirname=feature_dirname, limit=limit, mask_padded_frames=mask_padded_frames,
                               image_root=image_root, model_type=model_type)
        except DataError as exc:
            if not skip_missing or os.path.isfile(exc.path):  # skip a missing split, never a broken file
                raise
            print(f"vlpet: skipping {t} {split}: {exc}")
            continue
        if image_root is not None:
            ds.check_images()  # outside the try: a missing image is an error, never a skipped task
        if prepare is not None:
            prepare(ds)
        loader = TaskBatchLoader(ds, batch_sizes[t], shuffle=False, pad_id=tokenizer.pad_token_id, task=t,
                                 collate_fn=collate_fn)
        result = predict_task(model, loader, specs[t], tokenizer, device, precision, progress=progress,
                              desc=f"{desc}{t} {split}")
        task_scores = score_task(t, result, ann, caption_metrics)
        preds[t] = result
        if not task_scores and getattr(specs[t], "video", False):  # VALUE test split: no public labels
            print(f"vlpet: {t} {split}: no labels in the split, predictions only (VALUE scores test predictions "
                  f"on its server: `vlpet predict`; use --split val for local scores)")
            continue
        scores[t] = task_scores
    return scores, preds


@torch.no_grad()
def collect_gates(model, batches: dict[str, dict], device, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Mean G of every gated sub-layer over one batch per task (for the heatmap)."""
    if not model.gated_modules():
        return {}
    was_training = model.training
    model.eval()
    model.record_gates(True)
    acc: dict[str, list[torch.Tensor]] = {}
    try:
        for task, batch in batches.items():
            b = to_device(batch, device)
            with autocast(device, precision):
                if batch.get("native"):
                    from ..data.images import native_inputs

                    model(**native_inputs(b), labels=b["target_ids"], task=task)
                else:
                    model(b["input_ids"], b["attention_mask"], vis_feats=b["vis_feats"], labels=b["target_ids"],
                          task=task, vis_attention_mask=b.get("vis_attention_mask"))
            for k, g in model.gate_values().items():
                acc.setdefault(k, []).append(g.float().mean().cpu())
    finally:
        model.record_gates(False)
        model.train(was_training)
    return {k: torch.stack(v).mean() for k, v in acc.items()}
