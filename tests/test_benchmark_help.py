"""Every benchmark script's --help works and names its own options (README / benchmarks/README.md quote them)."""

import sys

import pytest
from conftest import BENCHMARKS, import_benchmark

SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_"))


def test_the_list_is_not_empty():
    assert {"train_step", "pet_profile", "pet_flops", "saved_tensors"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_help(name, capsys, monkeypatch):
    module = import_benchmark(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--" in out, out[:200]
