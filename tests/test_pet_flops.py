"""benchmarks/pet_flops.py, decoder-only VLMs: the depth / batch extrapolation is exact (tiny shapes, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import import_benchmark

pet_flops = import_benchmark("pet_flops")


@pytest.mark.parametrize("method", ["vl-pet-large", "plain-peft-lora"])  # floor: the same path, no PET module
@pytest.mark.parametrize("backbone", ["smolvlm-2b", "llava-1.5-7b"])
def test_extrapolation_equals_direct_count(backbone, method):
    """FLOPs and parameter counts read off depths (1, 1), (2, 1), (1, 2) at batch 1 and 2 predict, to the
    last FLOP, a direct count at 4 LM layers, 4 vision layers and batch 3."""
    probes = {p: pet_flops.decoder_probe(backbone, method, *p, tiny=True) for p in pet_flops.PROBES}
    flops, trainable, total = pet_flops.extrapolate(probes, 4, 4, 3)
    direct = pet_flops.decoder_probe(backbone, method, 4, 4, batches=(3,), tiny=True)
    assert flops == direct["flops"][3]
    assert (trainable, total) == direct["params"]
    # the probes are not degenerate: each layer kind and each example adds FLOPs
    f = {p: r["flops"] for p, r in probes.items()}
    assert f[(2, 1)][1] > f[(1, 1)][1] and f[(1, 2)][1] > f[(1, 1)][1] and f[(1, 1)][2] > f[(1, 1)][1]


def test_cpu_attention_is_counted():
    """torch's FlopCounterMode has no formula for the CPU's fused SDPA kernel; pet_flops' counter adds the
    one torch uses for the GPU kernels (2 matmuls forward, 5 backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain, pet_flops.flop_counter() as ours:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    bmm = 2 * (2 * 3) * 5 * 5 * 8  # one [5 x 8] @ [8 x 5] (or [5 x 5] @ [5 x 8]) per batch row and head
    assert plain.get_total_flops() == 0
    assert ours.get_total_flops() == 2 * bmm + 5 * bmm  # forward: QK^T, PV; backward: scores again + 4 gradients
