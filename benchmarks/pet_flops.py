"""Matrix-multiply FLOPs of one train step: what each PET method adds to vlpet's frozen floor (issue 19).

    python benchmarks/pet_flops.py                      # VL-BART-base (batch 500) and VL-T5-base (batch 300)
    python benchmarks/pet_flops.py --backbones bart-base --methods floor,vl-pet-large --json out.json

The step-time targets of issue 19 compare a method with `floor` (the same model with no PET module, the
backward still running through the whole frozen encoder / decoder). A PET module adds matrix multiplies
(its down- and up-projections, the gate generator), forward and backward, plus weight gradients the
floor never computes. This script counts them with `torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions and attention; element-wise work is not counted) on the CPU, for one step (forward with
the benchmark's loss, backward) at a small batch, and scales to the benchmark batch (the count is linear
in the batch, up to a small fixed part: read off two batch sizes). The ratio `method / floor` is the step-time ratio the
method would have if its extra FLOPs ran exactly as fast as the floor's average FLOP — a bound no
kernel fusion of element-wise work can move, because fusion saves memory traffic, not matmul FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import _bench as B  # noqa: E402

DEFAULT_METHODS = ("floor", "vl-pet-small", "vl-pet-middlex", "vl-pet-middley", "vl-pet-large", "lora")


def step_flops(model, batch: dict) -> int:
    """Matmul FLOPs of forward (token-mean cross-entropy over the targets) + backward."""
    from vlpet.train.losses import task_loss

    model.zero_grad(set_to_none=True)
    dec = model.backbone.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    with FlopCounterMode(display=False) as counter:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", type=B.csv_list, default=["bart-base", "t5-base"])
    p.add_argument("--methods", type=B.csv_list, default=list(DEFAULT_METHODS))
    p.add_argument("--json", default=None, help="write the table as JSON to this file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for backbone in args.backbones:
        base = None
        for method in args.methods:
            r = count(backbone, method)
            if method == "floor":
                base = r["tflop_per_step"]
            r.update(backbone=backbone, method=method,
                     ratio_to_floor=round(r["tflop_per_step"] / base, 4) if base else None)
            rows.append(r)
            print(f"| {backbone} | {r['batch']} | {method} | {r['tflop_per_step']:.3f} | "
                  f"{r['trainable_percent']:.2f} | {r['ratio_to_floor'] if r['ratio_to_floor'] else '-'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "pet_flops", "commit": B.git_commit(),
                                               "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
