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


class MetricError(VLPetError, ValueError):
    """Predictions, references or annotations a scorer cannot use (vlpet.metrics): the message names the id,
    file or argument and what was expected."""


class MetricKeyError(MetricError, KeyError):
    """A predicted id with no gold label / annotation / reference (a KeyError too, for callers that look ids up)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class MetricTypeError(MetricError, TypeError):
    """A prediction or reference of the wrong type (a TypeError too, as it was before MetricError existed)."""


class MissingDependencyError(VLPetError, ImportError, RuntimeError):
    """An optional tool a requested metric needs (pycocoevalcap, Java) is not installed; says how to get it."""
