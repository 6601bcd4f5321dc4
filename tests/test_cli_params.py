"""`vlpet params --json` prints, offline, a percent that rounds to the paper's Params % (issue: every BART-base row
of Table 2 and Table 9, every T5-base VL-PET row, and the T5 baselines vlpet reproduces from the LST paper)."""

from __future__ import annotations

import json

import pytest

from test_core_params import PAPER_ROWS as ROWS  # the paper's Table 2 / Table 9 values, written out by hand

from vlpet.cli import main


@pytest.mark.parametrize("backbone,method,paper", ROWS, ids=[f"{b}-{m}" for b, m, _ in ROWS])
def test_params_json_rounds_to_the_paper(backbone, method, paper, capsys):
    assert main(["params", "--backbone", backbone, "--method", method, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"trainable", "total", "percent"}
    assert out["percent"] == pytest.approx(100 * out["trainable"] / out["total"], abs=1e-6)
    assert round(out["percent"], 2) == paper


def test_params_video_matches_the_spec_computation(capsys):
    expected = {"vl-pet-small": 2.18, "vl-pet-large": 3.37, "vl-adapter": 3.39}  # spec §2.3 (computed, not reported)
    for method, pct in expected.items():
        main(["params", "--backbone", "bart-base", "--method", method, "--video", "--json"])
        assert round(json.loads(capsys.readouterr().out)["percent"], 2) == pct


def test_params_unknown_method_is_one_line(capsys):
    assert main(["params", "--backbone", "bart-base", "--method", "vl-pet-huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "vl-pet-huge" in err and "vl-pet-large" in err
