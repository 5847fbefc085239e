"""The errors of configuration: one line each for the administrator.

This module imports nothing, so every layer can raise them without an import
cycle.
"""

from __future__ import annotations

__all__ = ["ConfigError", "SettingError"]


class SettingError(ValueError):
    """A bad value for one option; `str()` is the one line shown to the admin."""

    def __init__(self, option: str, value: object, reason: str) -> None:
        self.option = option
        self.value = value
        self.reason = reason
        super().__init__(f"--{option}: invalid value {value!r}: {reason}")


class ConfigError(ValueError):
    """One or more problems; each is a complete line for the admin."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))
