"""Adapter-only checkpoints (like PEFT's save_pretrained / from_pretrained) and official-checkpoint import.

An adapter folder holds:
    vlpet_config.json          backbone name/id/folder, architecture facts, visual config, method config
    adapter_model.safetensors  every trainable tensor + the added vocabulary rows (which no base
                               checkpoint has, yet the visual embedding reads them; design note)
    tokenizer files            when the model has a tokenizer
Base model + adapter folder rebuild the tuned model exactly. Files are written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError

CONFIG_NAME = "vlpet_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADDED_ROWS_KEY = "__vlpet__.added_vocab_rows"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), save(clean, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def save_adapter(model, folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = dict(model.trainable_state_dict())
    emb = model.backbone.get_input_embeddings().weight
    if emb.shape[0] > model.original_vocab_rows and not emb.requires_grad:
        # fp32 whatever the training stored them in (a bf16 frozen backbone, vlpet.frozen_precision)
        rows = emb[model.original_vocab_rows:].detach()
        tensors[ADDED_ROWS_KEY] = rows.float() if rows.dtype in (torch.bfloat16, torch.float16) else rows
    save_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt", "producer": "vlpet"})
    if model.tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            files = model.tokenizer.save_pretrained(tmp)
            for f in files:
                if Path(f).exists():
                    os.replace(f, folder / Path(f).name)
    atomic_write_json(folder / CONFIG_NAME, model.config_dict())  # last: a folder with a config is complete
    return folder


def read_adapter_config(folder) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: not an adapter folder (no {CONFIG_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    for key in ("backbone", "architecture", "vocab", "visual", "method"):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return cfg


def check_compatible(cfg: dict, have: dict, backbone_name: str, source: str) -> None:
    """Refuse an adapter built for another architecture (type, hidden size, layer counts); `have` is the
    backbone's architecture facts (vlpet.model._architecture), checked before the backbone is wrapped."""
    want = cfg["architecture"]
    for key in ("model_type", "d_model", "encoder_layers", "decoder_layers"):
        if want.get(key) != have.get(key):
            raise CheckpointError(f"{source}: adapter was made for {key}={want.get(key)!r} but the backbone "
                                  f"{backbone_name!r} has {key}={have.get(key)!r}")


@torch.no_grad()
def load_trainable(model, tensors: dict[str, torch.Tensor], source: str, strict: bool = True) -> dict:
    """Copy adapter tensors into the model; report missing/unexpected keys (an error when strict)."""
    tensors = dict(tensors)
    rows = tensors.pop(ADDED_ROWS_KEY, None)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source}: does not fit method {model.method.name!r}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for n, t in tensors.items():
        if n not in params:
            continue
        if params[n].shape != t.shape:
            raise CheckpointError(f"{source}: tensor {n!r} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(params[n].shape)}")
        params[n].copy_(t.to(params[n].dtype))
    if rows is not None:
        emb = model.backbone.get_input_embeddings().weight
        start = model.original_vocab_rows
        if emb.shape[0] - start != rows.shape[0]:
            raise CheckpointError(f"{source}: {rows.shape[0]} added vocabulary rows, the model has "
                                  f"{emb.shape[0] - start}")
        emb[start:].copy_(rows.to(emb.dtype))
    return {"missing": missing, "unexpected": unexpected}


def torch_load_weights_only(path, hint: str = ""):
    """`torch.load(path, weights_only=True)` with a one-line CheckpointError for a file that is not a torch
    checkpoint or holds something besides tensors and plain containers. Such a file is refused, never
    run, and the message never passes on torch's advice to turn weights-only loading off."""
    import re
    import zipfile

    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(2)
    # torch.save writes a zip archive (the legacy format: a pickle, first byte 0x80).
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise CheckpointError(f"{path}: unreadable as a torch checkpoint (torch.save writes a zip archive; these "
                              f"{path.stat().st_size} bytes are not one: truncated, or another format){hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (a refused object), RuntimeError / EOFError (damaged)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|Check the documentation|$)", text, re.S)
        why = " ".join((found.group(1) if found else text.strip().split("\n")[0]).split())
        why = re.split(r"\s*(?:Please|Re-running|\(1\))", why)[0][:200] or type(exc).__name__
        raise CheckpointError(f"{path}: refused or unreadable by weights-only loading, nothing in it was run "
                              f"({type(exc).__name__}: {why}){hint}") from exc
