"""Backbones: unmodified Hugging Face encoder-decoders, plus the visual front end of VL-BART / VL-T5."""

from .arch import ARCHITECTURES, ArchSpec, arch_for
from .loading import BUILTIN_BACKBONES, load_backbone, load_tokenizer

__all__ = ["ARCHITECTURES", "ArchSpec", "arch_for", "BUILTIN_BACKBONES", "load_backbone", "load_tokenizer"]
