"""The offline demo: an image-text data set built from easy-VQA in the VL-Adapter layout
(:mod:`vlpet.demo.build_data`) and a tiny BART-architecture text model pretrained locally with
BART's denoising objective (:mod:`vlpet.demo.pretrain`).

Imports are lazy so that ``import vlpet.demo`` stays cheap (no torch / transformers).
"""

from __future__ import annotations

__all__ = ["build_demo_data", "pretrain_demo_plm"]


def __getattr__(name: str):
    if name == "build_demo_data":
        from .build_data import build_demo_data

        return build_demo_data
    if name == "pretrain_demo_plm":
        from .pretrain import pretrain_demo_plm

        return pretrain_demo_plm
    raise AttributeError(f"module 'vlpet.demo' has no attribute {name!r}")
