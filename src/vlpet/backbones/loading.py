"""Loading backbones and tokenizers the way users expect: a built-in name, a hub id or a local folder.

Built-in names (`bart-base`, `t5-base`, every key of BUILTIN_BACKBONES) are built offline from the
configs shipped in `configs/` with random weights (for `vlpet params`, benchmarks, smoke runs and
tests) and get an offline stand-in tokenizer: they never ask the hub. Hub ids (`facebook/bart-base`)
and folders load pretrained weights through `AutoModelForSeq2SeqLM.from_pretrained`; a hub id is
read from the local cache first and, when it is not there, the hub is tried once (a failed probe
ends with a one-line error that says how to work offline instead of transformers' retry loop).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
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
    hub_id: str  # where the real weights and tokenizer live, for users with internet (never asked)
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
    """A folder, as opposed to a hub id ("name" or "org/name", one slash at most)."""
    return (Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
            or (os.path.sep != "/" and os.path.sep in name))


def _check_folder_config(folder: str) -> None:
    """A local backbone folder's config.json must be readable JSON: say so, naming the file, before
    transformers reports it as something else (e.g. a tokenizer that cannot be found)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"backbone folder {folder!r} has no config.json; expected a folder written by "
                          f"save_pretrained (config.json + weights)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); expected the backbone's Hugging Face config") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"{path}: no 'model_type' field; expected the backbone's Hugging Face config "
                          f"(as written by save_pretrained)")


OFFLINE_HINT = ("to work offline use a built-in name ({builtins}: random weights, offline tokenizer), a local "
                "folder written by save_pretrained, or a model already in the Hugging Face cache with "
                "HF_HUB_OFFLINE=1")


def _offline_hint() -> str:
    return OFFLINE_HINT.format(builtins=", ".join(BUILTIN_BACKBONES))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def _hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """One connection attempt to the hub (cached per process); the reason when it fails, else None."""
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _from_hub(load, name: str, what: str, **kwargs):
    """`load(name, **kwargs)` for a hub id: the local cache first; otherwise one probe of the hub and,
    only when it answers, transformers' normal download (its retry loop would stall about 50 s)."""
    from huggingface_hub import constants, try_to_load_from_cache

    # A pure file-system look first: even a local_files_only load makes the hub client fetch its
    # agent registry once, which is a network attempt we only want when the model is cached.
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        try:
            return load(name, local_files_only=True, **kwargs)
        except OSError:
            pass  # cached in part only

    if _hub_offline():
        raise ConfigError(f"{what} {name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                          + _offline_hint())
    reason = _hub_unreachable(constants.ENDPOINT)
    if reason is not None:
        raise ConfigError(f"{what} {name!r} is not in the Hugging Face cache and {constants.ENDPOINT} cannot be "
                          f"reached ({reason}); " + _offline_hint())
    return load(name, **kwargs)


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
    local = _is_local(name_or_path)
    if local and not Path(name_or_path).is_dir():
        raise ConfigError(f"backbone folder {name_or_path!r} does not exist; give a built-in name "
                          f"({', '.join(BUILTIN_BACKBONES)}), a Hugging Face id or an existing folder")
    if local:
        _check_folder_config(name_or_path)
    try:
        from transformers import AutoConfig

        config = (AutoConfig.from_pretrained(name_or_path) if local
                  else _from_hub(AutoConfig.from_pretrained, name_or_path, "backbone"))
        cls = _model_class(config)
        if meta:
            with torch.device("meta"):
                return _from_config(config)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if local:
            return cls.from_pretrained(name_or_path, **kwargs)
        return _from_hub(cls.from_pretrained, name_or_path, "backbone", **kwargs)
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
        if _is_local(name_or_path):
            return AutoProcessor.from_pretrained(name_or_path)
        return _from_hub(AutoProcessor.from_pretrained, name_or_path, "processor")
    except (OSError, ValueError, ConfigError) as exc:  # no processor files / not cached: the model works on tensors
        logging.getLogger(__name__).info("no processor for %r: %s", name_or_path, exc)
        return None


def stand_in_tokenizer(name: str):
    """The offline tokenizer of a built-in (random-weight) backbone, derived from its entry alone.

    Byte-level (every text encodes, one token per UTF-8 byte), laid out like the real tokenizer where
    the model sees it: the config's pad / eos (/ bos, prepended when the config has one) ids, <unk> at
    the lowest free id, the vocabulary filled with unused tokens up to the real size, so that the 200
    VL tokens land on the real tokenizer's ids and the model has the same rows with or without it.
    Random weights learn nothing from real text either way; pretrained work needs the hub id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = BUILTIN_BACKBONES[name]
    config = builtin_config(name)
    if hasattr(config, "get_text_config"):  # composite (vision + language) configs keep the ids here
        config = config.get_text_config()
    size = spec.vocab_after_extension - 2 * N_EXTRA_IDS
    roles = {"pad": ("<pad>", config.pad_token_id), "eos": ("</s>", config.eos_token_id)}
    bos = getattr(config, "bos_token_id", None)
    if bos is not None:
        roles["bos"] = ("<s>", bos)
    used = {i for _, i in roles.values()}
    roles["unk"] = ("<unk>", min(set(range(len(used) + 1)) - used))
    vocab = {tok: i for tok, i in roles.values()}
    taken = set(vocab.values())
    free = (i for i in range(size) if i not in taken)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() comes unordered
        vocab[ch] = next(free)
    vocab.update((f"<unused_{i}>", i) for i in free)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    head = "<s> " if bos is not None else ""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{head}$A </s>", pair=f"{head}$A </s> $B </s>",
        special_tokens=[(t, i) for t, i in roles.values() if t in ("<s>", "</s>")])
    max_len = getattr(config, "max_position_embeddings", None) or 512
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len,
                                   **{f"{role}_token": t for role, (t, _) in roles.items()})
    fast.init_kwargs["vlpet_stand_in"] = name  # tells a saved copy apart from the real tokenizer
    return fast


def load_tokenizer(name_or_path: str, required: bool = False):
    """The backbone's tokenizer with the 200 VL tokens added, or None when it cannot be had offline
    (`required=False`). Built-in names get their offline stand-in and never ask the hub."""
    from transformers import AutoTokenizer

    try:
        if name_or_path in BUILTIN_BACKBONES:
            if not BUILTIN_BACKBONES[name_or_path].vocab_after_extension:  # a VLM: its processor tokenizes
                raise ConfigError(f"built-in {name_or_path!r} is a VLM with random weights: it has no offline "
                                  f"tokenizer or processor; pass token ids, or use its Hugging Face id "
                                  f"{BUILTIN_BACKBONES[name_or_path].hub_id!r}")
            tok = stand_in_tokenizer(name_or_path)
        elif _is_local(name_or_path):
            if not Path(name_or_path).is_dir():
                raise ConfigError(f"backbone folder {name_or_path!r} does not exist")
            _check_folder_config(name_or_path)  # a broken config.json is a config problem, not a tokenizer one
            tok = AutoTokenizer.from_pretrained(name_or_path)
        else:
            tok = _from_hub(AutoTokenizer.from_pretrained, name_or_path, "tokenizer of backbone")
    except ConfigError:
        if required:
            raise
        return None
    except (OSError, ValueError) as exc:
        if required:
            raise ConfigError(f"could not load a tokenizer for backbone {name_or_path!r}: "
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
