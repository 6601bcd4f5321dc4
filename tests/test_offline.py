"""Issue 16 point 2: built-in backbones build and train with no network attempt (a byte-level stand-in
tokenizer derived from BUILTIN_BACKBONES), a hub id fails fast after one try with a line that says how
to work offline, and a broken config.json is reported as a config problem naming the file."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from vlpet.backbones import loading
from vlpet.backbones.loading import (BUILTIN_BACKBONES, N_EXTRA_IDS, load_backbone, load_tokenizer,
                                     vocab_size_after_extension)
from vlpet.errors import ConfigError
from conftest import online_subprocess_env


@pytest.mark.parametrize("name", [n for n, e in BUILTIN_BACKBONES.items() if e.vocab_after_extension])
def test_stand_in_tokenizer_fits_the_builtin(name, tmp_path):
    """The VL-BART / VL-T5 built-ins (the VLM built-ins tokenize through their processor: none offline)."""
    from transformers import AutoTokenizer

    entry = BUILTIN_BACKBONES[name]
    config = loading.builtin_config(name)
    tok = load_tokenizer(name, required=True)
    # Same rows as without a tokenizer (Params % unchanged), VL tokens where the real tokenizer puts them.
    assert len(tok) == entry.vocab_after_extension
    assert vocab_size_after_extension(name, None, tok) == vocab_size_after_extension(name, None, None)
    base = entry.vocab_after_extension - 2 * N_EXTRA_IDS
    assert tok.convert_tokens_to_ids("<extra_id_99>") == base
    assert tok.convert_tokens_to_ids("<vis_extra_id_0>") == base + 2 * N_EXTRA_IDS - 1
    assert (tok.pad_token_id, tok.eos_token_id) == (config.pad_token_id, config.eos_token_id)
    text = "Is the cat red? Ünïcode ok"
    ids = tok(text)["input_ids"]
    assert ids[-1] == config.eos_token_id and max(ids) < base
    bos = getattr(config, "bos_token_id", None)
    assert (ids[0] == bos) if bos is not None else ids[0] != tok.pad_token_id
    assert len(ids) == len(text.encode()) + 1 + (bos is not None)  # one token per UTF-8 byte
    assert tok.decode(ids, skip_special_tokens=True) == text
    # NLVR2 reads the first token of "false" / "true": they must differ.
    f, t = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("false", "true"))
    assert f != t
    # A run folder keeps its tokenizer: the saved copy loads back through the public path unchanged.
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again(text)["input_ids"] == ids and len(again) == len(tok)


_env = online_subprocess_env  # no offline variable: what a user runs


GUARD = textwrap.dedent("""
    import os, socket, sys
    assert "HF_HUB_OFFLINE" not in os.environ
    CALLS = []
    def _refuse(*args, **kwargs):
        CALLS.append(args[:2])
        raise OSError("network attempt in an offline test")
    socket.getaddrinfo = socket.create_connection = _refuse
    socket.socket.connect = socket.socket.connect_ex = lambda self, *a: _refuse(*a)
""")


def test_builtin_trains_with_no_network_attempt(tmp_path):
    from vlpet.data import make_image_text_fixture

    data = make_image_text_fixture(tmp_path / "data", n_per_split=2, feat_dim=16).root
    script = GUARD + textwrap.dedent(f"""
        from vlpet.cli import main
        rc = main(["train", "--backbone", "bart-base", "--method", "vl-pet-small", "--data-root", {str(data)!r},
                   "--tasks", "vqa", "--output", {str(tmp_path / "run")!r}, "--max-steps", "1", "--batch-size",
                   "2", "--limit-train", "2", "--no-eval", "--no-test", "--device", "cpu", "--no-progress"])
        print("RC", rc, "CALLS", CALLS)
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RC 0 CALLS []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert took < 120  # the case waited ~50 s on the hub before it even started


def _no_network(monkeypatch):
    calls = []

    def refuse(address, *args, **kwargs):
        calls.append(address)
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", refuse)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    loading._hub_unreachable.cache_clear()
    return calls


@pytest.mark.parametrize("load", [lambda n: load_tokenizer(n, required=True), lambda n: load_backbone(n),
                                  lambda n: load_backbone(n, meta=True)])
def test_unreachable_hub_fails_fast_with_one_try(monkeypatch, load):
    calls = _no_network(monkeypatch)
    start = time.monotonic()
    with pytest.raises(ConfigError) as ei:
        load("some-org/not-cached-model")
    assert time.monotonic() - start < 5
    assert len(calls) == 1  # one probe, no retry loop
    msg = str(ei.value)
    assert "\n" not in msg and "'some-org/not-cached-model'" in msg and "cannot be reached" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "bart-base" in msg and "local folder" in msg
    loading._hub_unreachable.cache_clear()


def test_hub_offline_names_the_way_out():
    # conftest sets HF_HUB_OFFLINE=1: nothing cached -> one line, no network.
    with pytest.raises(ConfigError) as ei:
        load_tokenizer("some-org/not-cached-model", required=True)
    assert "HF_HUB_OFFLINE is set" in str(ei.value) and "built-in name" in str(ei.value)
    assert load_tokenizer("some-org/not-cached-model") is None  # optional: quietly absent


@pytest.mark.parametrize("text, words", [("{not json", ["not valid JSON"]),
                                         (json.dumps({"d_model": 32}), ["no 'model_type'"])])
def test_broken_config_is_a_config_error(backbone_factory, tmp_path, text, words):
    import shutil

    folder = tmp_path / "bb"
    shutil.copytree(backbone_factory("bart"), folder)
    (folder / "config.json").write_text(text)
    for load in (lambda: load_tokenizer(str(folder), required=True), lambda: load_backbone(str(folder))):
        with pytest.raises(ConfigError) as ei:
            load()
        msg = str(ei.value)
        assert str(folder / "config.json") in msg and "tokenizer" not in msg
        for w in words:
            assert w in msg
