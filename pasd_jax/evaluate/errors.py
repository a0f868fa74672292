"""Errors of the evaluation tools; each message names the problem and the fix, and the CLI prints it as one line.

They are `pasd_jax.errors` classes (a `PasdError` and a `ValueError`), so every CLI of the project treats them the
same way; the evaluation ones add what the report needs to tell apart (a pair skipped, a metric failed).
"""
from __future__ import annotations

from pasd_jax import errors


class EvaluationError(errors.PasdError, ValueError):
    """Base of every evaluation error meant for the user."""


class ImageReadError(errors.ImageReadError, EvaluationError):
    """A file that cannot be decoded as an image."""


class PairingError(EvaluationError):
    """A prediction and its ground truth that cannot be compared (missing partner, different sizes)."""


class MetricInputError(EvaluationError):
    """An image a metric cannot score (too small for its windows or blocks, no usable content)."""


class UnknownMetricError(errors.ConfigError, EvaluationError):
    """A `--metrics` name that is not in the metric table."""


class LearnedMetricError(EvaluationError):
    """A learned metric (through pyiqa) that could not be created or run."""


class MissingWeightsError(LearnedMetricError):
    """A learned metric whose weights are not on this machine and cannot be downloaded."""


class MetricDependencyError(LearnedMetricError, errors.MissingDependencyError):
    """A learned metric whose packages (pyiqa, torch or one they need) are not installed."""
