"""The errors of configuration: one line each for the administrator.

This module imports nothing, so every layer can raise them without an import
cycle.
"""

from __future__ import annotations

__all__ = ["ConfigError", "SettingError", "shown"]

#: The longest value an error line repeats: a 2 MB value must not make a 2 MB line.
SHOWN_MAX = 120


def shown(value: object) -> str:
    """`repr(value)` for an error line, cut to SHOWN_MAX characters with `...`."""
    text = repr(value)
    return text if len(text) <= SHOWN_MAX else text[: SHOWN_MAX - 3] + "..."


class SettingError(ValueError):
    """A bad value for one option; `str()` is the one line shown to the admin."""

    def __init__(self, option: str, value: object, reason: str) -> None:
        self.option = option
        self.value = value
        self.reason = reason
        super().__init__(f"--{option}: invalid value {shown(value)}: {reason}")


class ConfigError(ValueError):
    """One or more problems; each is a complete line for the admin."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))
