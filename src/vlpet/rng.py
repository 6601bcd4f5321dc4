"""Seeded blocks that leave the caller's random state untouched."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fork_rng(seed: int, enabled: bool = True):
    """Seed torch's CPU generator inside the block and restore the previous state afterwards."""
    if not enabled:
        yield
        return
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
