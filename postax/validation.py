"""Validation shared by every typed config: one error type, one message format.

Every `__post_init__` check reads `require(ok, field, value, allowed)` and
fails with "<field>=<value> is invalid: <allowed>".
"""

from __future__ import annotations

import numpy as np


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def require(
    condition: bool,
    field: str,
    value: object,
    allowed: str,
    *,
    prefix: str = "",
    error: type[Exception] = ConfigError,
) -> None:
    if not condition:
        raise error(f"{prefix}{field}={value!r} is invalid: {allowed}")


def is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
