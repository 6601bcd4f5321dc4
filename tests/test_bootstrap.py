"""Issue 16 point 6: scripts/bootstrap.sh uses pip's configured index for everything except the one torch
wheel, which comes alone (--no-deps) from PyTorch's CPU index; no other index host is named."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bootstrap.sh"


def _commands():
    # Join continued lines so that one pip call is one string.
    return [line.strip() for line in SCRIPT.read_text().replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_only_pytorch_index_is_named():
    hosts = set(re.findall(r"https?://([^/\s\"']+)", "\n".join(_commands())))
    assert hosts == {"download.pytorch.org"}
    assert "extra-index-url" not in SCRIPT.read_text()


def test_pytorch_index_serves_torch_alone():
    calls = [c for c in _commands() if "download.pytorch.org" in c]
    assert calls
    for call in calls:
        for alternative in call.split("||"):
            assert "--no-deps" in alternative and "--index-url" in alternative, alternative


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
