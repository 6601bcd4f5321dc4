"""Raw images instead of feature files: the data source of VLMs that read pixels (Florence-2, BLIP-2,
InstructBLIP; ``VLModel.native_inputs``).

The annotation files are the VL-Adapter ones (``--data-root``, :mod:`vlpet.data.layout`); the images
live under ``--image-root`` in the folders the datasets are released in::

    IMAGES/coco/train2014/COCO_train2014_000000xxxxxx.jpg   VQAv2 + COCO captions (folder from the id)
    IMAGES/coco/val2014/COCO_val2014_000000xxxxxx.jpg
    IMAGES/gqa/images/<img_id>.jpg                          GQA, every split (VG ids of train/valid too)
    IMAGES/nlvr2/images/<train|dev|test1>/<img_id>.png      NLVR2 (img_id "train-10171-0-img0"; folder =
                                                            its first field; NLVR2's train/<0..99>/ sub-
                                                            folders are found as well)

Any of ``.jpg``, ``.png``, ``.jpeg`` is accepted for every image (the fixture writes PNG files).

Examples carry an :class:`ImageRef` (the file(s) of one image input); :class:`NativeCollator` opens
them, builds the VLM's inputs through its own Hugging Face processor (``model.processor``) and the
targets through its tokenizer. An NLVR2 example's two images are pasted side by side into one image
(left | right), as single-image VLMs are usually tuned on NLVR2. With an
:class:`~vlpet.data.image_cache.ImageFeatureCache` the collator reads the frozen image features from
disk instead (``image_features`` in the batch, no ``pixel_values``).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigError
from .datasets import ImageTextDataset, best_answer, sample_answer
from .errors import DataError
from .layout import VLAdapterLayout, resolve_data_root
from .records import read_coco_karpathy, read_gqa, read_nlvr2, read_vqa
from .tasks import TaskSpec, canonical_task, get_task_spec, task_entry, task_names

__all__ = ["ImageRef", "ImageRoot", "open_image", "vlm_prompt", "NativeDataset", "build_image_dataset",
           "NativeCollator", "make_collator", "NATIVE_INPUT_KEYS", "IMAGE_EXTENSIONS", "VLM_TYPES"]

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")
VLM_TYPES = ("florence2", "blip-2", "instructblip")
#: batch keys of the encoder-decoder VLMs' processors that go to the VLM's forward / generate
_SEQ2SEQ_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_features", "qformer_input_ids",
                       "qformer_attention_mask")
#: the decoder-only VLMs' own image inputs besides pixel_values (their processors return them; issue 20)
DECODER_ONLY_INPUT_KEYS = ("pixel_attention_mask", "image_grid_thw", "image_sizes", "token_type_ids",
                           "mm_token_type_ids")
#: batch keys that go to the VLM's forward / generate
NATIVE_INPUT_KEYS = _SEQ2SEQ_INPUT_KEYS + DECODER_ONLY_INPUT_KEYS


@dataclass(frozen=True)
class ImageRef:
    """The image input of one example: one file, or two pasted side by side (NLVR2)."""

    paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(Path(p).stem for p in self.paths)


def open_image(ref: ImageRef):
    """The RGB PIL image of ``ref``; DataError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in ref.paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except FileNotFoundError:
            raise DataError(p, "an image file", got="no such file") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(p, "a readable image (JPEG / PNG)", got=f"{type(exc).__name__}: {exc}"[:160]) from exc
    if len(images) == 1:
        return images[0]
    # NLVR2: left | right at a common height, as single-image VLMs read an image pair
    h = max(im.height for im in images)
    images = [im if im.height == h else im.resize((max(1, round(im.width * h / im.height)), h)) for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in images), h))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


class ImageRoot:
    """Where each image of the four tasks lives under ``--image-root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            got = "a file" if self.root.exists() else "no such directory"
            raise DataError(self.root, "an existing image root directory (--image-root)", got=got)
        self._nlvr_index: dict[str, Path] | None = None

    def stem(self, source: str, img_id: str) -> Path:
        """The path without extension where ``img_id`` of a feature source (COCO, VG, GQA, nlvr) is expected."""
        if source == "COCO":
            parts = img_id.split("_")
            folder = parts[1] if len(parts) == 3 and parts[0] == "COCO" else "train2014"
            return self.root / "coco" / folder / img_id
        if source in ("VG", "GQA"):
            return self.root / "gqa" / "images" / img_id
        if source == "nlvr":
            return self.root / "nlvr2" / "images" / img_id.split("-")[0] / img_id
        raise DataError(self.root, "an image source in COCO / VG / GQA / nlvr", got=repr(source))

    def find(self, source: str, img_id: str) -> Path | None:
        stem = self.stem(source, img_id)
        for ext in IMAGE_EXTENSIONS:
            p = stem.with_name(stem.name + ext)
            if p.is_file():
                return p
        if source == "nlvr":  # NLVR2's train images sit in numbered sub-folders
            if self._nlvr_index is None:
                base = self.root / "nlvr2" / "images"
                self._nlvr_index = {p.stem: p for p in base.glob("*/*/*") if p.suffix.lower() in IMAGE_EXTENSIONS}
            return self._nlvr_index.get(img_id)
        return None

    def path(self, source: str, img_id: str) -> Path:
        p = self.find(source, img_id)
        if p is None:
            stem = self.stem(source, img_id)
            raise DataError(stem.with_name(stem.name + IMAGE_EXTENSIONS[0]),
                            f"an image file ({' / '.join(IMAGE_EXTENSIONS)}) under --image-root", got="no such file")
        return p


def vlm_prompt(model_type: str, task: str, sent: str = "") -> str:
    """The text a VLM reads for a task, in the VLM's own prompt style (its pretrained behaviour):
    Florence-2 plain questions and its ``<CAPTION>`` task token; BLIP-2 / InstructBLIP
    ``"Question: {q} Answer:"``."""
    if model_type not in VLM_TYPES:
        raise ConfigError(f"<model>: expected a VLM of type {' / '.join(VLM_TYPES)}, got {model_type!r}")
    if model_type == "florence2":
        return {"caption": "<CAPTION>", "nlvr": f"True or false: {sent}"}.get(task, sent)
    if task == "caption":
        return "A short image caption:"
    if task == "nlvr":
        return f"Question: Is this statement about the two images true or false? {sent} Answer:"
    return f"Question: {sent} Answer:"


def prompt_fields(model_type: str, task: str, sent: str = "") -> dict[str, str]:
    """An example's ``text`` (the LM prompt) and ``qformer_text`` (InstructBLIP's Q-Former reads the bare
    question / instruction, not the LM prompt); training, evaluation and ``predict --image`` all use this.
    Decoder-only VLMs: ``text`` is the user's instruction; the collator wraps it in the family's prompt."""
    from .decoder_prompts import instruction, is_decoder_only

    text = instruction(model_type, task, sent) if is_decoder_only(model_type) else vlm_prompt(model_type, task, sent)
    return {"text": text, "qformer_text": sent or text}


def question_example(model_type: str, task: str, image: ImageRef, question: str = "") -> dict[str, Any]:
    """One unlabelled example (``vlpet predict --image``) in the form :class:`NativeCollator` takes, so that
    prediction reads exactly the inputs training and evaluation read."""
    return {"task": task, "image": image, "score": 1.0, "question_id": "0", "target_text": "", "targets": [],
            "img_id": "", "sent": question, "label_dict": {}, "label": 0, "identifier": "",
            **prompt_fields(model_type, task, question)}


class NativeDataset(ImageTextDataset):
    """One task of the VL-Adapter layout read with images: examples carry ``image`` (an
    :class:`ImageRef`), ``text`` (the VLM prompt) and ``target_text``; the rest as the feature datasets."""

    tokenizes = False  # the collator tokenizes (through the VLM's processor): no tokenizer is needed here

    def __init__(self, spec: TaskSpec, items: list, tokenizer, image_root: ImageRoot, model_type: str, *, mode: str,
                 seed: int = 0, split: str = "") -> None:
        super().__init__(spec, items, tokenizer, {}, mode=mode, seed=seed, split=split)
        self.image_root = image_root
        self.model_type = model_type
        self.kind = task_entry(self.task).kind  # qa / classification (two images) / caption
        self._refs: dict[int, ImageRef] = {}  # item -> its resolved image paths (found on first use, then kept)

    def _ref(self, source: str, *img_ids: str) -> ImageRef:
        return ImageRef(tuple(str(self.image_root.path(source, i)) for i in img_ids))

    def _example(self, index: int, rng: random.Random) -> dict[str, Any]:
        rec, source = self.items[index]
        ex: dict[str, Any] = {"task": self.task, "score": 1.0}
        if self.kind == "qa":
            answer, score = sample_answer(rec.label, rng) if self.mode == "train" else best_answer(rec.label)
            ex.update(image=self._example_ref(index), question_id=rec.question_id, score=score,
                      target_text=answer, targets=sorted(rec.label, key=lambda a: -rec.label[a]),
                      label_dict=dict(rec.label), img_id=rec.img_id, sent=rec.sent)
        elif self.kind == "classification":  # NLVR2: two images
            text = self.spec.classes[rec.label]
            ex.update(image=self._example_ref(index), question_id=rec.uid, target_text=text,
                      targets=[text], label=rec.label, identifier=rec.identifier, img_id=(rec.img0, rec.img1),
                      sent=rec.sent)
        else:
            img, k = rec, source  # caption items are (image, caption index or None)
            target = img.refs[0 if k is None else k]
            ex.update(image=self._example_ref(index), question_id=img.img_id, target_text=target,
                      targets=list(img.refs), img_id=img.img_id, sent="")
        ex.update(prompt_fields(self.model_type, self.task, ex["sent"]))
        return ex

    def image_ids(self) -> list[tuple[str, str]]:
        if self.kind == "classification":
            return [(s, i) for r, s in self.items for i in (r.img0, r.img1)]
        if self.kind == "caption":
            return [("COCO", img.img_id) for img, _ in self.items]
        return [(s, r.img_id) for r, s in self.items]

    def image_refs(self) -> list[ImageRef]:
        """The distinct image inputs of the dataset, in first-use order (what the feature cache holds)."""
        return list(dict.fromkeys(self._example_ref(i) for i in range(len(self.items))))

    def _example_ref(self, index: int) -> ImageRef:
        ref = self._refs.get(index)
        if ref is None:  # a file-system lookup per extension: once per item, not once per epoch
            rec, source = self.items[index]
            if self.kind == "classification":
                ref = self._ref(source, rec.img0, rec.img1)
            elif self.kind == "caption":
                ref = self._ref("COCO", rec.img_id)
            else:
                ref = self._ref(source, rec.img_id)
            self._refs[index] = ref
        return ref

    def check_features(self) -> None:
        """DataError for the first missing image file (and how many are missing), before any work."""
        missing = [(s, i) for s, i in dict.fromkeys(self.image_ids()) if self.image_root.find(s, i) is None]
        if missing:
            s, i = missing[0]
            stem = self.image_root.stem(s, i)
            raise DataError(stem.with_name(stem.name + IMAGE_EXTENSIONS[0]),
                            f"an image file for every image of {self.task} {self.split} under --image-root",
                            got=f"{len(missing)} missing, this one first")

    check_images = check_features


def build_image_dataset(task: str, split: str, data_root, image_root, tokenizer, model_type: str, *,
                        mode: str | None = None, spec: TaskSpec | None = None, seed: int = 0,
                        limit: int | None = None, check_images: bool = False,
                        layout: VLAdapterLayout | None = None) -> NativeDataset:
    """The raw-image dataset of one task and split (same records and split semantics as
    :func:`vlpet.data.build_dataset`, whose ``image_root=`` calls this)."""
    task = canonical_task(task)
    if task not in task_names("image"):
        raise ConfigError(f"{os.fspath(image_root)}: expected an image-text task ({', '.join(task_names('image'))}) "
                          f"for --image-root, got {task!r}")
    layout = layout or VLAdapterLayout(resolve_data_root(data_root))
    root = image_root if isinstance(image_root, ImageRoot) else ImageRoot(image_root)
    spec = spec or get_task_spec(task)
    file_splits = spec.resolve_split(split)
    mode = mode or ("train" if split == "train" else "eval")
    if task == "vqa":
        items = [(r, "COCO") for fs in file_splits for r in read_vqa(layout.vqa_split(fs))]
    elif task == "gqa":
        items = [(r, layout.feature_source("gqa", fs)) for fs in file_splits for r in read_gqa(layout.gqa_split(fs))]
    elif task == "nlvr":
        items = [(r, "nlvr") for fs in file_splits for r in read_nlvr2(layout.nlvr_split(fs))]
    else:
        images = read_coco_karpathy(layout.coco_karpathy, file_splits)
        items = [(img, k) for img in images for k in range(len(img.refs))] if mode == "train" \
            else [(img, None) for img in images]
    if limit is not None:
        items = items[: int(limit)]
    ds = NativeDataset(spec, items, tokenizer, root, model_type, mode=mode, seed=seed, split=split)
    if check_images:
        ds.check_images()
    return ds


class NativeCollator:
    """Examples of one task -> the VLM's own inputs (``processor(images=..., text=...)``) + targets.

    Batch keys: those of :data:`NATIVE_INPUT_KEYS` the processor gives (``image_features`` instead of
    ``pixel_values`` with a ``cache``), ``target_ids`` (tokenizer ids, -100 padding, truncated to the
    task's ``max_target_len``), ``scores`` and the bookkeeping lists of :func:`vlpet.data.collate`
    (``question_ids``, ``targets``, ``target_texts``, ``img_ids``, ``sents``, ``label_dicts`` / ``labels``,
    ``identifiers``), plus ``native=True``.
    """

    def __init__(self, processor, cache=None) -> None:
        self.processor = processor
        self.cache = cache
        self._blank = None
        self._no_pixel_work = self._NO_PIXEL_WORK
        self._specs: dict[str, Any] = {}  # task -> its TaskSpec, looked up once

    # With cached features the pixels are not needed, but the processor still lays out the text (image tokens
    # first). It gets a 1 x 1 blank image per example with every pixel step off: the token ids are those of the
    # real images (tested), without resizing and normalizing B full-size images per batch (seconds at 768 px).
    _NO_PIXEL_WORK = {"do_resize": False, "do_rescale": False, "do_normalize": False, "do_center_crop": False}

    def _text_only(self, kw: dict) -> dict:
        from PIL import Image

        n = len(kw["text"])
        if self._blank is None:
            self._blank = Image.new("RGB", (1, 1))
            try:
                return dict(self.processor(images=[self._blank] * n, **kw, **self._NO_PIXEL_WORK))
            except (TypeError, ValueError):  # a processor that refuses these switches: a blank of its input size
                ip = self.processor.image_processor
                size = {**(getattr(ip, "size", None) or {}), **(getattr(ip, "crop_size", None) or {})}
                h = size.get("height") or size.get("shortest_edge") or 224
                w = size.get("width") or size.get("shortest_edge") or 224
                self._blank, self._no_pixel_work = Image.new("RGB", (int(w), int(h))), {}
        return dict(self.processor(images=[self._blank] * n, **kw, **self._no_pixel_work))

    @staticmethod
    def _one_task(examples: Sequence[Mapping[str, Any]]) -> str:
        """The task of a batch; a batch must be non-empty and of one task (the loader never mixes them)."""
        if not examples:
            raise ValueError("an empty batch")
        tasks = {e["task"] for e in examples}
        if len(tasks) != 1:
            raise ValueError(f"a batch mixes tasks {sorted(tasks)}")
        return examples[0]["task"]

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        self._one_task(examples)
        texts = [e["text"] for e in examples]
        refs = [e["image"] for e in examples]
        kw: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if self.cache is not None:
            enc = self._text_only(kw)
            enc.pop("pixel_values", None)
            enc["image_features"] = torch.stack([self.cache.load(r) for r in refs])
        else:
            enc = dict(self.processor(images=[open_image(r) for r in refs], **kw))
        if "qformer_input_ids" in enc:  # InstructBLIP: the Q-Former reads the question, not the LM prompt
            q = self.processor.qformer_tokenizer([e["qformer_text"] for e in examples], padding=True,
                                                 return_tensors="pt")
            enc["qformer_input_ids"], enc["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
        batch: dict[str, Any] = {k: v for k, v in enc.items() if k in _SEQ2SEQ_INPUT_KEYS}
        tok = self.processor.tokenizer
        max_len = getattr(self._spec_of(examples[0]), "max_target_len", None)
        tkw = {"truncation": True, "max_length": max_len} if max_len else {}
        return self._finish(batch, examples, [tok(e["target_text"], **tkw)["input_ids"] for e in examples])

    def _finish(self, batch: dict[str, Any], examples, ids: list[list[int]]) -> dict[str, Any]:
        """``batch`` + the target ids (-100 padding) and the bookkeeping lists of the examples."""
        task = examples[0]["task"]
        n = max(len(t) for t in ids)
        target = torch.full((len(ids), n), -100, dtype=torch.long)
        for i, t in enumerate(ids):
            target[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        batch.update(
            task=task, native=True, target_ids=target,
            scores=torch.tensor([float(e["score"]) for e in examples], dtype=torch.float32),
            question_ids=[e["question_id"] for e in examples], targets=[e["targets"] for e in examples],
            target_texts=[e["target_text"] for e in examples], img_ids=[e["img_id"] for e in examples],
            sents=[e["sent"] for e in examples],
        )
        kind = task_entry(task).kind
        if kind == "qa":
            batch["label_dicts"] = [e["label_dict"] for e in examples]
        if kind == "classification":
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
            batch["identifiers"] = [e["identifier"] for e in examples]
        return batch

    def _spec_of(self, example):
        task = example["task"]
        if task not in self._specs:
            self._specs[task] = get_task_spec(task)
        return self._specs[task]


def make_collator(processor, model_type: str, cache=None) -> NativeCollator:
    """The collator of a VLM type: :class:`NativeCollator` (encoder-decoder VLMs) or, for a decoder-only VLM,
    :class:`~vlpet.data.decoder_prompts.DecoderOnlyCollator` (its prompt format, left padding, answer + EOS)."""
    from .decoder_prompts import DecoderOnlyCollator, is_decoder_only

    if is_decoder_only(model_type):
        return DecoderOnlyCollator(processor, model_type, cache)
    return NativeCollator(processor, cache)


def native_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a collated native batch that the VLM's forward / generate take."""
    return {k: batch[k] for k in NATIVE_INPUT_KEYS if k in batch}
