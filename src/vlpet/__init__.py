"""vlpet: VL-PET (ICCV 2023) parameter-efficient tuning for vision-and-language encoder-decoders."""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, ShapeError, TrainingError, VLPetError  # noqa: E402
from .method import MethodConfig, ModuleSpec  # noqa: E402
from .presets import PRESETS, get_preset  # noqa: E402


def __getattr__(name):  # keep `import vlpet` light: torch/transformers load on first use of the model
    if name in ("VLModel", "VisualConfig", "get_vlpet_model"):
        from . import model

        return getattr(model, name)
    if name == "compile_blocks":
        from .compile import compile_blocks

        return compile_blocks
    raise AttributeError(name)


__all__ = ["VLModel", "VisualConfig", "get_vlpet_model", "compile_blocks", "MethodConfig", "ModuleSpec", "PRESETS",
           "get_preset", "VLPetError", "ConfigError", "ShapeError", "CheckpointError", "TrainingError"]
