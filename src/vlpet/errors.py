"""Exceptions that carry a one-line, user-facing message (the CLI prints them without a traceback)."""


class VLPetError(Exception):
    """Base class: the message names the file, field or option at fault and what was expected."""


class ConfigError(VLPetError, ValueError):
    """An unknown or conflicting option, preset, backbone or config field."""


class ShapeError(VLPetError, ValueError):
    """A tensor given to the model has the wrong shape."""


class CheckpointError(VLPetError, ValueError):
    """An adapter folder or official checkpoint that does not fit the model it is loaded into."""


class TrainingError(VLPetError, RuntimeError):
    """Training had to stop (e.g. a non-finite loss); the last good checkpoint is kept."""
