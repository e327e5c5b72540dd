"""Expected failures. Each carries one line that says what is wrong and what to type instead;
the command line prints that line without a traceback (HYDRA_FULL_ERROR=1 shows it)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a missing model or artefact: the user can fix it, the code is fine."""


class ConfigError(UserError, ValueError):
    """A config value that is refused before anything is loaded or written."""


def choices_error(key: str, value: object, valid: object, where: str = "") -> ConfigError:
    """The one shape of every 'unknown value' message: key, bad value (`where` it is refused,
    e.g. " for model=toy"), valid choices."""
    return ConfigError(f"{key}={value!r} is not valid{where}; choose one of {list(valid)}")


class ModelUnavailable(UserError):
    """Weights or a checkpoint that are not on this machine."""
