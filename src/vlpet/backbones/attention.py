"""Which scaled-dot-product-attention kernel runs (issue 8).

The VL encoder's sequences are short (56 tokens at the paper's VQA setting: 20 text + 36 visual) and
padded, so flash attention (no arbitrary mask) is not eligible and PyTorch picks cuDNN's attention on
an H100. At this length the memory-efficient kernel is faster: on the lent H100, bf16, batch 500,
VL-BART-base, the eager train step took 44.9 ms (floor) / 61.6 ms (vl-pet-large) with it against 54.5 /
71.5 ms with cuDNN's (benchmarks/README.md). vlpet's trainer runs its forward inside `preferred_attention()`:
the same kernels, tried in this order; any other stays available as a fallback.
"""

from __future__ import annotations

import contextlib

from ..errors import ConfigError

SDPA_CHOICES = ("efficient-first", "default")
_ORDER = ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH")


def preferred_attention(choice: str = "efficient-first"):
    """A context manager: `efficient-first` gives the memory-efficient kernel priority; `default` changes nothing."""
    if choice not in SDPA_CHOICES:
        raise ConfigError(f"--sdpa {choice!r}: expected one of {', '.join(SDPA_CHOICES)}")
    if choice == "default":
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, n) for n in _ORDER], set_priority=True)
    except (ImportError, AttributeError, TypeError):  # a torch without priorities: PyTorch's own order
        return contextlib.nullcontext()
