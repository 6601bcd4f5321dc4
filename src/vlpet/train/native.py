"""`vlpet train --image-root`: the multitask recipe on a VLM that reads raw images (Florence-2, BLIP-2,
InstructBLIP with a T5 language model; the decoder-only LLaVA, Idefics3 / SmolVLM, Qwen2-VL, PaliGemma through
:mod:`vlpet.data.decoder_prompts`), through the VLM's own processor.

Everything but the inputs is the trainer of :mod:`vlpet.train.loop`: the same task sampling, batch
sizes, optimizer, schedule, checkpoints, resume, validation, test and error handling. The frozen
image features are cached on disk (:mod:`vlpet.data.image_cache`) when the part of the image path
before the first trainable module is frozen; ``--no-image-cache`` runs the vision tower every step.
Decoder-only VLMs have no cache: their vision tower runs every step (a log line says so;
``--image-cache-dir`` is a one-line error).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .evaluate import _decoder_only

@dataclasses.dataclass
class NativeSetup:
    """What the trainer keeps for raw images (``trainer.native``)."""

    image_root: Any
    model_type: str
    cache: Any  # ImageFeatureCache or None
    collate: Any  # NativeCollator


def vlm_model_type(model) -> str:
    backbone = getattr(model, "backbone", model)
    return str(getattr(model, "model_type", None) or backbone.config.model_type)


def image_path_frozen(model) -> bool:
    """True when no trainable tensor lies in the part of the image path that ``frozen_image_features`` runs."""
    arch_parts = getattr(getattr(model, "arch", None), "vision_parts", None)
    if not arch_parts:  # not a VLM of the architecture table: nothing known to cache
        return False
    # the architecture table's frozen vision parts, e.g. "model.vision_tower"
    backbone = getattr(model, "backbone", model)
    return not any(p.requires_grad for part in arch_parts
                   for name, p in backbone.named_parameters() if name == part or name.startswith(part + "."))


def load_vlm(backbone: str, method, seed: int, overrides: dict | None = None, config_arch=None):
    """`VLModel.build` of a VLM (encoder-decoder or decoder-only) with its processor; ConfigError, before the
    weights are built, when the backbone reads features or has no processor. `config_arch`: the backbone's
    (config, arch) when the caller has read them already (`_backbone_arch`)."""
    from ..backbones.loading import BUILTIN_BACKBONES
    from ..model import VLModel

    # the config alone: wrong backbones fail before a weight is built
    config, arch = config_arch or _backbone_arch(backbone)
    if not arch.image_path:
        raise ConfigError(f"--image-root: backbone {backbone!r} reads precomputed image features (VL-BART / VL-T5); "
                          f"raw images need a VLM backbone (Florence-2, BLIP-2, InstructBLIP, LLaVA, Idefics3, "
                          f"Qwen2-VL, PaliGemma) (or drop --image-root)")
    if backbone in BUILTIN_BACKBONES:  # random weights, no processor: refused before a (7B) build
        raise ConfigError(_NO_PROCESSOR.format(backbone=backbone))
    if overrides:  # the preset as VLModel.build sizes it for this VLM, read from the config alone
        from ..model import vlm_method

        method = vlm_method(method, config, arch).with_overrides(overrides)
    model = VLModel.build(backbone, method, seed=seed)  # once: preset and overrides are resolved first
    if getattr(model, "processor", None) is None:
        raise ConfigError(_NO_PROCESSOR.format(backbone=backbone))
    return model


_NO_PROCESSOR = ("--backbone {backbone}: no Hugging Face processor could be loaded (a built-in random-weight name has "
                 "none); use a hub id or a folder that holds the processor files (processor.save_pretrained)")


def _backbone_arch(backbone: str):
    from ..backbones.arch import arch_for
    from ..backbones.loading import load_backbone

    config = load_backbone(backbone, meta=True).config  # a weightless meta build
    return config, arch_for(config.model_type, config)


def build_native(trainer) -> None:
    """Trainer._build for raw images: the VLM, its processor, image datasets, the feature cache."""
    from ..data import build_dataset
    from ..data.images import ImageRoot, make_collator
    from ..frozen_precision import apply_frozen_dtype
    from .loop import IMAGE_TASKS, seed_everything

    cfg = trainer.cfg
    bad = [t for t in trainer.tasks if t not in IMAGE_TASKS]
    if bad:
        raise ConfigError(f"--image-root: tasks {','.join(bad)} are not image-text tasks (expected a subset of "
                          f"{','.join(IMAGE_TASKS)})")
    image_root = ImageRoot(cfg.image_root)  # an existing folder, before the backbone is loaded
    if cfg.feat_dim is not None:
        raise ConfigError("--feat-dim applies to feature files; with --image-root the VLM's own vision tower "
                          "sets the image features")
    trainer.video = False
    trainer.mask_padded_frames = True
    config, arch = _backbone_arch(cfg.backbone)  # the config alone (a meta build)
    decoder_only = arch.decoder_only
    if decoder_only:  # before the weights are built
        from ..data.decoder_prompts import check_tasks

        if cfg.image_cache_dir is not None:
            raise ConfigError("--image-cache-dir: the frozen image feature cache is not offered for decoder-only VLMs "
                              "(their vision tower runs every step); drop --image-cache-dir")
        check_tasks(config.model_type, trainer.tasks)
    seed_everything(cfg.seed)
    model = load_vlm(cfg.backbone, cfg.method, cfg.seed, cfg.method_overrides, config_arch=(config, arch))
    model_type = vlm_model_type(model)
    processor = model.processor
    trainer.tokenizer = processor.tokenizer
    if getattr(trainer.tokenizer, "pad_token_id", None) is None:
        raise ConfigError(f"--backbone {cfg.backbone}: its tokenizer has no pad token")
    sizes, per_process = trainer._recipe(model.arch.family)  # epochs, lr, specs and batches as for features
    train_sets = {t: build_dataset(t, "train", cfg.data_root, trainer.tokenizer, spec=trainer.specs[t], seed=cfg.seed,
                                   limit=cfg.limit_train, image_root=image_root, model_type=model_type,
                                   check_features=True)  # every image exists, before anything is written
                  for t in trainer.tasks}
    for ds in train_sets.values():  # the first image of every task opens, before anything is written
        from ..data.images import open_image

        open_image(ds._example_ref(0))
    trainer.model = model.to(trainer.device)
    apply_frozen_dtype(trainer.model, cfg.frozen_dtype, cfg.precision)
    trainer.feat_dim = None
    cache = open_feature_cache(trainer.model, cfg.image_cache, cfg.image_cache_dir)
    if cfg.image_cache and cache is None and trainer.dist.is_main:
        print(f"vlpet: image feature cache off: {model_type} is a decoder-only VLM (no frozen-feature cache for "
              f"them), its vision tower runs every step" if decoder_only else
              "vlpet: image feature cache off: the method trains part of the vision path, so its features change")
    trainer.native = NativeSetup(image_root, model_type, cache, make_collator(processor, model_type, cache))
    if cache is not None:
        refs = [r for ds in train_sets.values() for r in ds.image_refs()]
        _fill_cache(trainer, refs, "cache train images")
    trainer._build_training(sizes, per_process, train_sets, collate_fn=trainer.native.collate)


def open_feature_cache(model, enabled: bool, cache_dir=None):
    """The disk cache of the model's frozen image features (train, evaluate, `vlpet eval`), or None when
    it is off or the method trains part of the image path (its features change)."""
    from ..data.image_cache import ImageFeatureCache, default_cache_dir

    if not enabled or _decoder_only(model) or not image_path_frozen(model):
        return None  # decoder-only VLMs: no frozen-feature path (VLModel.frozen_image_features refuses them)
    return ImageFeatureCache(Path(cache_dir) if cache_dir else default_cache_dir(), model.image_features_key(),
                             model.processor)


def cache_prepare(cache, model, device, progress: bool, label: str = "", build: bool = True):
    """evaluate_model's ``prepare``: cache a dataset's image features before it is predicted (None: no cache)."""
    if cache is None:
        return None

    def prepare(ds):
        if build:
            cache.build(model, ds.image_refs(), batch_size=32, device=device, progress=progress,
                        desc=f"cache {ds.task} {label}images")

    return prepare


def _fill_cache(trainer, refs, desc: str) -> None:
    from .distributed import barrier

    # every rank computes its share of the missing images (one writer per file), then all read all of them
    dist, cache = trainer.dist, trainer.native.cache
    # shard the distinct refs, not the missing ones: ranks that list "missing" at different moments would
    # disagree on the shards and leave images out
    todo = list(dict.fromkeys(refs))[dist.rank::dist.world_size]
    cache.build(trainer.model, todo, batch_size=32, device=trainer.device,
                progress=trainer.cfg.progress and dist.is_main, desc=desc)
    barrier(dist)
    cache.reload_index()  # the other ranks' digests: no file is hashed again


def evaluate_native(trainer, model, split: str, desc: str):
    from .evaluate import evaluate_model

    cfg = trainer.cfg
    native = trainer.native
    # the main process fills the cache for evaluation (the others read the features it wrote)
    prepare = cache_prepare(native.cache, model, trainer.device, cfg.progress, f"{split} ",
                            build=trainer.dist.is_main)
    return evaluate_model(model, trainer.tokenizer, cfg.data_root, trainer.tasks, split, trainer.specs,
                          feat_dim=None, feature_dirname=cfg.feature_dirname, batch_sizes=trainer.eval_batch,
                          device=trainer.device, precision=cfg.precision, limit=cfg.limit_eval,
                          caption_metrics=cfg.caption_metrics, progress=cfg.progress, desc=desc, skip_missing=True,
                          image_root=native.image_root, model_type=native.model_type, collate_fn=native.collate,
                          prepare=prepare)


def answer(checkpoint, image, question: str = "", task: str = "vqa", backbone: str | None = None,
           device=None, precision: str = "fp32") -> str:
    """One image + one question -> the tuned VLM's answer (``vlpet predict --image --question``).
    ``task="caption"`` captions the image (no question)."""
    import torch

    from ..data.images import ImageRef, open_image
    from ..data.tasks import canonical_task, get_task_spec, task_entry, task_names
    from .evaluate import autocast
    from .runs import _device, _load, _resolve

    task = canonical_task(task)
    one_image = [t for t in task_names("image") if task_entry(t).kind != "classification"]  # NLVR2: two images
    if task not in one_image:
        raise ConfigError(f"--task {task}: one image answers {', '.join(one_image)} (NLVR2 needs two images)")
    if task != "caption" and not question.strip():
        raise ConfigError("--question: expected a non-empty question (or --task caption)")
    ref = ImageRef((str(image),))
    open_image(ref)  # a one-line DataError for a missing / unreadable file, first
    run, folders = _resolve(checkpoint)
    folder = folders[0][1]
    dev = _device(device)
    model = _load(folder, backbone or run.get("backbone"), dev)
    if not getattr(model, "native_inputs", False):
        raise ConfigError(f"--image: {folder} tunes a backbone that reads precomputed features (VL-BART / VL-T5); "
                          f"use --data-root with feature files, or a run of a VLM that reads images")
    processor = model.processor
    if processor is None:
        raise ConfigError(f"{folder}: no processor for backbone {backbone or run.get('backbone')!r}; pass --backbone "
                          f"with a folder or hub id that holds the processor files")
    inputs = {k: v.to(dev) for k, v in predict_inputs(processor, vlm_model_type(model), task, ref, question).items()}
    spec = get_task_spec(task, caption_no_repeat_ngram_size=run.get("caption_no_repeat_ngram_size", 0))
    with torch.no_grad(), autocast(dev, precision):
        ids = model.generate(**inputs, task=task, **decode_settings(model, spec))
    return processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()


def predict_inputs(processor, model_type: str, task: str, ref, question: str = "") -> dict:
    """The VLM inputs of one image + question, through the training collator (same prompt, same Q-Former text)."""
    from ..data.images import make_collator, native_inputs, question_example

    return native_inputs(make_collator(processor, model_type)([question_example(model_type, task, ref,
                                                                                question.strip())]))


def decode_settings(model, spec) -> dict:
    """The task's generation settings for this model (a decoder-only VLM counts max_length in new tokens)."""
    if _decoder_only(model):
        from ..data.decoder_prompts import generation_settings

        return generation_settings(spec.decode_kwargs())
    return spec.decode_kwargs()
