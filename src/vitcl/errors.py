"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class VitclError(Exception):
    """Base class: bad input, not a bug. The message must say what was expected."""

    exit_code = 2


class ConfigError(VitclError):
    """An unknown key, a wrong type or an impossible value in a config."""


class DataError(VitclError):
    """A missing, corrupt or inconsistent data file, or an impossible split."""


class TrainingError(VitclError):
    """Training cannot go on (a NaN loss, say); the last checkpoint is kept."""
