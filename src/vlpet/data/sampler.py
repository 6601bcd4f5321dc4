"""Index-addressable task loaders and the multi-task schedule (spec §4.2 - §4.4).

* :class:`TaskBatchLoader` turns one dataset into batches addressed by ``(epoch, i)``: batch ``i``
  of epoch ``e`` is a pure function of (seed, task, e, i), so any batch can be rebuilt without
  replaying the ones before it.
* :class:`MultitaskSampler` is the epoch schedule: a list holding each task once per step that
  task contributes, shuffled with ``random.Random(seed * 1000003 + epoch)``. Every global batch of
  every task is used exactly once per epoch and each step holds one task. Unlike the official
  code (``random.Random(epoch)`` and a ``DistributedSampler`` with seed 0), the run seed fixes
  both the task order and the per-task data order. Its state is ``(epoch, position)``.
* :class:`MultitaskLoader` ties them together and yields collated batches; it can prefetch with
  DataLoader workers and still resume exactly, because each batch carries its ``step``.

Several processes (``world_size`` W, ``rank`` r): the schedule is that of one process, the same on
every rank, and every global batch is split among the ranks. The loaders hold the *global* batch
size B of each task; at every step all ranks take the same task and the same global batch k, and
rank r keeps the r-th of W contiguous parts of it (``np.array_split`` of its example list: sizes
differ by at most one, the first B mod W parts are one longer). The union over the ranks is
therefore exactly the batch a single process with batch size B takes at that step, in the same
epoch order, and the number of steps per epoch does not depend on W. When a (last) global batch
has fewer than W examples, the ranks left without one get a copy of its first example with
``example_weight`` 0 (every other batch carries no ``example_weight``: all weights are 1), so that
every rank still runs the step; the trainer weights each rank's loss by the global example (token)
count so the all-reduced gradient equals the single-process one (vlpet.train.loop). Each shard is
padded to its own longest sequence, which changes nothing for the methods whose output for an example
ignores padding; the official small-granularity gate (an unmasked mean over all positions: vl-pet-small
and the G-small rows) reads the padding, so it agrees only approximately (``masked_mean`` makes it
exact), as it would for any change of batch composition. Dropout masks are not those of one process.
"""

from __future__ import annotations

import math
import random
import zlib
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import collate

__all__ = [
    "task_batch_sizes",
    "TaskBatchLoader",
    "TaskStep",
    "MultitaskSampler",
    "MultitaskLoader",
]


def task_batch_sizes(vqa_batch: int) -> dict[str, int]:
    """Batch sizes of the four tasks from the VQA batch (spec §4.2): GQA int(bs*100/60), NLVR2
    int(bs*20/60), COCO int(bs*50/60). 500 -> 833/166/416, 300 -> 500/100/250. Sizes are at least 1
    (the official code would build a zero-size batch for bs < 3). The trainer passes the global VQA
    batch (W x the per-process ``--batch-size``), so W processes run the batches of one."""
    bs = int(vqa_batch)
    if bs < 1:
        raise ValueError(f"VQA batch size must be >= 1, got {vqa_batch}")
    return {
        "vqa": bs,
        "gqa": max(1, int(bs * 100 / 60)),
        "nlvr": max(1, int(bs * 20 / 60)),
        "caption": max(1, int(bs * 50 / 60)),
    }


def _task_salt(task: str) -> int:
    return zlib.crc32(task.encode())


class TaskBatchLoader:
    """Batches of one dataset addressed by ``(epoch, i)``.

    ``shuffle`` permutes the examples per epoch with a generator seeded by (seed, task, epoch);
    without it, batches are consecutive in dataset order (for evaluation). ``drop_last`` drops a
    final partial batch.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pad_id: int | None = None,
        collate_fn: Callable | None = None,
        task: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.task = task or getattr(dataset, "task", "task")
        self.pad_id = pad_id if pad_id is not None else getattr(dataset, "pad_id", None)
        if collate_fn is None:
            if self.pad_id is None:
                raise ValueError("pass pad_id (the dataset has no pad_id attribute)")
            collate_fn = _Collate(self.pad_id)
        self.collate_fn = collate_fn
        n = len(dataset)
        self.num_batches = n // self.batch_size if drop_last else math.ceil(n / self.batch_size)
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example order of an epoch (cached for the last epoch asked)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = len(self.dataset)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, _task_salt(self.task), int(epoch)])
            order = rng.permutation(n)
        else:
            order = np.arange(n)
        self._order_cache = (int(epoch), order)
        return order

    def batch_indices(self, epoch: int, i: int) -> list[int]:
        if not 0 <= i < self.num_batches:
            raise IndexError(f"{self.task}: batch {i} out of range [0, {self.num_batches})")
        order = self.epoch_order(epoch)
        return [int(j) for j in order[i * self.batch_size : (i + 1) * self.batch_size]]

    def shard_indices(self, epoch: int, i: int, shard: int = 0, num_shards: int = 1) -> list[int]:
        """Part ``shard`` of ``num_shards`` contiguous, near-equal parts of batch ``i`` (possibly
        empty when the batch has fewer than ``num_shards`` examples)."""
        if not 0 <= shard < num_shards:
            raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}")
        idx = self.batch_indices(epoch, i)
        if num_shards == 1:
            return idx
        n, k = len(idx), num_shards
        start = shard * (n // k) + min(shard, n % k)  # np.array_split's boundaries
        return idx[start : start + n // k + (1 if shard < n % k else 0)]

    def get_batch(self, epoch: int, i: int, shard: int = 0, num_shards: int = 1) -> dict[str, Any]:
        """The collated batch ``i`` of epoch ``epoch`` (per-example randomness keyed by epoch), or
        part ``shard`` of ``num_shards`` of it (see the module docstring; an empty part is the
        batch's first example with ``example_weight`` 0)."""
        ds = self.dataset
        idx = self.shard_indices(epoch, i, shard, num_shards)
        padded = not idx
        if padded:
            idx = self.batch_indices(epoch, i)[:1]
        if hasattr(ds, "get_example"):
            examples = [ds.get_example(j, epoch=epoch) for j in idx]
        else:
            examples = [ds[j] for j in idx]
        batch = self.collate_fn(examples)
        if padded:
            batch["example_weight"] = torch.zeros(len(idx))
        return batch

    def iter_epoch(self, epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        """Batches ``start + rank, start + rank + W, ...`` of an epoch (e.g. sharded evaluation)."""
        for i in range(start + rank, self.num_batches, world_size):
            yield self.get_batch(epoch, i)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_epoch(0)


class _Collate:
    """Picklable ``collate(batch, pad_id)`` closure."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch):
        return collate(batch, self.pad_id)


class TaskStep(NamedTuple):
    epoch: int
    step: int  # position within the epoch
    task: str
    batch_index: int  # global batch index in the task's epoch order (the same on every rank)
    shard: int = 0  # this rank's part of the global batch (the rank) ...
    num_shards: int = 1  # ... of this many (the world size)


class MultitaskSampler:
    """The per-epoch task schedule, resumable through ``state_dict()`` / ``load_state_dict()``.

    ``batches_per_task``: number of (global) batches of each task's loader per epoch; their order
    (dict order) is part of the schedule and is checked on resume. ``world_size`` / ``rank`` only
    label the steps with this rank's shard of each global batch: the schedule is the same on
    every rank and for every world size. Iterating yields the
    remaining :class:`TaskStep` s of the current epoch and then moves to the next epoch; the
    position is advanced *before* each step is handed out, so a state saved while processing a
    step resumes at the following one.
    """

    def __init__(
        self,
        batches_per_task: Mapping[str, int],
        seed: int = 0,
        *,
        world_size: int = 1,
        rank: int = 0,
        epoch: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batches_per_task = {str(t): int(n) for t, n in batches_per_task.items()}
        for t, n in self.batches_per_task.items():
            if n < 0:
                raise ValueError(f"task {t!r} has a negative batch count {n}")
        self.seed = int(seed)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.epoch = int(epoch)
        self.position = 0
        self._cache: tuple[int, list[TaskStep]] | None = None
        if len(self) == 0:
            raise ValueError(f"no batches to schedule: {self.batches_per_task}")

    # ---- schedule --------------------------------------------------------------------------
    def steps_per_task(self) -> dict[str, int]:
        return dict(self.batches_per_task)  # one step per global batch, whatever the world size

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return sum(self.steps_per_task().values())

    def task_order(self, epoch: int) -> list[str]:
        """The shuffled task list of an epoch (identical on all ranks)."""
        tasks = [t for t, k in self.steps_per_task().items() for _ in range(k)]
        random.Random(self.seed * 1000003 + int(epoch)).shuffle(tasks)
        return tasks

    def schedule(self, epoch: int) -> list[TaskStep]:
        """Every step of an epoch (global batch ``batch_index`` of ``task``; this rank's shard)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        seen = dict.fromkeys(self.batches_per_task, 0)
        steps = []
        for p, t in enumerate(self.task_order(epoch)):
            k = seen[t]
            seen[t] += 1
            steps.append(TaskStep(int(epoch), p, t, k, self.rank, self.world_size))
        self._cache = (int(epoch), steps)
        return steps

    # ---- iteration and state ---------------------------------------------------------------
    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = int(epoch), int(position)
        self._normalise()

    def _normalise(self) -> None:
        n = len(self)
        if not 0 <= self.position <= n:
            raise ValueError(f"position {self.position} outside [0, {n}]")
        if self.position == n:  # the epoch was finished: continue with the next one
            self.epoch += 1
            self.position = 0

    def remaining(self) -> list[TaskStep]:
        self._normalise()
        return self.schedule(self.epoch)[self.position :]

    def advance(self, step: TaskStep) -> None:
        """Mark ``step`` as consumed (position = step.step + 1)."""
        self.epoch, self.position = step.epoch, step.step + 1

    def __iter__(self) -> Iterator[TaskStep]:
        steps = self.remaining()
        for s in steps:
            self.advance(s)
            yield s
        self._normalise()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "batches_per_task": dict(self.batches_per_task),
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore (epoch, position). With ``strict``, the seed and the per-task batch counts (and
        their order) must match, since otherwise the schedule would differ. The world size may
        differ: the schedule of global batches does not depend on it."""
        if strict:
            for key in ("seed",):
                if key in state and state[key] != getattr(self, key):
                    raise ValueError(f"sampler state has {key}={state[key]}, this sampler {getattr(self, key)}")
            if "batches_per_task" in state and list(state["batches_per_task"].items()) != list(
                self.batches_per_task.items()
            ):
                raise ValueError(
                    f"sampler state has batches_per_task={state['batches_per_task']}, "
                    f"this sampler {self.batches_per_task}"
                )
        self.set_epoch(int(state["epoch"]), int(state["position"]))


class _StepBatches(Dataset):
    """Map-style view of the remaining steps, for DataLoader workers."""

    def __init__(self, loaders: Mapping[str, TaskBatchLoader], steps: list[TaskStep]) -> None:
        self.loaders = loaders
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> dict[str, Any]:
        s = self.steps[k]
        batch = self.loaders[s.task].get_batch(s.epoch, s.batch_index, s.shard, s.num_shards)
        batch["epoch"], batch["step"] = s.epoch, s.step
        return batch


def _identity(x):
    return x


class MultitaskLoader:
    """Yields one single-task collated batch per step, following a :class:`MultitaskSampler`.

    Each batch also carries ``epoch`` and ``step``. ``state_dict()`` reflects the batches actually
    handed out (not those prefetched by workers), so saving it with a checkpoint and loading it
    into a fresh loader continues with exactly the next batch. Typical loop::

        loader = MultitaskLoader(loaders, seed=42)
        loader.load_state_dict(ckpt["data"])          # optional
        while loader.epoch < n_epochs:
            for batch in loader:                        # rest of the current epoch
                ...
    """

    def __init__(
        self,
        loaders: Mapping[str, TaskBatchLoader],
        seed: int = 0,
        *,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.loaders = dict(loaders)
        self.sampler = MultitaskSampler(
            {t: l.num_batches for t, l in self.loaders.items()}, seed, world_size=world_size, rank=rank
        )
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory

    @property
    def epoch(self) -> int:
        self.sampler._normalise()
        return self.sampler.epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        steps = self.sampler.remaining()
        if self.num_workers <= 0:
            for s in steps:
                batch = self.loaders[s.task].get_batch(s.epoch, s.batch_index, s.shard, s.num_shards)
                batch["epoch"], batch["step"] = s.epoch, s.step
                self.sampler.advance(s)
                yield batch
        else:
            dl = DataLoader(
                _StepBatches(self.loaders, steps),
                batch_size=None,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=_identity,
                prefetch_factor=self.prefetch_factor,
                pin_memory=self.pin_memory,
            )
            for batch, s in zip(dl, steps):
                self.sampler.advance(s)
                yield batch
        self.sampler._normalise()

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.sampler.set_epoch(epoch, position)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        self.sampler.load_state_dict(state, strict)
