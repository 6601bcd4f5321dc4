"""Matrix-multiply FLOPs of one train step: what each PET method adds to vlpet's frozen floor (issue 19).

    python benchmarks/pet_flops.py                      # VL-BART-base (batch 500) and VL-T5-base (batch 300)
    python benchmarks/pet_flops.py --backbones bart-base --methods floor,vl-pet-large --json out.json
    python benchmarks/pet_flops.py --backbones smolvlm-2b,llava-1.5-7b \
        --json benchmarks/results/pet_flops-decoder-only-cpu-2026-12-03.json   # decoder-only VLMs (issue 20)

The step-time targets of issue 19 compare a method with `floor` (the same model with no PET module, the
backward still running through the whole frozen encoder / decoder). A PET module adds matrix multiplies
(its down- and up-projections, the gate generator), forward and backward, plus weight gradients the
floor never computes. This script counts them with `torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions and attention; element-wise work is not counted) on the CPU, for one step (forward with
the benchmark's loss, backward) at a small batch, and scales to the benchmark batch (the count is linear
in the batch, up to a small fixed part: read off two batch sizes). The ratio `method / floor` is the step-time ratio the
method would have if its extra FLOPs ran exactly as fast as the floor's average FLOP — a bound no
kernel fusion of element-wise work can move, because fusion saves memory traffic, not matmul FLOPs.

Decoder-only VLMs (`smolvlm-2b`, `llava-1.5-7b`; default methods floor, vl-pet-large, plain-peft-lora): the
step that `_decoder_only_bench.py` times (its `config`, `batch` and `build`: one image + PROMPT_LEN prompt
tokens + a TARGET_LEN-token answer, batch BATCH; vlpet rows compute the answer's logits only,
plain-peft-lora the whole sequence's), forward + backward. Clipping and the AdamW step are element-wise
(no matmul) and the bf16 autocast of the GPU run changes no FLOP count, so they are left out; the CPU's
`scaled_dot_product_attention` kernel, which FlopCounterMode does not know, is counted with the formula it
uses for the GPU's flash / efficient kernels (full s x s scores, causal masking not discounted).

A 7B model at full depth does not fit a CPU count in fp32, and random weights on the meta device do not
run (LLaVA's image-token merge and Idefics3's patch mask read tensor values). So the models are built on
the CPU at full width but with L LM layers and V vision layers, and counted at
(L, V) in {(1, 1), (2, 1), (1, 2)} and batch n in {1, 2}: six counts F(L, V, n). Why extrapolating is exact:
every LM layer is the same block with the same shapes (and a PET preset puts the same modules on every
layer), and so is every vision layer, and what runs outside them (patch embedding, projector,
embeddings, LM head, loss) depends on neither depth; so F is affine in L and in V with no L x V term
(a layer's FLOPs depend on the sequence length and the width, never on how many layers there are). Every
matmul is over the batch rows (per example: the same image and prompt lengths, no padding), so F is affine
in n too (a batch-independent part may remain, e.g. a weight-sized product; the fit keeps it). Hence
F(L, V, n) = a + b L + c V + n (d + e L + f V), six unknowns fixed by the six counts:
per_example(L, V) = F(L, V, 2) - F(L, V, 1), fixed(L, V) = 2 F(L, V, 1) - F(L, V, 2), and for either
  g(L, V) = g(1, 1) + (L - 1) [g(2, 1) - g(1, 1)] + (V - 1) [g(1, 2) - g(1, 1)]
at the real depths (LLaVA-1.5-7B: 32 and 24, SmolVLM-2B: 24 and 27), then fixed + BATCH x per_example: integer
arithmetic throughout. Parameter counts (for trainable %) are affine in L and V the same way.
tests/test_pet_flops.py checks the extrapolation against a direct count of the tiny shapes at depth 4
(and batch 3). Both backbones: 5.6 min on two CPU cores (LLaVA most of it), peak resident memory 5.8 GB;
the trainable % come out as in the H200 run of _decoder_only_bench (a check on the parameter extrapolation).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import _bench as B  # noqa: E402
import _decoder_only_bench as D  # noqa: E402

DEFAULT_METHODS = ("floor", "vl-pet-small", "vl-pet-middlex", "vl-pet-middley", "vl-pet-large", "lora")
DECODER_METHODS = ("floor", "vl-pet-large", "plain-peft-lora")
PROBES = ((1, 1), (2, 1), (1, 2))  # (LM layers, vision layers) counted; the real depths are extrapolated
PROBE_BATCHES = (1, 2)


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU's fused attention kernel (not in torch's table; the
    GPU's flash / efficient / cuDNN kernels are, with these same formulas)."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward})


def step_flops(model, batch: dict) -> int:
    """Matmul FLOPs of forward (token-mean cross-entropy over the targets) + backward."""
    from vlpet.train.losses import task_loss

    model.zero_grad(set_to_none=True)
    dec = model.backbone.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    with flop_counter() as counter:
        out = model(batch["input_ids"], batch["attention_mask"], vis_feats=batch["vis_feats"],
                    decoder_input_ids=dec, task="vqa")
        task_loss(out.logits, batch["labels"]).backward()
    return counter.get_total_flops()


def count(backbone: str, method: str, small: int = 2) -> dict:
    model = B.build_vl(backbone, method, tiny=False).train()
    vocab = model.backbone.config.vocab_size
    per = {}
    for b in (small, 2 * small):
        per[b] = step_flops(model, B.random_batch(b, torch.device("cpu"), vocab))
    # affine in the batch: per-example work plus a small batch-independent part (e.g. the pooled
    # visual tokens' position terms); both read off the two counts
    per_example = (per[2 * small] - per[small]) / small
    fixed = per[small] - small * per_example
    trainable, total = B.param_counts(model)
    n = B.PAPER_BATCH[backbone]
    return {"batch": n, "tflop_per_step": (fixed + n * per_example) / 1e12, "trainable_percent": 100 * trainable / total}


def decoder_probe(backbone: str, method: str, lm_layers: int, vis_layers: int, batches=PROBE_BATCHES,
                  tiny: bool = False) -> dict:
    """FLOPs of `_decoder_only_bench`'s step (forward with the answer as labels, backward) on the model with
    `lm_layers` LM and `vis_layers` vision layers, full width (or the --tiny shapes), at each batch size;
    and its (trainable, total) parameter counts."""
    device = torch.device("cpu")
    cfg = D.config(backbone, tiny)
    cfg.text_config.num_hidden_layers = lm_layers
    cfg.vision_config.num_hidden_layers = vis_layers
    model, params, loss_fn = D.build(backbone, cfg, method, device)
    flops = {}
    for n in batches:
        inputs = D.batch(cfg, n, device)
        for p in params:
            p.grad = None
        with flop_counter() as counter:
            loss_fn(inputs).backward()
        flops[n] = counter.get_total_flops()
    out = {"flops": flops, "params": B.param_counts(model)}
    del model, params, loss_fn
    gc.collect()
    return out


def _depth_affine(values: dict, lm_layers: int, vis_layers: int) -> int:
    """g(L, V) from g at PROBES, g affine in L and in V (no L x V term)."""
    g11, g21, g12 = (values[p] for p in PROBES)
    return g11 + (lm_layers - 1) * (g21 - g11) + (vis_layers - 1) * (g12 - g11)


def extrapolate(probes: dict, lm_layers: int, vis_layers: int, batch: int) -> tuple[int, int, int]:
    """(FLOPs of one step at `batch`, trainable, total parameters) at the real depths, from
    `probes[(L, V)] = decoder_probe(..., L, V)` at PROBES and PROBE_BATCHES = (1, 2) (module docstring: why exact)."""
    one, two = PROBE_BATCHES
    assert (one, two) == (1, 2)
    per_example = _depth_affine({p: r["flops"][2] - r["flops"][1] for p, r in probes.items()}, lm_layers, vis_layers)
    fixed = _depth_affine({p: 2 * r["flops"][1] - r["flops"][2] for p, r in probes.items()}, lm_layers, vis_layers)
    trainable = _depth_affine({p: r["params"][0] for p, r in probes.items()}, lm_layers, vis_layers)
    total = _depth_affine({p: r["params"][1] for p, r in probes.items()}, lm_layers, vis_layers)
    return fixed + batch * per_example, trainable, total


def count_decoder(backbone: str, method: str, batch: int | None = None, tiny: bool = False) -> dict:
    cfg = D.config(backbone, tiny)
    depth = (cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers)
    n = batch or D.BATCH[backbone]
    probes = {p: decoder_probe(backbone, method, *p, tiny=tiny) for p in PROBES}
    flops, trainable, total = extrapolate(probes, *depth, n)
    return {"batch": n, "tflop_per_step": flops / 1e12, "trainable_percent": 100 * trainable / total,
            "flops_per_step": flops, "lm_layers": depth[0], "vision_layers": depth[1],
            "probes": [{"lm_layers": p[0], "vision_layers": p[1], "flops": {str(k): v for k, v in r["flops"].items()},
                        "trainable": r["params"][0], "total": r["params"][1]} for p, r in probes.items()]}


def is_decoder_only(backbone: str) -> bool:
    return backbone in D.BACKBONES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", type=B.csv_list, default=["bart-base", "t5-base"])
    p.add_argument("--methods", type=B.csv_list, default=None,
                   help=f"default: {','.join(DEFAULT_METHODS)} (VL-BART / VL-T5), "
                        f"{','.join(DECODER_METHODS)} (decoder-only VLMs)")
    p.add_argument("--tiny", action="store_true", help="decoder-only VLMs: the --tiny shapes of _decoder_only_bench "
                                                      "(a smoke test; batch 2)")
    p.add_argument("--json", default=None, help="write the table as JSON to this file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for backbone in args.backbones:
        decoder = is_decoder_only(backbone)
        methods = args.methods or list(DECODER_METHODS if decoder else DEFAULT_METHODS)
        base, start = None, len(rows)
        for method in methods:
            if decoder:
                r = count_decoder(backbone, method, batch=2 if args.tiny else None, tiny=args.tiny)
            else:
                r = count(backbone, method)
            if method == "floor":
                base = r["tflop_per_step"]
            r.update(backbone=backbone, method=method,
                     ratio_to_floor=round(r["tflop_per_step"] / base, 4) if base else None)
            rows.append(r)
            print(f"| {backbone} | {r['batch']} | {method} | {r['tflop_per_step']:.3f} | "
                  f"{r['trainable_percent']:.2f} | {r['ratio_to_floor'] if r['ratio_to_floor'] else '-'} |", flush=True)
        done = rows[start:]  # this backbone's rows
        peft = next((r for r in done if r["method"] == "plain-peft-lora"), None)
        if peft:
            for r in done:
                r["ratio_to_plain_peft_lora"] = round(r["tflop_per_step"] / peft["tflop_per_step"], 4)
    if any("ratio_to_plain_peft_lora" in r for r in rows):
        print("\n| backbone | batch | method | TFLOP / step | trainable % | / floor | / plain-peft-lora |\n"
              "|---|---|---|---|---|---|---|")
        for r in rows:
            if "ratio_to_plain_peft_lora" in r:
                print(f"| {r['backbone']} | {r['batch']} | {r['method']} | {r['tflop_per_step']:.3f} | "
                      f"{r['trainable_percent']:.2f} | {r['ratio_to_floor'] or '-'} | {r['ratio_to_plain_peft_lora']} |")
    if args.json:
        import transformers

        Path(args.json).write_text(json.dumps({"benchmark": "pet_flops", "commit": B.git_commit(),
                                               "torch": torch.__version__, "transformers": transformers.__version__,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
