"""The errors a user can act on, in one place: each message names the problem and the fix.

The CLIs print any `PasdError` as one line (no traceback) and exit non-zero; everything else is a bug and keeps
its traceback. Each class also derives from the builtin a caller would expect (ValueError, ImportError, ...).
"""
from __future__ import annotations


class PasdError(Exception):
    """Base of every error with a message meant for the user."""


class ConfigError(PasdError, ValueError):
    """A config value (training config, model config.json, sampling option) that cannot work."""


class WeightFileError(PasdError, ValueError):
    """A weights file or checkpoint folder that is missing, truncated or not what was asked for."""


class DataError(PasdError, ValueError):
    """Training data that cannot be read or does not fit the config."""


class ImageReadError(PasdError, ValueError):
    """An input image that cannot be decoded."""


class OutputPathError(PasdError, ValueError):
    """An output location that would overwrite an input or an existing result, or cannot be written."""


class MissingDependencyError(PasdError, ImportError):
    """An optional package (an extra) that a chosen feature needs is not installed."""
