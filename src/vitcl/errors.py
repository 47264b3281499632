"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: object, choices: Iterable[str], n: int = 1, cutoff: float = 0.75) -> list[str]:
    """Up to n of `choices` near a misspelt name (difflib's ratio at least `cutoff`), the nearest first."""
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=cutoff)


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """"did you mean 'x'? " for the one choice nearest to `name`, or "" when none is near."""
    near = closest(name, choices)
    return f"did you mean '{near[0]}'? " if near else ""


class VitclError(Exception):
    """Base class: bad input, not a bug. The message must say what was expected."""

    exit_code = 2


class ConfigError(VitclError):
    """An unknown key, a wrong type or an impossible value in a config."""


class DataError(VitclError):
    """A missing, corrupt or inconsistent data file, or an impossible split."""


class TrainingError(VitclError):
    """Training cannot go on (a NaN loss, say); the last checkpoint is kept."""
