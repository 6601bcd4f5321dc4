"""The four image-text tasks and the four video-text tasks as data (spec §3.5 - §3.9, §4.7).

``get_task_spec("vqa")`` returns a :class:`TaskSpec` that fixes the prompt, truncation lengths,
loss reduction, score weighting, split semantics and pinned decoding settings of a task.

Notes on deliberate choices:

* **GQA prompt.** The official implementation (inherited from VL-Adapter) uses the typo
  ``"gpa: "`` for GQA. The default here is the intended ``"gqa: "``; pass
  ``official_gqa_typo=True`` to reproduce the official prompt exactly (e.g. to run an imported
  official checkpoint, which was trained with ``"gpa: "``).
* **Caption decoding.** Generation settings are pinned explicitly instead of being inherited from
  a backbone config. The official BART path inherits ``no_repeat_ngram_size=3`` (and
  ``early_stopping=True``) from the facebook/bart-base ``config.json`` (spec §3.7, to be verified
  against the hub); our recipe default is ``no_repeat_ngram_size=0`` and ``early_stopping=False``,
  and both are arguments of :func:`get_task_spec` so the official behaviour is one setting away.
* **Caption encoder text** is the prompt alone, stripped of its trailing space (spec §3.5: "just
  'caption:'"); a GPT-2-BPE tokenizer would otherwise emit a lone trailing-space token.
* **NLVR2** is classification through the LM head: ``classes = ("false", "true")`` (index = label)
  and the prediction compares the logits of the first token of each word (:func:`class_token_ids`).
* **Video** (TVQA, How2QA, TVC, YC2C; spec §3.9): text up to 600 tokens with the prompt appended
  at the end (``vlpet.data.video`` builds it), targets up to 20 tokens, per-sample loss, and
  beam search with 5 beams and ``max_length`` 20 for all four, QA included (the official QA call
  inherits both from the config). ``caption_no_repeat_ngram_size`` / ``caption_early_stopping``
  apply to the video decoding too (the official BART path inherits 3 / True from bart-base).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TASKS",
    "VIDEO_TASKS",
    "Task",
    "register_task",
    "task_names",
    "task_entry",
    "is_video_task",
    "task_modality",
    "TaskSpec",
    "canonical_task",
    "get_task_spec",
    "get_task_specs",
    "class_token_ids",
]

MODALITIES = ("image", "video")  # image-text (VL-Adapter layout) / video-text (VALUE layout, spec §3.9)
KINDS = ("qa", "classification", "caption")


@dataclass(frozen=True)
class Task:
    """One task of the registry: its canonical name, modality, output kind, the builder of its
    :class:`TaskSpec` (``build(options) -> TaskSpec``, options: see :func:`get_task_spec`), the score
    it contributes to a Table-2 row (and Avg), that row's column title, and its aliases."""

    name: str
    modality: str
    kind: str
    build: Callable[["_SpecOptions"], "TaskSpec"]
    metric: str = "accuracy"
    column: str = ""
    aliases: tuple[str, ...] = ()


_REGISTRY: dict[str, Task] = {}
_ALIASES: dict[str, str] = {}


def register_task(task: Task) -> Task:
    """Add a task (and its aliases); a name or alias already taken is refused."""
    from ..errors import ConfigError

    if task.modality not in MODALITIES or task.kind not in KINDS:
        raise ConfigError(f"task {task.name!r}: modality {task.modality!r} / kind {task.kind!r}; expected one of "
                          f"{MODALITIES} / {KINDS}")
    names = (task.name, *task.aliases)
    taken = [n for n in names if n in _ALIASES]
    if taken:
        raise ConfigError(f"task {task.name!r}: name(s) {taken} already registered")
    _REGISTRY[task.name] = task
    _ALIASES.update({n: task.name for n in names})
    return task


def task_names(modality: str | None = None, kind: str | None = None) -> tuple[str, ...]:
    """Canonical task names in registration order, optionally of one modality and/or kind."""
    return tuple(n for n, t in _REGISTRY.items()
                 if (modality is None or t.modality == modality) and (kind is None or t.kind == kind))


def task_entry(name: str) -> Task:
    return _REGISTRY[canonical_task(name)]


def is_video_task(name: str) -> bool:
    return task_entry(name).modality == "video"


def task_modality(tasks: Iterable[str]) -> str:
    """The mixing rule: "image" or "video" for a list of tasks of one modality; a ConfigError for a list
    that mixes them (they need different visual features, presets and batch sizes). Names that are not
    registered are left to :func:`canonical_task` (they count as neither here)."""
    from ..errors import ConfigError

    by = {m: [t for t in tasks if str(t).lower() in _ALIASES and _REGISTRY[_ALIASES[str(t).lower()]].modality == m]
          for m in MODALITIES}
    if by["image"] and by["video"]:
        raise ConfigError(f"--tasks mixes image-text ({','.join(by['image'])}) and video-text ({','.join(by['video'])}) "
                          f"tasks; they need different visual features, presets and batch sizes (spec §3.9, §4.5): "
                          f"train them in separate runs")
    return "video" if by["video"] else "image"


def canonical_task(name: str) -> str:
    """``"nlvr2"`` -> ``"nlvr"``, ``"coco"`` -> ``"caption"``, ...; ConfigError (a ValueError) if unknown."""
    try:
        return _ALIASES[name.lower()]
    except (KeyError, AttributeError):
        from ..errors import ConfigError  # a ValueError too

        raise ConfigError(f"unknown task {name!r}; expected one of {list(_REGISTRY)}") from None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    prompt: str
    max_text_len: int | None  # encoder text, special tokens included; None = untruncated
    max_target_len: int | None  # target text, special tokens included; None = untruncated
    n_images: int
    loss_reduction: str  # "sample": token mean per sample, then batch mean; "token": mean over all batch tokens
    weight_by_score: bool  # multiply each sample's loss by the sampled answer's soft score
    decode: dict[str, Any] = field(default_factory=dict)  # kwargs for generate(); empty for NLVR2
    sample_target: bool = False  # training target drawn from the soft-label dict
    classes: tuple[str, ...] | None = None  # NLVR2: texts whose first-token logits are compared
    text_from_prompt_only: bool = False  # caption: encoder text is the prompt alone
    # logical split -> file-level split names (spec §7.2, §4.7)
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    video: bool = False  # a video-text task (64 frame tokens, VALUE layout; vlpet.data.video)

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("sample", "token"):
            raise ValueError(f"loss_reduction must be 'sample' or 'token', got {self.loss_reduction!r}")

    def input_text(self, sent: str = "") -> str:
        if self.text_from_prompt_only:
            return self.prompt.rstrip()
        return f"{self.prompt}{sent}"

    def decode_kwargs(self) -> dict[str, Any]:
        """A copy of the pinned generation settings."""
        return dict(self.decode)

    def resolve_split(self, split: str) -> tuple[str, ...]:
        """``"train"``/``"val"``/``"test"`` -> file splits; file split names (comma- or
        plus-separated) pass through."""
        if split in self.splits:
            return self.splits[split]
        parts = tuple(p for p in split.replace("+", ",").split(",") if p)
        if not parts:
            raise ValueError(f"empty split name for task {self.name!r}")
        return parts


@dataclass(frozen=True)
class _SpecOptions:
    use_prompts: bool = True
    official_gqa_typo: bool = False
    caption_num_beams: int = 5
    caption_max_length: int = 40
    caption_no_repeat_ngram_size: int = 0
    caption_early_stopping: bool = False
    qa_max_new_tokens: int = 10
    video_num_beams: int = 5
    video_max_length: int = 20

    def prompt(self, text: str) -> str:
        return text if self.use_prompts else ""

    def qa_decode(self) -> dict[str, Any]:
        return {"num_beams": 1, "do_sample": False, "max_new_tokens": self.qa_max_new_tokens}

    def video_decode(self) -> dict[str, Any]:
        return {"num_beams": self.video_num_beams, "do_sample": False, "max_length": self.video_max_length,
                "no_repeat_ngram_size": self.caption_no_repeat_ngram_size,
                "early_stopping": self.caption_early_stopping}


def get_task_spec(name: str, **options) -> TaskSpec:
    """The :class:`TaskSpec` of one task. Options (keyword only): ``use_prompts`` (False gives empty
    prompts: the official full fine-tuning and Hyperformer scripts run without ``--use_tasks_prompts``),
    ``official_gqa_typo``, ``caption_num_beams`` (5), ``caption_max_length`` (40),
    ``caption_no_repeat_ngram_size`` (0), ``caption_early_stopping`` (False), ``qa_max_new_tokens`` (10),
    ``video_num_beams`` (5), ``video_max_length`` (20)."""
    return task_entry(name).build(_SpecOptions(**options))


def _vqa(o: _SpecOptions) -> TaskSpec:
    return TaskSpec("vqa", o.prompt("vqa: "), 20, 10, 1, "sample", True, o.qa_decode(), sample_target=True,
                    splits={"train": ("karpathy_train",), "val": ("karpathy_val",), "test": ("karpathy_test",)})


def _gqa(o: _SpecOptions) -> TaskSpec:
    return TaskSpec("gqa", o.prompt("gpa: " if o.official_gqa_typo else "gqa: "), 20, 10, 1, "sample", False,
                    o.qa_decode(), sample_target=True,
                    # trains on train + valid; test-dev is both the validation and the reported split
                    splits={"train": ("train", "valid"), "val": ("testdev",), "test": ("testdev",)})


def _nlvr(o: _SpecOptions) -> TaskSpec:
    return TaskSpec("nlvr", o.prompt("nlvr: "), None, None, 2, "sample", False, {}, classes=("false", "true"),
                    splits={"train": ("train",), "val": ("valid",), "test": ("test",)})


def _caption(o: _SpecOptions) -> TaskSpec:
    return TaskSpec(
        "caption", o.prompt("caption: "), 40, 40, 1, "token", False,
        {"num_beams": o.caption_num_beams, "do_sample": False, "max_length": o.caption_max_length,
         "no_repeat_ngram_size": o.caption_no_repeat_ngram_size, "early_stopping": o.caption_early_stopping},
        text_from_prompt_only=True,
        # "train" selects Karpathy train + restval (merged)
        splits={"train": ("train",), "val": ("val",), "test": ("test",)},
    )


def _video(name: str, splits: dict[str, tuple[str, ...]]) -> Callable[[_SpecOptions], TaskSpec]:
    def build(o: _SpecOptions) -> TaskSpec:
        return TaskSpec(name, o.prompt(f"{name}: "), 600, 20, 1, "sample", False, o.video_decode(),
                        splits=splits, video=True)
    return build


_RELEASE = {"train": ("train_release",), "val": ("val_release",), "test": ("test_release",)}
register_task(Task("vqa", "image", "qa", _vqa, column="VQA", aliases=("vqav2",)))
register_task(Task("gqa", "image", "qa", _gqa, column="GQA"))
register_task(Task("nlvr", "image", "classification", _nlvr, column="NLVR2", aliases=("nlvr2",)))
register_task(Task("caption", "image", "caption", _caption, metric="CIDEr", column="COCO CIDEr",
                   aliases=("coco", "coco_caption", "captioning")))
register_task(Task("tvqa", "video", "qa", _video(
    "tvqa", {"train": ("train",), "val": ("val",), "test": ("test_public", "test_release")}), column="TVQA"))
register_task(Task("how2qa", "video", "qa", _video(
    "how2qa", {"train": ("train_release",), "val": ("val_release",), "test": ("test_public_release",)}),
    column="How2QA"))
register_task(Task("tvc", "video", "caption", _video("tvc", _RELEASE), metric="multi_ref/CIDEr", column="TVC"))
register_task(Task("yc2c", "video", "caption", _video("yc2c", _RELEASE), metric="multi_ref/CIDEr", column="YC2C",
                   aliases=("youcook2",)))

# The paper's tasks at import time (a task registered later is reached through task_names()).
TASKS = task_names("image")
VIDEO_TASKS = task_names("video")


def get_task_specs(tasks=None, **kwargs) -> dict[str, TaskSpec]:
    return {canonical_task(t): get_task_spec(t, **kwargs) for t in (TASKS if tasks is None else tasks)}


def class_token_ids(spec: TaskSpec, tokenizer) -> list[int]:
    """First token id of each class word encoded without special tokens (``[false_id, true_id]``
    for NLVR2). Predict ``argmax`` over these logits; ties go to index 0 ("false"), i.e. true iff
    logit[true] > logit[false], as in the official code."""
    if not spec.classes:
        raise ValueError(f"task {spec.name!r} is not a classification task")
    ids = []
    for word in spec.classes:
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"tokenizer encodes {word!r} to no tokens")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"class words {spec.classes} share a first token id {ids}")
    return ids

