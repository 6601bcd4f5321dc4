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

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TASKS",
    "VIDEO_TASKS",
    "TaskSpec",
    "canonical_task",
    "get_task_spec",
    "get_task_specs",
    "class_token_ids",
]

TASKS = ("vqa", "gqa", "nlvr", "caption")
VIDEO_TASKS = ("tvqa", "how2qa", "tvc", "yc2c")
_ALIASES = {
    "tvqa": "tvqa", "how2qa": "how2qa", "tvc": "tvc", "yc2c": "yc2c", "youcook2": "yc2c",
    "vqa": "vqa", "vqav2": "vqa",
    "gqa": "gqa",
    "nlvr": "nlvr", "nlvr2": "nlvr",
    "caption": "caption", "coco": "caption", "coco_caption": "caption", "captioning": "caption",
}


def canonical_task(name: str) -> str:
    """``"nlvr2"`` -> ``"nlvr"``, ``"coco"`` -> ``"caption"``, ...; ConfigError (a ValueError) if unknown."""
    try:
        return _ALIASES[name.lower()]
    except (KeyError, AttributeError):
        from ..errors import ConfigError  # a ValueError too

        raise ConfigError(f"unknown task {name!r}; expected one of {list(TASKS + VIDEO_TASKS)}") from None


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


def get_task_spec(
    name: str,
    *,
    use_prompts: bool = True,
    official_gqa_typo: bool = False,
    caption_num_beams: int = 5,
    caption_max_length: int = 40,
    caption_no_repeat_ngram_size: int = 0,
    caption_early_stopping: bool = False,
    qa_max_new_tokens: int = 10,
    video_num_beams: int = 5,
    video_max_length: int = 20,
) -> TaskSpec:
    """The :class:`TaskSpec` of one task. ``use_prompts=False`` gives empty prompts (the official
    full fine-tuning and Hyperformer scripts run without ``--use_tasks_prompts``)."""
    name = canonical_task(name)

    def p(text: str) -> str:
        return text if use_prompts else ""

    qa_decode = {"num_beams": 1, "do_sample": False, "max_new_tokens": qa_max_new_tokens}
    if name == "vqa":
        return TaskSpec(
            "vqa", p("vqa: "), 20, 10, 1, "sample", True, qa_decode, sample_target=True,
            splits={"train": ("karpathy_train",), "val": ("karpathy_val",), "test": ("karpathy_test",)},
        )
    if name == "gqa":
        return TaskSpec(
            "gqa", p("gpa: " if official_gqa_typo else "gqa: "), 20, 10, 1, "sample", False, dict(qa_decode),
            sample_target=True,
            # trains on train + valid; test-dev is both the validation and the reported split
            splits={"train": ("train", "valid"), "val": ("testdev",), "test": ("testdev",)},
        )
    if name in VIDEO_TASKS:
        video_decode = {
            "num_beams": video_num_beams,
            "do_sample": False,
            "max_length": video_max_length,
            "no_repeat_ngram_size": caption_no_repeat_ngram_size,
            "early_stopping": caption_early_stopping,
        }
        splits = {
            "tvqa": {"train": ("train",), "val": ("val",), "test": ("test_public", "test_release")},
            "how2qa": {"train": ("train_release",), "val": ("val_release",), "test": ("test_public_release",)},
        }.get(name, {"train": ("train_release",), "val": ("val_release",), "test": ("test_release",)})
        return TaskSpec(name, p(f"{name}: "), 600, 20, 1, "sample", False, video_decode, splits=splits, video=True)
    if name == "nlvr":
        return TaskSpec(
            "nlvr", p("nlvr: "), None, None, 2, "sample", False, {}, classes=("false", "true"),
            splits={"train": ("train",), "val": ("valid",), "test": ("test",)},
        )
    return TaskSpec(
        "caption", p("caption: "), 40, 40, 1, "token", False,
        {
            "num_beams": caption_num_beams,
            "do_sample": False,
            "max_length": caption_max_length,
            "no_repeat_ngram_size": caption_no_repeat_ngram_size,
            "early_stopping": caption_early_stopping,
        },
        text_from_prompt_only=True,
        # "train" selects Karpathy train + restval (merged)
        splits={"train": ("train",), "val": ("val",), "test": ("test",)},
    )


def get_task_specs(tasks=TASKS, **kwargs) -> dict[str, TaskSpec]:
    return {canonical_task(t): get_task_spec(t, **kwargs) for t in tasks}


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

