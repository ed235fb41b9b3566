"""The error types of lamda-edge.

Every failure a user can act on is a `LamdaEdgeError`. The CLI prints its message without a
traceback and exits with its `exit_code` (2 for bad input, 3 for "does not fit").
"""

from __future__ import annotations


class LamdaEdgeError(Exception):
    """Base of every user-facing lamda-edge error."""

    exit_code = 2


class ConfigError(LamdaEdgeError, ValueError):
    """A configuration value is invalid: the message names the field, the value and the fix."""


class ModelError(LamdaEdgeError):
    """A model cannot be loaded, adapted or exported as asked (wrong type, missing folder, no match)."""


class AdapterMismatchError(LamdaEdgeError):
    """An adapter file does not belong to the base model it is being loaded onto."""


class DataError(LamdaEdgeError, ValueError):
    """A dataset file is missing, malformed or empty; the message names the file and line."""


class ProfileError(LamdaEdgeError):
    """A device or model profile is unknown or malformed."""


class DoesNotFitError(LamdaEdgeError):
    """The planned configuration does not fit the device's memory.

    `details` holds what was tried (device, model, seq_len, rank, batch_size, peak and budget bytes) and
    `changes`, the smallest changes that would fit (best first), for `plan --json`.
    """

    exit_code = 3

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class ExportValidationError(LamdaEdgeError):
    """The exported model disagrees with PyTorch; the message lists every mismatch."""


class TrainingError(LamdaEdgeError):
    """A training run cannot go on (NaN/inf loss, broken checkpoint)."""


class MissingDependencyError(LamdaEdgeError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


def require(module: str, extra: str | None = None, package: str | None = None):
    """Import an optional dependency, or raise `MissingDependencyError` with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install 'lamda-edge[{extra}]'" if extra else f"pip install {package or module}"
        raise MissingDependencyError(f"{module} is needed here but is not installed: {exc}. Fix: {hint}") from exc
