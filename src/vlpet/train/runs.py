"""`vlpet evaluate` and `vlpet predict` on a run folder or an adapter folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..backbones.attention import preferred_attention
from ..checkpoint import CONFIG_NAME, atomic_write_bytes, atomic_write_json
from ..data.tasks import TASKS as IMAGE_TASKS
from ..data.tasks import VIDEO_TASKS, is_video_task, task_names
from ..errors import CheckpointError, ConfigError
from ..frozen_precision import apply_frozen_dtype
from .evaluate import evaluate_model, predict_task, table_row


def _is_video_adapter(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / CONFIG_NAME).read_text()).get("visual", {}).get("video"))
    except (OSError, ValueError, AttributeError):
        return False


def _mask_frames(run: dict, unmasked_frames: bool | None) -> bool:
    """Video: mask zero-padded frames unless the run (or the caller) chose the official unmasked input."""
    return not (unmasked_frames or run.get("mask_padded_frames") is False)


def _resolve(checkpoint) -> tuple[dict, list[tuple[str, Path]]]:
    """(run config or {}, [(label, adapter folder), ...])."""
    path = Path(checkpoint)
    if (path / "run_config.json").is_file():
        try:
            run = json.loads((path / "run_config.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{path / 'run_config.json'}: not a readable run config ({exc})") from exc
        if not isinstance(run, dict):
            raise CheckpointError(f"{path / 'run_config.json'}: expected a JSON object, got {type(run).__name__}")
        folders = [(w, path / f"adapter-{w}") for w in ("last", "best") if (path / f"adapter-{w}" / CONFIG_NAME).is_file()]
        if not folders:
            raise CheckpointError(f"{path}: the run has no finished adapter yet (adapter-last/ or adapter-best/); "
                                  f"an interrupted run continues with `vlpet train --resume --output {path} ...`")
        return run, folders
    if (path / CONFIG_NAME).is_file():
        return {}, [("adapter", path)]
    raise CheckpointError(f"{path}: neither a vlpet run folder (run_config.json) nor an adapter folder ({CONFIG_NAME})")


def _load(folder: Path, backbone: str | None, device):
    from ..backbones.loading import load_tokenizer
    from ..model import VLModel

    model = VLModel.from_pretrained(folder, backbone=backbone).to(device)
    if model.tokenizer is None:
        model.tokenizer = load_tokenizer(backbone or model.backbone_name, required=True)
    model.eval()
    return model


def _specs(tasks, model, run: dict):
    from ..data.tasks import get_task_spec

    return {t: get_task_spec(t, use_prompts=model.method.task_prompts,
                             official_gqa_typo=run.get("official_gqa_typo", False),
                             caption_no_repeat_ngram_size=run.get("caption_no_repeat_ngram_size", 0)) for t in tasks}


def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _native_kwargs(model, run: dict, image_root, image_cache: bool | None, dev, progress: bool) -> dict:
    """evaluate_model's raw-image arguments for a VLM (--image-root, else the run's), with the run's feature cache."""
    if not getattr(model, "native_inputs", False):
        if image_root:
            raise ConfigError("--image-root: this adapter tunes a backbone that reads precomputed features "
                              "(VL-BART / VL-T5); drop --image-root")
        return {}
    from ..data.images import ImageRoot, make_collator
    from .native import cache_prepare, open_feature_cache, vlm_model_type

    image_root = image_root or run.get("image_root")
    if not image_root:
        raise ConfigError("--image-root: required for a VLM adapter (the VLM reads images)")
    if model.processor is None:
        raise ConfigError("the VLM has no processor here; pass --backbone with a folder or hub id that holds one")
    use_cache = run.get("image_cache", True) if image_cache is None else image_cache
    cache = open_feature_cache(model, use_cache, run.get("image_cache_dir"))
    return {"image_root": ImageRoot(image_root), "model_type": vlm_model_type(model),
            "collate_fn": make_collator(model.processor, vlm_model_type(model), cache), "prepare": cache_prepare(cache, model, dev, progress)}


def evaluate_checkpoint(checkpoint, data_root, split="test", tasks=None, backbone=None, batch_size=100,
                        precision="fp32", feature_dirname=None, limit=None, device=None, output=None,
                        progress=True, unmasked_frames=None, caption_metrics=None, image_root=None,
                        image_cache=None) -> dict:
    from ..data.tasks import canonical_task

    if not Path(data_root).is_dir():
        from ..data import DataError

        raise DataError(data_root, "an existing data root directory (--data-root)",
                        got="a file" if Path(data_root).exists() else "no such directory")
    run, folders = _resolve(checkpoint)
    default = VIDEO_TASKS if _is_video_adapter(folders[0][1]) else IMAGE_TASKS
    tasks = tuple(canonical_task(t) for t in (tasks or run.get("tasks") or default))
    feature_dirname = feature_dirname or run.get("feature_dirname", "data_clip_RN101_att")
    backbone = backbone or run.get("backbone")
    dev = _device(device)
    results, lines = {}, []
    for label, folder in folders:
        model = _load(folder, backbone, dev)
        apply_frozen_dtype(model, "auto", precision)  # bf16 evaluation stores it as bf16 training does
        t, n = model.parameter_counts()
        native = _native_kwargs(model, run, image_root, image_cache, dev, progress)
        with preferred_attention():
            scores, _ = evaluate_model(model, model.tokenizer, data_root, tasks, split, _specs(tasks, model, run),
                                       feat_dim=None if native else model.visual_config.feat_dim,
                                       feature_dirname=feature_dirname, **native,
                                       batch_sizes={k: batch_size for k in tasks}, device=dev, precision=precision,
                                       limit=limit, caption_metrics=tuple(caption_metrics or run.get("caption_metrics",
                                                                     ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"))),
                                       progress=progress, desc=f"{label} ", skip_missing=True,
                                       mask_padded_frames=_mask_frames(run, unmasked_frames))
        entry = {"adapter": str(folder), "method": model.method.name, "params_percent": 100 * t / n, "scores": scores}
        done = [k for k in tasks if k in scores]
        if done:
            avg, header, row = table_row(f"{model.method.name} ({label})", 100 * t / n, scores, done)
            entry["avg"] = avg
            lines = lines or [header]
            lines.append(row)
        results[label] = entry
    video_captions = task_names("video", "caption")
    notes = [f"{label}: " + ", ".join(f"{t.upper()} {r['scores'][t]['single_ref/CIDEr']:.2f}" for t in video_captions
                                      if "single_ref/CIDEr" in r["scores"].get(t, {}))
             for label, r in results.items() if any("single_ref/CIDEr" in r["scores"].get(t, {}) for t in video_captions)]
    if lines and notes:  # video captioning: say which CIDEr the table holds
        lines += ["", "TVC / YC2C columns: CIDEr of one prediction per clip against all of the clip's descriptions "
                      "(multi_ref/CIDEr). The official validation's single-reference CIDEr (single_ref/CIDEr): "
                  + "; ".join(notes) + "."]
    if not any(r["scores"] for r in results.values()):
        hint = (" with labels (VALUE's test files have none: use --split val, or `vlpet predict` for submission "
                "files)") if any(is_video_task(t) for t in tasks) else ""
        raise ConfigError(f"--data-root {data_root}: none of the tasks {', '.join(tasks)} has a {split!r} split "
                          f"there{hint}")
    out = Path(output) if output else Path(checkpoint) / f"eval-{split}.json"
    atomic_write_json(out, {"split": split, "tasks": list(tasks), "results": results})
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    print(f"results: {out}")
    return results


def predict_checkpoint(checkpoint, data_root, task, output, split="test", backbone=None, batch_size=100,
                       precision="fp32", feature_dirname=None, limit=None, device=None, progress=True,
                       unmasked_frames=None, image_root=None, image_cache=None) -> Path:
    from ..data import TaskBatchLoader, build_dataset
    from ..data.tasks import canonical_task

    run, folders = _resolve(checkpoint)
    folder = folders[0][1]
    task = canonical_task(task)
    dev = _device(device)
    model = _load(folder, backbone or run.get("backbone"), dev)
    apply_frozen_dtype(model, "auto", precision)
    spec = _specs((task,), model, run)[task]
    native = _native_kwargs(model, run, image_root, image_cache, dev, progress)
    ds = build_dataset(task, split, data_root, model.tokenizer, spec=spec,
                       feat_dim=None if native else model.visual_config.feat_dim,
                       feature_dirname=feature_dirname or run.get("feature_dirname", "data_clip_RN101_att"),
                       limit=limit, mask_padded_frames=_mask_frames(run, unmasked_frames),
                       image_root=native.get("image_root"), model_type=native.get("model_type"),
                       check_features=bool(native))
    if native.get("prepare") is not None:  # None: no feature cache
        native["prepare"](ds)
    loader = TaskBatchLoader(ds, batch_size, shuffle=False, pad_id=model.tokenizer.pad_token_id, task=task,
                             collate_fn=native.get("collate_fn"))
    with preferred_attention():
        result = predict_task(model, loader, spec, model.tokenizer, dev, precision, progress=progress)
    preds = result["predictions"]
    out = Path(output)
    if is_video_task(task):  # VALUE's submission format; a folder gets VALUE's file name
        from ..data.video import value_prediction_filename, write_value_predictions

        if out.is_dir():
            out = out / value_prediction_filename(task, split)
        write_value_predictions(task, result, out)
        print(f"{len(preds)} predictions -> {out}")
        return out
    if task == "vqa":
        payload = [{"question_id": q, "answer": a} for q, a in preds.items()]
    elif task == "gqa":
        payload = [{"questionId": q, "prediction": a} for q, a in preds.items()]
    elif task == "nlvr":
        idents = result["gold"]["identifiers"]
        if out.suffix == ".csv":
            text = "".join(f"{idents[q]},{'True' if p else 'False'}\n" for q, p in preds.items())
            atomic_write_bytes(out, text.encode())
            print(f"{len(preds)} predictions -> {out}")
            return out
        payload = [{"identifier": idents[q], "prediction": "True" if p else "False"} for q, p in preds.items()]
    else:
        payload = [{"image_id": q, "caption": c} for q, c in preds.items()]
    atomic_write_json(out, payload)
    print(f"{len(preds)} predictions -> {out}")
    return out
