"""Raw-image inputs of the decoder-only VLMs (issue 20): LLaVA, Idefics3 / SmolVLM, Qwen2-VL / Qwen2.5-VL,
PaliGemma, for `vlpet train --image-root`, evaluation and `vlpet predict --image`.

The model takes vlpet's seq2seq interface (docs/decoder-only.md): ``input_ids`` is the prompt WITH its image
tokens as the family's own processor lays them out, left-padded; ``labels`` (``target_ids``) the answer
followed by the tokenizer's EOS (so that generation learns to stop), -100 after it. Everything that differs
between the families is one :class:`DecoderPrompt` row of :data:`DECODER_PROMPTS`; :class:`DecoderOnlyCollator`
reads nothing else.

The prompt: the processor's chat template when it has one (a user turn of the image(s) and the instruction,
then the generation prompt), else the family's published single-turn format (LLaVA-1.5's
``"USER: <image>\\n{text} ASSISTANT:"``). PaliGemma has no chat: its processor puts the image tokens, BOS and
the closing newline around "<image>{text}" ("answer en {question}", "caption en", its pretraining prefixes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigError
from .images import NATIVE_INPUT_KEYS, ImageRef, NativeCollator, open_image
from .tasks import task_entry


@dataclass(frozen=True)
class DecoderPrompt:
    """How one family's prompt and answer are laid out (its processor does the image-token expansion)."""

    name: str
    image_text: str  # one image's placeholder in a hand-written prompt (the processor expands it)
    template: str  # the prompt without a chat template: {images} and {text}
    answer_sep: str = " "  # between the generation prompt and the answer ("ASSISTANT: yes")
    after_text: str = ""  # what the processor appends to the text itself (PaliGemma: "\n")
    chat: bool = True  # use the processor's chat template when it has one (PaliGemma has no chat format)
    max_images: int = 2  # images one prompt may hold (NLVR2 needs 2)
    instructions: Mapping[str, str] = field(default_factory=dict)  # task -> text, "{sent}" = question/statement


_INSTRUCTIONS = {"vqa": "{sent}", "gqa": "{sent}", "caption": "A short image caption:",
                 "nlvr": "Is this statement about the two images true or false? {sent}"}

_QWEN2_VL = DecoderPrompt("Qwen2-VL", "<|vision_start|><|image_pad|><|vision_end|>",
                          "<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n", answer_sep="",
                          instructions=_INSTRUCTIONS)

DECODER_PROMPTS: dict[str, DecoderPrompt] = {
    "llava": DecoderPrompt("LLaVA", "<image>", "USER: {images}\n{text} ASSISTANT:", instructions=_INSTRUCTIONS),
    # SmolVLM-Instruct's format; its processor's chat template (when saved) renders the same
    "idefics3": DecoderPrompt("Idefics3", "<image>", "<|im_start|>User:{images}{text}<end_of_utterance>\nAssistant:",
                              instructions=_INSTRUCTIONS),
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": replace(_QWEN2_VL, name="Qwen2.5-VL"),  # the same prompt format
    # PaliGemma: one image (a prefix LM pretrained on single images), its own task prefixes; its processor
    # puts BOS after the image tokens and "\n" after the text
    "paligemma": DecoderPrompt("PaliGemma", "<image>", "{images}{text}", answer_sep="", after_text="\n",
                               chat=False, max_images=1,
                               instructions={"vqa": "answer en {sent}", "gqa": "answer en {sent}",
                                             "caption": "caption en"}),
}


def is_decoder_only(model_type: str | None) -> bool:
    return model_type in DECODER_PROMPTS


def family(model_type: str) -> DecoderPrompt:
    if model_type not in DECODER_PROMPTS:
        raise ConfigError(f"model type {model_type!r} is not a decoder-only VLM with raw-image inputs "
                          f"(expected one of {', '.join(DECODER_PROMPTS)})")
    return DECODER_PROMPTS[model_type]


def instruction(model_type: str, task: str, sent: str = "") -> str:
    """The user's text of an example (question, caption request, NLVR2 statement), in the family's style."""
    fam = family(model_type)
    if task not in fam.instructions:
        raise ConfigError(f"--tasks {task}: {fam.name} reads one image per prompt and NLVR2 needs two; drop "
                          f"{task} from --tasks" if task == "nlvr" else
                          f"--tasks {task}: no {fam.name} prompt for this task")
    return fam.instructions[task].format(sent=sent)


def check_tasks(model_type: str, tasks: Sequence[str]) -> None:
    """ConfigError (before anything is built or written) for a task the family cannot read."""
    for t in tasks:
        instruction(model_type, t, "")


def render_prompt(processor, model_type: str, text: str, n_images: int) -> str:
    """The prompt string for ``processor(text=...)``: its chat template when it has one, else the family's format."""
    fam = family(model_type)
    if n_images > fam.max_images:
        raise ConfigError(f"{fam.name}: {n_images} images in one prompt (at most {fam.max_images})")
    if fam.chat and getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    return fam.template.format(images=fam.image_text * n_images, text=text)


def generation_settings(settings: dict) -> dict:
    """The task spec's seq2seq settings for a decoder-only generate: ``max_length`` counts the decoder's tokens
    there (its start token included), the whole prompt here, so it becomes ``max_new_tokens``."""
    out = dict(settings)
    if "max_length" in out:
        n = out.pop("max_length")
        out.setdefault("max_new_tokens", max(1, int(n) - 1))
    return out


class DecoderOnlyCollator(NativeCollator):
    """Examples of one task -> a decoder-only VLM's inputs (its processor's, left-padded) + answer labels.

    ``target_ids``: the answer's tokens as they follow the prompt (no special token the prompt already has),
    the tokenizer's EOS, -100 padding; truncated to the task's ``max_target_len`` with the EOS kept. NLVR2
    batches also carry ``class_token_ids`` [B, 2]: the first answer token of "false" / "true" after each
    prompt, what evaluation compares (the decoder-only model has no decoder start token to prefix)."""

    def __init__(self, processor, model_type: str, cache=None) -> None:
        if cache is not None:
            raise ConfigError("the frozen image feature cache is not offered for decoder-only VLMs "
                              "(drop --image-cache-dir)")
        super().__init__(processor, None)
        self.model_type = model_type
        self.family = family(model_type)
        tok = processor.tokenizer
        if getattr(tok, "eos_token_id", None) is None:
            raise ConfigError(f"{type(tok).__name__}: the tokenizer has no EOS token (the answer must end with it)")
        if getattr(tok, "pad_token_id", None) is None:
            raise ConfigError(f"{type(tok).__name__}: the tokenizer has no pad token")
        tok.padding_side = "left"  # the answer follows the last prompt token (docs/decoder-only.md)

    def _images(self, ref: ImageRef) -> list:
        return [open_image(ImageRef((p,))) for p in ref.paths]  # NLVR2: two images, not pasted

    def answer_ids(self, prompt: str, answer: str, max_len: int | None = None) -> list[int]:
        """``answer`` tokenised as it follows ``prompt`` (a word-initial space merges into its first token as
        the model reads it), + EOS. Special tokens of the prompt (BOS) are not repeated."""
        tok = self.processor.tokenizer
        ctx = prompt + self.family.after_text
        joint = tok(ctx + self.family.answer_sep + answer, add_special_tokens=False)["input_ids"]
        base = tok(ctx, add_special_tokens=False)["input_ids"]
        if answer and joint[: len(base)] == base and len(joint) > len(base):
            ids = joint[len(base):]
        else:  # the boundary merged with the prompt's last token: the answer on its own
            ids = tok(self.family.answer_sep + answer, add_special_tokens=False)["input_ids"] if answer else []
        if max_len:
            ids = ids[: max(0, int(max_len) - 1)]
        return list(ids) + [tok.eos_token_id]

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        task = self._one_task(examples)
        images = [self._images(e["image"]) for e in examples]
        prompts = [render_prompt(self.processor, self.model_type, e["text"], len(im))
                   for e, im in zip(examples, images)]
        # one flat list, in prompt order: every processor assigns the images to the prompts by their image tokens
        flat = [i for im in images for i in im]
        enc = dict(self.processor(images=flat, text=prompts, padding=True, return_tensors="pt"))
        batch: dict[str, Any] = {k: v for k, v in enc.items() if k in NATIVE_INPUT_KEYS}
        max_len = getattr(self._spec_of(examples[0]), "max_target_len", None)
        batch = self._finish(batch, examples, [self.answer_ids(p, e["target_text"], max_len)
                                               for p, e in zip(prompts, examples)])
        if task_entry(task).kind == "classification":
            classes = self._spec_of(examples[0]).classes
            batch["class_token_ids"] = torch.tensor([[self.answer_ids(p, c)[0] for c in classes] for p in prompts],
                                                    dtype=torch.long)
        return batch
