"""User-facing errors: one line that names the file, key or field at fault.

Entry points catch `RigError` and print `error: <message>` with exit status 2, so a
bad checkpoint folder or config never ends in a traceback from deep inside jax.
"""


class RigError(Exception):
    """An error caused by the user's input (a path, a key, a config field)."""


class ConfigError(RigError):
    """A config field is unknown, mistyped or impossible."""


class WeightsError(RigError):
    """A checkpoint folder, file or tensor is missing, surplus or mis-shaped."""


class DataError(RigError):
    """A data file is unreadable or holds no valid record."""
