"""Recipe files: one YAML/JSON file per paper row (recipes/<backbone>/<preset>.yaml), validated against
`TrainConfig` with the offending key named; command-line options override the file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import ConfigError
from .loop import TrainConfig

REQUIRED = ("data_root", "output")


def read_recipe(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                          f"({' '.join(str(exc).split())[:300]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {key!r}; allowed: {', '.join(sorted(fields))}")
        _check_type(path, key, value, fields[key].type)
    return data


def _check_type(path, key, value, annotation) -> None:
    ann = str(annotation)
    ok = True
    if value is None:
        ok = "None" in ann
    elif ann.startswith("bool"):
        ok = isinstance(value, bool)
    elif ann.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif ann.startswith("str"):
        ok = isinstance(value, str)
    elif ann.startswith("tuple"):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    elif ann.startswith("dict"):
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(f"{path}: key {key!r} expects {ann}, got {value!r}")


def build_train_config(config_path, cli: dict, debug: bool = False) -> TrainConfig:
    data = read_recipe(config_path) if config_path else {}
    data.update(cli)
    for key in ("tasks", "caption_metrics"):
        if key in data:
            data[key] = tuple(data[key])
    data.setdefault("backbone", "bart-base")
    data.setdefault("method", "vl-pet-large")
    missing = [k for k in REQUIRED if not data.get(k)]
    if missing:
        raise ConfigError("vlpet train needs " + " and ".join(f"--{k.replace('_', '-')}" for k in missing))
    return TrainConfig(**data, debug=debug)
