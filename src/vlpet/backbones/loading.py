"""Loading backbones and tokenizers the way users expect: a built-in name, a hub id or a local folder.

`bart-base` and `t5-base` are built offline from the configs shipped in `configs/` with random
weights (for `vlpet params`, benchmarks and tests); `facebook/bart-base`, `t5-base`-style hub ids or
a folder load pretrained weights through `AutoModelForSeq2SeqLM.from_pretrained`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import ConfigError
from ..rng import fork_rng

N_EXTRA_IDS = 100  # <extra_id_*> (T5 sentinels) and <vis_extra_id_*> (object-order rows), spec §3.4


@dataclass(frozen=True)
class BuiltinBackbone:
    config_file: str
    hub_id: str  # where the real weights and tokenizer live, for users with internet
    vocab_after_extension: int  # rows after adding the 200 VL tokens (spec §2.3 / §3.4)


BUILTIN_BACKBONES = {
    "bart-base": BuiltinBackbone("bart-base.json", "facebook/bart-base", 50265 + 2 * N_EXTRA_IDS),
    "t5-base": BuiltinBackbone("t5-base.json", "google-t5/t5-base", 32000 + 2 * N_EXTRA_IDS),
    # VLMs keep their own vocabulary (no added rows); configs and sources: docs/vlm-backbones.md
    "florence2-base": BuiltinBackbone("florence2-base.json", "florence-community/Florence-2-base", 0),
    "florence2-large": BuiltinBackbone("florence2-large.json", "florence-community/Florence-2-large", 0),
    "blip2-flan-t5-xl": BuiltinBackbone("blip2-flan-t5-xl.json", "Salesforce/blip2-flan-t5-xl", 0),
    # decoder-only VLMs (issue 20; sources and meta-device counts: docs/decoder-only.md)
    "smolvlm-2b": BuiltinBackbone("smolvlm-2b.json", "HuggingFaceTB/SmolVLM-Instruct", 0),
    "llava-1.5-7b": BuiltinBackbone("llava-1.5-7b.json", "llava-hf/llava-1.5-7b-hf", 0),
}

# model_type -> transformers class of the encoder-decoder VLMs vlpet supports (issue 18)
VLM_CLASSES = {"florence2": "Florence2ForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration",
               "instructblip": "InstructBlipForConditionalGeneration",
               # decoder-only VLMs (issue 20)
               "llava": "LlavaForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
               "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "paligemma": "PaliGemmaForConditionalGeneration"}


def builtin_config(name: str):
    from transformers import AutoConfig

    spec = BUILTIN_BACKBONES[name]
    text = resources.files("vlpet.backbones").joinpath("configs", spec.config_file).read_text()
    data = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def _is_local(name: str) -> bool:
    """A folder path, not a hub id: hub ids are "name" or "owner/name" (one slash, no leading . / ~)."""
    if Path(name).exists() or name.startswith((".", "/", "~")):
        return True
    return name.count("/") > 1 or (os.path.sep != "/" and os.path.sep in name)


def _model_class(config):
    """The class that builds `config`: a supported VLM's own class, else AutoModelForSeq2SeqLM. A VLM vlpet
    does not support (decoder-only, BLIP-2 with OPT, ...) is refused by the architecture table."""
    import transformers

    from .arch import arch_for

    if config.model_type in VLM_CLASSES or hasattr(config, "vision_config"):
        arch_for(config.model_type, config)  # one-line ConfigError naming the supported VLMs
        return getattr(transformers, VLM_CLASSES[config.model_type])
    return transformers.AutoModelForSeq2SeqLM


def _from_config(config):
    cls = _model_class(config)
    return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)


def load_backbone(name_or_path: str, *, seed: int = 0, meta: bool = False, dtype: torch.dtype | None = None):
    """Return an unmodified HF seq2seq LM or encoder-decoder VLM (Florence-2, BLIP-2 / InstructBLIP with T5).

    `meta=True` builds the architecture without allocating weights (parameter counting).
    Built-in names get random weights drawn under `seed`, so the same seed rebuilds the same model.
    """
    if name_or_path in BUILTIN_BACKBONES:
        config = builtin_config(name_or_path)
        if meta:
            with torch.device("meta"):
                return _from_config(config)
        with fork_rng(seed):
            model = _from_config(config)
        return model
    if _is_local(name_or_path) and not Path(name_or_path).is_dir():
        raise ConfigError(f"backbone folder {name_or_path!r} does not exist; give a built-in name "
                          f"({', '.join(BUILTIN_BACKBONES)}), a Hugging Face id or an existing folder")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path)
        cls = _model_class(config)
        if meta:
            with torch.device("meta"):
                return _from_config(config)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"could not load backbone {name_or_path!r} as a Hugging Face seq2seq model or supported VLM ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); built-in offline names: {', '.join(BUILTIN_BACKBONES)}"
        ) from exc


def load_processor(name_or_path: str):
    """The VLM's Hugging Face processor, or None when none can be had offline (built-in random names make
    no network attempt; a folder without processor files gives None)."""
    if name_or_path in BUILTIN_BACKBONES:
        return None
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path)
    except Exception:  # noqa: BLE001 - any failure means "no processor here"; the model still works on tensors
        return None


def load_tokenizer(name_or_path: str, required: bool = False):
    """The backbone's tokenizer with the 200 VL tokens added, or None when it cannot be had offline."""
    from transformers import AutoTokenizer

    source = BUILTIN_BACKBONES[name_or_path].hub_id if name_or_path in BUILTIN_BACKBONES else name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        if required:
            raise ConfigError(f"could not load a tokenizer for backbone {name_or_path!r} from {source!r}: "
                              f"{str(exc).splitlines()[0][:200]}") from exc
        return None
    extend_tokenizer(tok)
    return tok


def vl_special_tokens(tokenizer) -> list[str]:
    """The tokens VL-T5 adds, in its order: <extra_id_99>..<extra_id_0>, <vis_extra_id_99>..<vis_extra_id_0>."""
    vocab = tokenizer.get_vocab()
    wanted = [f"<extra_id_{i}>" for i in reversed(range(N_EXTRA_IDS))]
    wanted += [f"<vis_extra_id_{i}>" for i in reversed(range(N_EXTRA_IDS))]
    return [t for t in wanted if t not in vocab]


def extend_tokenizer(tokenizer) -> int:
    """Add the missing VL tokens (T5 tokenizers already hold the 100 <extra_id_*>); returns how many."""
    missing = vl_special_tokens(tokenizer)
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return len(missing)


def vocab_size_after_extension(name_or_path: str, model, tokenizer) -> int:
    if tokenizer is not None:
        return len(tokenizer)
    if name_or_path in BUILTIN_BACKBONES:
        return BUILTIN_BACKBONES[name_or_path].vocab_after_extension
    return model.get_input_embeddings().num_embeddings + 2 * N_EXTRA_IDS
