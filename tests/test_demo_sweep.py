"""benchmarks/demo_sweep.py: its configurations are valid demo settings and bad names fail clearly."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest
from conftest import import_benchmark

from vlpet.demo.run import DemoSettings
from vlpet.presets import get_preset


def _load():
    return import_benchmark("demo_sweep")


def _has_type(value, hint) -> bool:
    """isinstance against a dataclass annotation (X | None, dict | None, float accepting an int)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in options:
        t = typing.get_origin(t) or t
        if t is type(None) and value is None:
            return True
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return True
    return False


def test_every_configuration_is_a_demo_setting_and_a_preset():
    from vlpet.demo.run import DEMO_TASKS
    from vlpet.train.loop import TrainConfig

    from transformers import BartConfig

    from vlpet.demo.pretrain import DEFAULT_TRAIN_CONFIG

    mod = _load()
    fields = {f.name for f in dataclasses.fields(DemoSettings)}
    hints = typing.get_type_hints(DemoSettings)
    known = {"plm_model": set(BartConfig().to_dict()), "plm_train": set(DEFAULT_TRAIN_CONFIG)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, (method, overrides) in mod.CONFIGS.items():
        demo_fields, extra = mod.split_overrides(overrides)
        assert set(demo_fields) <= fields, name
        for k, v in demo_fields.items():  # each value has its field's declared type
            assert _has_type(v, hints[k]), (name, k, v, hints[k])
        for k in ("plm_model", "plm_train"):
            if demo_fields.get(k):
                assert set(demo_fields[k]) <= known[k], (name, k, set(demo_fields[k]) - known[k])
        assert extra["tasks"] and set(extra["tasks"]) <= set(DEMO_TASKS), name
        assert isinstance(extra["seed"], int), name
        assert isinstance(extra["r_ref"], int) and extra["r_ref"] > 0, name
        assert set(extra) - {"tasks", "seed", "r_ref", "lora"} <= train_fields, name
        preset = get_preset(method)  # raises on an unknown method
        if extra["lora"]:  # LoraSpec validates its placements
            assert preset.lora is not None, name
            dataclasses.replace(preset.lora, **extra["lora"])


def test_split_overrides_sends_each_key_where_it_belongs():
    mod = _load()
    fields, extra = mod.split_overrides({"max_steps": 7, "tasks": ("vqa",), "seed": 3,
                                         "train": {"lr_schedule": "constant"}})
    assert fields == {"max_steps": 7}
    assert extra == {"tasks": ("vqa",), "seed": 3, "lr_schedule": "constant", "r_ref": 768, "lora": None}
    fields, extra = mod.split_overrides({"r_ref": 256, "lora": {"r": 8}})
    assert fields == {} and extra["r_ref"] == 256 and extra["lora"] == {"r": 8}
    fields, extra = mod.split_overrides({})
    assert fields == {} and extra["seed"] == 0 and extra["tasks"] == ("vqa", "nlvr", "caption")


def test_unknown_configuration_is_rejected_by_name(tmp_path, capsys):
    mod = _load()
    with pytest.raises(SystemExit) as e:
        mod.main(["--cache", str(tmp_path), "--out", str(tmp_path / "o"), "--only", "base,nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--only" in err and "nope" in err and "base" in err
    assert not (tmp_path / "o").exists()  # nothing built or written before the check
