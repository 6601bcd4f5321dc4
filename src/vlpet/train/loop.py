"""`vlpet train`: the paper's multitask recipe (spec §4) in one readable loop.

One step = one batch of one task (size-proportional task sampling); AdamW with linear warm-up over
10% of the steps then linear decay; global-norm clipping at 5; validation every epoch; the model
after the last epoch is what the paper reports, and the best-validation one is kept too.

Run folder (`--output O`):
    run_config.json         every setting of the run (a different run is refused in the same folder)
    checkpoint/             newest complete training checkpoint: adapter + trainer_state.pt
    adapter-last/           adapter after the last epoch (the paper's choice, spec §4.7)
    adapter-best/           adapter with the best validation Avg
    log.jsonl               one line per logged step / evaluation
    tb/                     TensorBoard scalars
    results.json, results.md, plots/*.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_bytes, atomic_write_json, load_tensors, load_trainable, save_adapter
from ..data.tasks import TASKS as IMAGE_TASKS
from ..data.tasks import task_entry, task_modality
from ..errors import CheckpointError, ConfigError, TrainingError
from ..backbones.attention import preferred_attention
from ..frozen_precision import apply_frozen_dtype, resolve_frozen_dtype
from .distributed import (DistInfo, all_reduce_sum, barrier, init_distributed, needs_unused_parameter_search,
                          shutdown_distributed)
from .evaluate import autocast, collect_gates, evaluate_model, table_row, to_device
from .losses import task_loss_terms
from .optim import LR_SCHEDULES, build_optimizer, build_scheduler

STATE_NAME = "trainer_state.pt"
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_SCOPES = ("auto", "model", "blocks")
# Settings that may differ between an interrupted run and its resumption (a moved run folder resumes too).
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "num_workers", "eval_test", "debug", "output",
                     "image_cache", "image_cache_dir",  # the cache changes where features come from, not what they are
                     "recompute",  # the same forward run again in the backward (a run short of memory may add it)
                     "compile_scope"}  # how the same model is compiled (runs saved before it existed lack it)


@dataclass
class TrainConfig:
    backbone: str
    method: str
    data_root: str
    output: str
    tasks: tuple[str, ...] = IMAGE_TASKS
    epochs: int | None = None  # None: the preset's (20)
    batch_size: int | None = None  # VQA batch per process (video: every task's); None: the preset's (500 BART,
    # 300 T5; video 50). The global batch is W x it (torchrun); see Trainer._build
    lr: float | None = None
    seed: int = 42
    precision: str = "fp32"
    grad_accum: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    lr_schedule: str = "linear"  # after the warm-up: "linear" decay to 0 (spec §4.1) or "constant"
    clip_norm: float = 5.0
    weight_decay: float = 0.01
    official_ln_decay: bool = False
    feat_dim: int | None = None  # None: read from the data (2048 for CLIP RN101)
    feature_dirname: str = "data_clip_RN101_att"
    visual_pool: int = 6  # 7x7 grid -> 6x6 = 36 visual tokens (spec §3.1); the CPU demo uses 3 (9 tokens)
    mask_padded_frames: bool | None = None  # video: None/True masks zero-padded frames; False = official (attended)
    official_gqa_typo: bool = False
    caption_no_repeat_ngram_size: int = 0
    caption_metrics: tuple[str, ...] = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    limit_train: int | None = None  # keep the first N examples per task (smoke runs)
    limit_eval: int | None = None
    eval_every_epoch: bool = True
    eval_test: bool = True  # evaluate adapter-last and adapter-best on the test split at the end
    save_every_steps: int | None = None
    log_every: int = 10
    num_workers: int = 0
    device: str | None = None
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs (fixed shapes pay off)
    compile_scope: str = "auto"  # model: one graph; blocks: each layer in place (vlpet.compile); auto: see below
    memory_budget: float | None = None  # with compile: activation memory budget in (0, 1]; lower recomputes more
    recompute: bool = False  # PET activations recomputed in the backward (vlpet.recompute): less memory, a bit slower
    sdpa: str = "efficient-first"  # attention kernel order (vlpet.backbones.attention); "default": PyTorch's
    frozen_dtype: str = "auto"  # auto: the frozen backbone is stored in bf16 when precision is bf16 (frozen_precision)
    method_overrides: dict = field(default_factory=dict)
    image_root: str | None = None  # raw images for a VLM (Florence-2, BLIP-2, InstructBLIP): vlpet.data.images
    image_cache: bool = True  # VLM: frozen image features computed once per image, read from disk after that
    image_cache_dir: str | None = None  # default $VLPET_CACHE/image-features (~/.cache/vlpet/image-features)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    debug: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite conflict: resume continues the run in --output, "
                              "overwrite deletes it")
        resolve_frozen_dtype(self.frozen_dtype, self.precision)  # clear errors before anything is written
        preferred_attention(self.sdpa)
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune-no-cudagraphs"):
            raise ConfigError(f"--compile-mode {self.compile_mode!r}: expected default, reduce-overhead or "
                              f"max-autotune-no-cudagraphs")
        if self.compile_scope not in COMPILE_SCOPES:
            raise ConfigError(f"--compile-scope {self.compile_scope!r}: expected one of {', '.join(COMPILE_SCOPES)}")
        if self.compile_scope != "auto" and not self.compile:
            raise ConfigError(f"--compile-scope {self.compile_scope} needs --compile (it says what is compiled)")
        if self.compile_scope == "blocks" and self.compile_mode == "reduce-overhead":
            raise ConfigError("--compile-scope blocks does not take --compile-mode reduce-overhead: the blocks of a "
                              "frozen vision tower share one CUDA graph, and a call without gradients (the image "
                              "feature cache) overwrites a block's output with the next block's; use --compile-scope "
                              "model for CUDA graphs")
        if self.memory_budget is not None:
            if not (isinstance(self.memory_budget, (int, float)) and 0 < self.memory_budget <= 1):
                raise ConfigError(f"--memory-budget must be in (0, 1], got {self.memory_budget!r}")
            if not self.compile:
                raise ConfigError("--memory-budget needs --compile (it steers the compiled backward's recomputation)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.grad_accum < 1:
            raise ConfigError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        # 0 would silently mean "the preset's default" (or an empty run) further down: refuse it here
        for name in ("epochs", "batch_size", "max_steps", "save_every_steps", "limit_train", "limit_eval", "feat_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ConfigError(f"--lr must be a positive finite number, got {self.lr!r}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        self.tasks = tuple(self.tasks)
        task_modality(self.tasks)  # one modality per run, refused before the run folder is created


def _rng_state() -> dict:
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state_to_lists(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_to_lists(st):
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def _set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)
        dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist: DistInfo = init_distributed(torch.device(dev).type)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if dev == "cuda" and self.dist.enabled else dev)
        self.history: list[dict] = []
        self.global_step = 0  # optimizer steps
        self.micro_step = 0

    # -- set-up --------------------------------------------------------------------------------
    def _prepare_output(self) -> None:
        """Refuse an --output that holds another run (unless --resume / --overwrite); writes nothing."""
        cfg_path = self.out / "run_config.json"
        mine = self._config_record()
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--output {self.out}: exists and is not a folder")
        if cfg_path.exists():
            if self.cfg.overwrite:
                pass  # deleted by _write_output once the data and the model are known to be fine
            elif self.cfg.resume:
                try:
                    theirs = json.loads(cfg_path.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ConfigError(f"{cfg_path}: not a readable run config ({exc})") from exc
                if not isinstance(theirs, dict):
                    raise ConfigError(f"{cfg_path}: expected a JSON object of settings, got {type(theirs).__name__}")
                diff = sorted(k for k in set(mine) | set(theirs)
                              if k not in RESUMABLE_CHANGES and mine.get(k) != theirs.get(k))
                if diff:
                    raise ConfigError(f"{cfg_path}: --resume with different settings: " + ", ".join(
                        f"{k} was {theirs.get(k)!r}, now {mine.get(k)!r}" for k in diff[:5]))
            else:
                raise ConfigError(f"{self.out} already holds a run ({cfg_path.name}); pass --resume to continue it "
                                  f"or --overwrite to replace it")
        elif self.cfg.resume:
            raise ConfigError(f"--resume: {self.out} holds no run to resume (no {cfg_path.name})")
        elif self.out.exists() and any(self.out.iterdir()) and not self.cfg.overwrite:
            raise ConfigError(f"{self.out} is not empty and holds no vlpet run; choose another --output "
                              f"or pass --overwrite")

    def _write_output(self) -> None:
        """Create the run folder (replacing the old run with --overwrite) once set-up has succeeded."""
        cfg_path = self.out / "run_config.json"
        barrier(self.dist)
        if self.dist.is_main:
            if self.cfg.overwrite and cfg_path.exists():
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cfg_path, self._config_record())
        barrier(self.dist)

    def _config_record(self) -> dict:
        rec = dataclasses.asdict(self.cfg)
        rec["tasks"] = list(rec["tasks"])
        rec["caption_metrics"] = list(rec["caption_metrics"])
        if self.dist.enabled:  # --batch-size is per process: the global batch depends on the world size
            rec["world_size"] = self.dist.world_size
        return rec

    def _build(self) -> None:
        from ..backbones.loading import load_tokenizer
        from ..data import build_dataset
        from ..data.tasks import canonical_task
        from ..model import VisualConfig, VLModel
        from ..presets import get_preset

        cfg = self.cfg
        self.tasks = tuple(canonical_task(t) for t in cfg.tasks)
        from ..data.layout import VLAdapterLayout, resolve_data_root

        VLAdapterLayout(resolve_data_root(cfg.data_root))  # an existing data root, before the backbone is loaded
        if cfg.image_root is not None:  # a VLM fed raw images through its own processor (vlpet.data.images)
            from .native import build_native

            return build_native(self)
        self.video = task_modality(self.tasks) == "video"
        self.mask_padded_frames = cfg.mask_padded_frames is not False
        self.tokenizer = load_tokenizer(cfg.backbone, required=True)
        seed_everything(cfg.seed)
        from ..backbones.arch import arch_for
        from ..backbones.loading import load_backbone

        base = load_backbone(cfg.backbone, seed=cfg.seed)
        arch = arch_for(base.config.model_type)
        method = get_preset(cfg.method, arch.family, video=self.video)
        if cfg.method_overrides:
            method = method.with_overrides(cfg.method_overrides)
        sizes, per_process = self._recipe(arch.family, use_prompts=method.task_prompts,
                                          official_gqa_typo=cfg.official_gqa_typo)
        train_sets = {t: build_dataset(t, "train", cfg.data_root, self.tokenizer, spec=self.specs[t], seed=cfg.seed,
                                       feat_dim=cfg.feat_dim, feature_dirname=cfg.feature_dirname,
                                       limit=cfg.limit_train, mask_padded_frames=self.mask_padded_frames,
                                       check_features=True)  # every feature file exists, before anything is written
                      for t in self.tasks}
        feat_dim = cfg.feat_dim or self._probe_feat_dim(train_sets)
        self._probe_examples(train_sets, feat_dim)
        visual = VisualConfig.for_task(self.video, feat_dim)
        if not self.video:
            visual = dataclasses.replace(visual, pool_side=cfg.visual_pool)
        self.model = VLModel(base, method, visual, backbone_name=cfg.backbone,
                             tokenizer=self.tokenizer, seed=cfg.seed).to(self.device)
        apply_frozen_dtype(self.model, cfg.frozen_dtype, cfg.precision)
        self.feat_dim = feat_dim
        self._build_training(sizes, per_process, train_sets)

    def _recipe(self, family: str, **spec_options) -> tuple[dict, dict]:
        """The preset's recipe, the same for feature files and raw images: sets epochs, learning rate and the
        task specs (`spec_options` for get_task_spec), returns the (global, per-process) batch size per task."""
        from ..data import task_batch_sizes
        from ..data.tasks import get_task_spec
        from ..presets import train_defaults

        cfg = self.cfg
        defaults = train_defaults(cfg.method, family, video=self.video)
        self.epochs = cfg.epochs or defaults.epochs
        self.lr = cfg.lr or defaults.lr
        world = self.dist.world_size
        if cfg.batch_size:
            vqa_bs = cfg.batch_size
        else:  # the paper's batch is global: split it over the processes
            vqa_bs = max(1, defaults.batch_size // world)
            if defaults.batch_size % world and self.dist.is_main:
                print(f"vlpet: the paper's batch {defaults.batch_size} is not divisible by {world} processes; "
                      f"using {vqa_bs} per process (global {vqa_bs * world}); pass --batch-size to choose")
        self.specs = {t: get_task_spec(t, caption_no_repeat_ngram_size=cfg.caption_no_repeat_ngram_size,
                                       **spec_options) for t in self.tasks}
        # video: one batch size for all four tasks (spec §4.2). `--batch-size` is per process; the loaders
        # hold the global batches (W x it, the other tasks scaled from the global VQA batch) and each rank
        # takes its contiguous part of every global batch (vlpet.data.sampler), so W processes with
        # --batch-size B/W train on exactly the batches of one process with --batch-size B. Without
        # --batch-size the paper's (global) batch is divided by W.
        sizes = {t: vqa_bs * world for t in self.tasks} if self.video else task_batch_sizes(vqa_bs * world)
        per_process = {t: vqa_bs for t in self.tasks} if self.video else task_batch_sizes(vqa_bs)
        return sizes, per_process

    def _build_training(self, sizes: dict, per_process: dict, train_sets: dict, collate_fn=None) -> None:
        """Loaders, optimizer, schedule, DDP / compile wrappers: the same for feature files and raw images."""
        from ..data import TaskBatchLoader
        from ..data.sampler import MultitaskLoader

        cfg = self.cfg
        if cfg.recompute:  # before the optimizer and the compile wrappers see the model
            from ..recompute import set_recompute

            if not set_recompute(self.model, True):
                raise ConfigError(f"--recompute: method {self.model.method.name!r} places no PET module to recompute "
                                  f"(it is for the adapter / VL-PET methods)")
        pad = self.tokenizer.pad_token_id
        self.loaders = {t: TaskBatchLoader(ds, sizes[t], seed=cfg.seed, pad_id=pad, task=t, collate_fn=collate_fn)
                        for t, ds in train_sets.items()}
        self.train_loader = MultitaskLoader(self.loaders, seed=cfg.seed, world_size=self.dist.world_size,
                                            rank=self.dist.rank, num_workers=cfg.num_workers,
                                            pin_memory=self.device.type == "cuda")
        self.eval_batch = per_process  # evaluation runs on rank 0 alone, with the per-process sizes
        self.global_batch = sizes
        steps_per_epoch = len(self.train_loader)
        total_micro = steps_per_epoch * self.epochs
        if cfg.max_steps:
            total_micro = min(total_micro, cfg.max_steps * cfg.grad_accum)
        self.total_micro_steps = total_micro
        self.optimizer = build_optimizer(self.model, self.lr, cfg.weight_decay, official_ln_decay=cfg.official_ln_decay)
        self.scheduler = build_scheduler(self.optimizer, math.ceil(total_micro / cfg.grad_accum), cfg.warmup_ratio,
                                         cfg.lr_schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and self.device.type == "cuda")
        self.forward_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # The training step calls this wrapper, so DDP all-reduces the gradients (the official loop called
            # model.module.train_step, which bypasses DDP and never synchronises, spec §8.4).
            self.forward_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                     find_unused_parameters=needs_unused_parameter_search(self.model))
        self.loss_terms = task_loss_terms
        if cfg.compile:
            mode = None if cfg.compile_mode == "default" else cfg.compile_mode
            if cfg.memory_budget is not None:
                import torch._functorch.config as functorch_config

                # 1.0 saves what the default partitioner saves; lower trades recomputation for activation memory
                # (H100, VL-BART-base vl-pet-large, batch 500: 0.4 gave 5.46 GiB at 55.3 ms vs 8.68 GiB at 47.5 ms)
                functorch_config.activation_memory_budget = cfg.memory_budget
            if self._compile_scope() == "blocks":
                from ..compile import compile_blocks

                compile_blocks(self.model, mode=mode)  # in place: the DDP wrapper and the parameter names stay
            else:
                self.forward_model = torch.compile(self.forward_model, mode=mode)
            self.loss_terms = torch.compile(task_loss_terms, mode=mode)  # fuses the vocabulary-wide log-softmax
        t, n = self.model.parameter_counts()
        self.params = {"trainable": t, "total": n, "percent": 100 * t / n}

    def _compile_scope(self) -> str:
        """auto: each block for Florence-2 / BLIP-2 / InstructBLIP (BLIP-2 Flan-T5-XL compiled as one graph had not
        finished its first step in 4.5 minutes on an H200; by blocks its first step took 36 s, Florence-2-large's
        122 s), unless CUDA graphs are asked for; one graph otherwise (VL-BART / VL-T5, decoder-only VLMs: their
        measured path)."""
        from ..compile import repeated_blocks

        scope = self.cfg.compile_scope
        if scope == "auto":
            vlm_encoder_decoder = self.model.native_inputs and not self.model.arch.decoder_only
            scope = "blocks" if vlm_encoder_decoder and self.cfg.compile_mode != "reduce-overhead" else "model"
        if scope == "blocks" and not repeated_blocks(self.model):
            raise ConfigError(f"--compile-scope blocks: {self.cfg.backbone} has no repeated blocks (no list of two or "
                              f"more layers of one class) to compile; use --compile-scope model")
        return scope

    @staticmethod
    def _probe_feat_dim(train_sets) -> int:
        ds = next(iter(train_sets.values()))
        ex = ds.get_example(0, epoch=0) if hasattr(ds, "get_example") else ds[0]
        return int(np.shape(ex["vis_feats"])[-1])

    @staticmethod
    def _probe_examples(train_sets, feat_dim: int) -> None:
        """Read the first example of every task now, so that unreadable features or a feature size that
        differs from --feat-dim / between tasks stop the run before its folder is written."""
        from ..data import DataError

        for task, ds in train_sets.items():
            ex = ds.get_example(0, epoch=0) if hasattr(ds, "get_example") else ds[0]
            got = int(np.shape(ex["vis_feats"])[-1])
            if got != feat_dim:
                raise DataError(f"{task} train features", f"feature dim {feat_dim} (--feat-dim or the first task's)",
                                got=f"{got}")
            if hasattr(ds, "check_feature_dim"):  # image-text: every file, not just the first
                ds.check_feature_dim(feat_dim)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write checkpoint/ atomically: everything goes to .checkpoint.tmp/, then two renames. A kill at
        any moment leaves a complete checkpoint/ or (between the renames) a complete .checkpoint.old/."""
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:  # never replace the last good checkpoint by a diverged one (DDP: the same on every rank)
            raise TrainingError(f"parameters became non-finite (e.g. {bad[0]}) after step {self.micro_step}; "
                                f"stopped — the last good checkpoint in {self.out / 'checkpoint'} is kept (try a "
                                f"lower --lr or --precision fp32)")
        if not self.dist.is_main:
            return
        tmp = self.out / ".checkpoint.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_adapter(self.model, tmp)
        # gradients accumulated so far (only mid-accumulation; None right after an optimizer step); DDP syncs them
        # at every backward, so rank 0's are every rank's
        grads = {n: p.grad.detach().cpu() for n, p in self.model.named_parameters()
                 if p.requires_grad and p.grad is not None}
        state = {
            "global_step": self.global_step, "micro_step": self.micro_step, "method": self.model.method.name,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": _rng_state(), "data": self.train_loader.state_dict(),
            "history": json.dumps(self.history), "best": json.dumps(getattr(self, "best", None)),
            "running": json.dumps(getattr(self, "running", {})), "grads": grads,
        }
        torch.save(state, tmp / STATE_NAME)
        final, old = self.out / "checkpoint", self.out / ".checkpoint.old"
        if old.exists():
            if final.exists():
                shutil.rmtree(old)
            else:  # an earlier kill fell between the two renames: old is the newest complete checkpoint
                os.replace(old, final)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)  # a kill before this line leaves .checkpoint.old, which resume also reads
        if old.exists():
            shutil.rmtree(old)

    def _latest_checkpoint(self) -> Path | None:
        for name in ("checkpoint", ".checkpoint.old"):
            p = self.out / name
            if all((p / f).is_file() for f in (STATE_NAME, "vlpet_config.json", "adapter_model.safetensors")):
                return p
        return None

    def load_checkpoint(self) -> bool:
        path = self._latest_checkpoint()
        if path is None:
            return False
        from ..checkpoint import read_adapter_config

        mine = self.model.method.name
        theirs = read_adapter_config(path).get("method", {}).get("name")
        if theirs != mine:
            raise CheckpointError(f"{path}: the checkpoint holds an adapter of method {theirs!r}, this run trains "
                                  f"{mine!r}; resume it with --method {theirs}, or start a new run in another "
                                  f"--output (or pass --overwrite)")
        from ..checkpoint import torch_load_weights_only

        # weights_only: tensors and plain containers only, a pickled object is refused, never executed
        state = torch_load_weights_only(path / STATE_NAME, hint=f"; replace or delete {path} to go on")
        if not isinstance(state, dict) or state.get("method", mine) != mine:
            raise CheckpointError(f"{path / STATE_NAME}: a training state of method "
                                  f"{state.get('method') if isinstance(state, dict) else None!r}, this run trains "
                                  f"{mine!r}")
        load_trainable(self.model, load_tensors(path / "adapter_model.safetensors"), source=str(path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.train_loader.load_state_dict(state["data"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path / STATE_NAME}: does not fit this run ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
        self.global_step, self.micro_step = state["global_step"], state["micro_step"]
        self.history = json.loads(state["history"])
        self.best = json.loads(state["best"])
        self.running = json.loads(state.get("running", "{}"))
        params = dict(self.model.named_parameters())
        for n, g in state.get("grads", {}).items():  # a checkpoint taken mid gradient-accumulation
            params[n].grad = g.to(device=params[n].device, dtype=params[n].dtype)
        _set_rng_state(state["rng"])
        return True

    # -- logging --------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if not self.dist.is_main:
            return
        with open(self.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record.get("step", self.global_step))

    def _open_tensorboard(self):
        self.tb = None
        if not self.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        self._prepare_output()  # checks only: nothing is written before the data, model and checkpoint are read
        self._build()
        self.best, self.running = None, {}
        resumed = self.load_checkpoint() if cfg.resume else False
        self._write_output()
        if cfg.resume and self.dist.is_main:  # drop the log lines of steps after the checkpoint (they are redone)
            atomic_write_bytes(self.out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.history).encode())
        self._open_tensorboard()
        if self.dist.is_main:
            tp = self.params
            print(f"vlpet: {cfg.method} on {cfg.backbone} | trainable {tp['trainable']:,} of {tp['total']:,} "
                  f"({tp['percent']:.2f}%) | tasks {','.join(self.tasks)} | {len(self.train_loader)} steps/epoch x "
                  f"{self.epochs} epochs | lr {self.lr:g} | {cfg.precision} on {self.device}"
                  + (f" | resumed at step {self.micro_step}" if resumed else ""))
        model = self.model
        bar = tqdm(total=self.total_micro_steps, initial=self.micro_step, disable=not (cfg.progress and self.dist.is_main),
                   desc="train", dynamic_ncols=True)
        t0, seen = time.time(), 0
        running: dict[str, list[float]] = self.running  # losses since the last log line (kept in checkpoints)
        done = self.micro_step >= self.total_micro_steps
        while not done and self.train_loader.epoch < self.epochs:
            model.train()
            epoch = self.train_loader.epoch
            for batch in self.train_loader:
                loss = self._train_micro_step(batch)
                running.setdefault(batch["task"], []).append(loss)
                seen += self.step_examples  # over all ranks
                bar.update(1)
                if self.micro_step % cfg.grad_accum == 0 and self.global_step % max(cfg.log_every, 1) == 0:
                    rate = seen / max(time.time() - t0, 1e-9)
                    rec = {"step": self.micro_step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0],
                           "samples_per_s": rate}
                    for task, vals in running.items():
                        rec[f"loss/{task}"] = float(np.mean(vals))
                    running.clear()
                    self._log(rec)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{rec['lr']:.2e}", sps=f"{rate:.0f}")
                end_of_epoch = self.train_loader.sampler.position == len(self.train_loader)
                if cfg.save_every_steps and self.micro_step % cfg.save_every_steps == 0 and not end_of_epoch:
                    self.save_checkpoint()  # at the end of an epoch the checkpoint follows validation (below)
                if self.micro_step >= self.total_micro_steps:
                    done = True
                    break
            epoch_finished = self.train_loader.sampler.position in (0, len(self.train_loader))
            # Validate at the end of every epoch, and at --max-steps when it stops an epoch midway, so
            # that adapter-best is chosen among every adapter the run ends with.
            if (epoch_finished or done) and cfg.eval_every_epoch:
                self._validate(epoch)
            self.save_checkpoint()
        bar.close()
        return self._finish(time.time() - t0)

    def _train_micro_step(self, batch: dict) -> float:
        cfg = self.cfg
        spec = self.specs[batch["task"]]
        b = to_device(batch, self.device)
        weight = b.get("example_weight")  # only on a zero-weight padding shard (vlpet.data.sampler)
        if cfg.compile and cfg.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
        with preferred_attention(cfg.sdpa), autocast(self.device, cfg.precision):
            if batch.get("native"):  # the VLM's own inputs (input_ids, pixel_values or image_features, ...)
                from ..data.images import native_inputs

                out = self.forward_model(**native_inputs(b), labels=b["target_ids"], task=batch["task"],
                                         return_loss=False)  # task: hyperformer's task embedding
            else:
                out = self.forward_model(b["input_ids"], b["attention_mask"], vis_feats=b["vis_feats"],
                                         vis_attention_mask=b.get("vis_attention_mask"), labels=b["target_ids"],
                                         task=batch["task"], return_loss=False)
            total, count = self.loss_terms(out.logits, b["target_ids"], spec.loss_reduction,
                                           b["scores"] if spec.weight_by_score else None, weight)
        # One all-reduce per step: the loss sum, its count (samples, or target tokens for captions) and the
        # number of examples over all ranks. Each rank back-propagates its sum over the *global* count, times W
        # (DDP averages gradients over the W ranks), so the gradient is that of the whole global batch -- the
        # single-process gradient -- for either reduction and any shard sizes.
        n = float(b["input_ids"].shape[0]) if weight is None else float(weight.sum())
        stats = torch.stack([total.detach().float(), count.detach().float().to(total.device),
                             torch.tensor(n, device=total.device)])
        g_total, g_count, g_n = all_reduce_sum(stats, self.dist).tolist()
        value = g_total / max(g_count, 1.0)  # the loss of the global batch, the same on every rank
        if not math.isfinite(value):  # every rank sees the global sum, so all ranks stop together
            raise TrainingError(f"non-finite loss ({value}) at step {self.micro_step + 1}, epoch "
                                f"{batch['epoch']}, task {batch['task']}; stopped — the last good checkpoint "
                                f"in {self.out / 'checkpoint'} is kept (try a lower --lr or --precision fp32)")
        self.step_examples = int(round(g_n))
        loss = total * (self.dist.world_size / max(g_count, 1.0))
        with preferred_attention(cfg.sdpa):
            self.scaler.scale(loss / cfg.grad_accum).backward()
        self.micro_step += 1
        if self.micro_step % cfg.grad_accum == 0 or self.micro_step >= self.total_micro_steps:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.global_step += 1
        return value

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_split(self, split: str, model=None, desc: str = "") -> dict[str, dict[str, float]]:
        cfg = self.cfg
        model = model or self.model
        with preferred_attention(cfg.sdpa):
            scores, preds = self._evaluate(model, split, desc)
        self.model.train()
        self.last_predictions = preds
        return scores

    def _evaluate(self, model, split: str, desc: str):
        cfg = self.cfg
        if getattr(self, "native", None) is not None:
            from .native import evaluate_native

            return evaluate_native(self, model, split, desc)
        return evaluate_model(model, self.tokenizer, cfg.data_root, self.tasks, split, self.specs,
                                       feat_dim=self.feat_dim, feature_dirname=cfg.feature_dirname,
                                       batch_sizes=self.eval_batch, device=self.device, precision=cfg.precision,
                                       limit=cfg.limit_eval, caption_metrics=cfg.caption_metrics,
                                       progress=cfg.progress, desc=desc, skip_missing=True,
                                       mask_padded_frames=self.mask_padded_frames)

    def _validate(self, epoch: int) -> None:
        if not self.dist.is_main:
            barrier(self.dist)
            return
        scores = self.evaluate_split("val", desc="val ")
        barrier(self.dist)
        if not scores:
            return
        avg = float(np.mean([scores[t][task_entry(t).metric] for t in scores]))
        rec = {"step": self.micro_step, "epoch": epoch, "val/avg": avg}
        for t, s in scores.items():
            for k, v in s.items():
                rec[f"val/{t}/{k}"] = v
        self._log(rec)
        print(f"epoch {epoch}: validation " + ", ".join(f"{t} {s[task_entry(t).metric]:.2f}" for t, s in scores.items())
              + f" | avg {avg:.2f}")
        if self.best is None or avg > self.best["avg"]:
            self.best = {"avg": avg, "epoch": epoch, "step": self.micro_step}
            save_adapter(self.model, self.out / ".adapter-best.tmp")
            _replace_dir(self.out / ".adapter-best.tmp", self.out / "adapter-best")

    def _finish(self, seconds: float) -> dict:
        cfg = self.cfg
        result: dict[str, Any] = {"method": cfg.method, "backbone": cfg.backbone, "seed": cfg.seed,
                                  "params": self.params, "train_seconds": seconds, "steps": self.micro_step}
        if self.dist.is_main:
            save_adapter(self.model, self.out / ".adapter-last.tmp")
            _replace_dir(self.out / ".adapter-last.tmp", self.out / "adapter-last")
            if self.best is None:  # no validation ran: last is also best
                shutil.copytree(self.out / "adapter-last", self.out / "adapter-best", dirs_exist_ok=True)
            result["best"] = self.best
            if cfg.eval_test:
                from ..model import VLModel

                test = {"last": self.evaluate_split("test", desc="test(last) ")}
                self._dump_video_predictions("last")
                if self.best is not None and self.best["step"] == self.micro_step:
                    test["best"] = test["last"]  # the last epoch was the best one
                    self._dump_video_predictions("best")
                elif self.best is not None and (self.out / "adapter-best").exists():
                    best_model = VLModel.from_pretrained(self.out / "adapter-best", backbone=cfg.backbone).to(self.device)
                    test["best"] = self.evaluate_split("test", model=best_model, desc="test(best) ")
                    self._dump_video_predictions("best")
                result["test"] = test
                lines = []
                for which, scores in test.items():
                    if scores and all(t in scores for t in self.tasks):
                        avg, header, row = table_row(f"{cfg.method} ({which})", self.params["percent"], scores,
                                                     self.tasks)
                        result.setdefault("avg", {})[which] = avg
                        lines = lines or [header]
                        lines.append(row)
                if lines:
                    (self.out / "results.md").write_text("\n".join(lines) + "\n")
                    print("\n".join(lines))
            try:
                from .plots import plot_run

                gates = collect_gates(self.model, {t: l.get_batch(0, 0, 0, self.dist.world_size)
                                                   for t, l in self.loaders.items()},
                                      self.device, cfg.precision)
                if gates:
                    result["gates"] = {k: float(v) for k, v in gates.items()}
                plot_run(self.out, self.history, gates=gates)
            except Exception as exc:  # plots never fail a finished run
                print(f"vlpet: plots skipped ({exc})")
            atomic_write_json(self.out / "results.json", result)
            if self.tb is not None:
                self.tb.close()
        barrier(self.dist)
        return result


    def _dump_video_predictions(self, which: str) -> None:
        """Video runs: the test predictions of adapter-<which> in VALUE's submission format, under
        value-predictions-<which>/ (the official code dumps them for the last and the best model too)."""
        if not self.video:
            return
        from ..data.video import value_prediction_filename, write_value_predictions

        for task, result in (getattr(self, "last_predictions", None) or {}).items():
            write_value_predictions(task, result, self.out / f"value-predictions-{which}" /
                                    value_prediction_filename(task, "test"))


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def train(cfg: TrainConfig) -> dict:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        shutdown_distributed(trainer.dist)
