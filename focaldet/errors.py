"""Errors focaldet raises on bad user input.

Each message is one line and names the file, image or annotation at fault, so that a
user sees *what* to fix instead of a traceback from deep inside a worker.
"""


class FocaldetError(Exception):
    """Base class of focaldet's user-facing errors."""


class DataError(FocaldetError, ValueError):
    """A dataset file, image or annotation is malformed or inconsistent."""


class ConfigError(FocaldetError, ValueError):
    """A configuration value is invalid."""


class NonFiniteLossError(FocaldetError, FloatingPointError):
    """Training produced a NaN/Inf loss."""


class WeightsError(FocaldetError, ValueError):
    """A checkpoint or weights file is missing, corrupt, or does not fit the model."""


class CheckpointError(WeightsError):
    """A Lightning checkpoint is missing, truncated or corrupt, or could not be written."""
