"""Errors that lowbit raises for bad input.

Every error a user can cause (a wrong name, bits out of range, a missing data file, a malformed
config) is a :class:`LowbitError`. The CLI prints its message as one line and exits with status 2;
the Python API lets it propagate. Messages name the field or file and the allowed values.
"""


class LowbitError(Exception):
    """Base class of every user-facing lowbit error."""


class ConfigError(LowbitError, ValueError):
    """A config value, name or option is invalid (unknown name, bits out of range, wrong type)."""


class DataError(LowbitError, FileNotFoundError):
    """A dataset is missing or malformed."""


class TrainingDiverged(LowbitError, RuntimeError):
    """The loss became NaN or infinite."""
