"""torchrun entry point of benchmarks/multi_gpu.py: `vlpet.cli train ...` unchanged, plus per-rank
timing and peak GPU memory, written to $VLPET_MGPU_STATS/rank<r>.json when training returns.

Nothing in the training step changes: the step function is only wrapped to take a timestamp after it
returns (the step ends with the loss all-reduce's host sync of the *next* step, so a mean over many
steps is the real step time) and the global example count of the step (Trainer.step_examples).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    import torch

    import vlpet.train.loop as loop

    stats_dir = Path(os.environ["VLPET_MGPU_STATS"])
    rank = int(os.environ.get("RANK", "0"))
    steps: list[list] = []
    original = loop.Trainer._train_micro_step

    def timed(self, batch):
        loss = original(self, batch)
        steps.append([time.perf_counter(), int(self.step_examples), batch["task"], float(loss),
                      int(batch["input_ids"].shape[0])])
        return loss

    loop.Trainer._train_micro_step = timed
    from vlpet.cli import main as cli_main

    t0 = time.perf_counter()
    rc = cli_main(sys.argv[1:])
    record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "rc": rc,
              "t_start": t0, "wall_s": time.perf_counter() - t0, "steps": steps}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        record.update(device=torch.cuda.get_device_name(dev),
                      max_memory_allocated=torch.cuda.max_memory_allocated(dev),
                      max_memory_reserved=torch.cuda.max_memory_reserved(dev))
    stats_dir.mkdir(parents=True, exist_ok=True)
    (stats_dir / f"rank{rank}.json").write_text(json.dumps(record))
    return rc


if __name__ == "__main__":
    sys.exit(main())
