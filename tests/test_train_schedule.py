"""The learning-rate schedules (spec §4.1 linear warm-up/decay; "constant" after the warm-up), checked step by
step against the formulas, and bad schedule options refused by name."""

from __future__ import annotations

import pytest
import torch

from vlpet import ConfigError
from vlpet.train.loop import TrainConfig
from vlpet.train.optim import build_scheduler


def _lrs(schedule: str, total: int, warmup_ratio: float, peak: float = 2.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, total, warmup_ratio, schedule)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_schedule_values_follow_the_formula(schedule):
    total, ratio, peak = 20, 0.25, 2.0
    warmup = int(total * ratio)  # 5
    for step, lr in enumerate(_lrs(schedule, total, ratio, peak)):
        if step < warmup:
            want = peak * step / warmup
        elif schedule == "linear":
            want = peak * (total - step) / (total - warmup)
        else:
            want = peak
        assert lr == pytest.approx(want), (schedule, step)


def test_no_warmup_starts_at_the_peak():
    assert _lrs("constant", 6, 0.0)[0] == pytest.approx(2.0)
    assert _lrs("linear", 6, 0.0)[:2] == pytest.approx([2.0, 2.0 * 5 / 6])


def test_unknown_schedule_is_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="cosine"):
        build_scheduler(opt, 10, 0.1, "cosine")


@pytest.mark.parametrize("field,value,needle", [("lr_schedule", "cosine", "--lr-schedule"),
                                                ("warmup_ratio", 1.0, "--warmup-ratio"),
                                                ("warmup_ratio", -0.1, "--warmup-ratio")])
def test_train_config_names_the_bad_option(tmp_path, field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(backbone="bart-base", method="vl-pet-large", data_root=str(tmp_path), output=str(tmp_path / "o"),
                    **{field: value})


def test_cli_passes_the_schedule_options(monkeypatch, tmp_path):
    from vlpet import cli
    from vlpet.train import loop

    seen = {}
    monkeypatch.setattr(loop, "train", lambda cfg: seen.setdefault("cfg", cfg))
    cli.main(["train", "--data-root", str(tmp_path), "--output", str(tmp_path / "o"), "--lr-schedule", "constant",
              "--warmup-ratio", "0.05"])
    assert seen["cfg"].lr_schedule == "constant" and seen["cfg"].warmup_ratio == 0.05
