"""Validation shared by every typed config: one error type, one message format.

Every `__post_init__` check reads `require(ok, field, value, allowed)` and
fails with "<field>=<value> is invalid: <allowed>".
"""

from __future__ import annotations

import importlib
import re

import numpy as np

# `module.path:attribute.path`, how a config names a user's class or function
IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


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


def import_object(path: str, field: str) -> object:
    """The object `module:attribute` names; ConfigError naming `field` when the module does
    not import or lacks the attribute."""
    module_name, _, attribute = path.partition(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(
            f"{field}={path!r} is invalid: cannot import module {module_name!r} "
            f"({type(e).__name__}: {e})"
        ) from e
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as e:
            raise ConfigError(
                f"{field}={path!r} is invalid: module {module_name!r} has no attribute "
                f"{attribute!r}"
            ) from e
    return target


def is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
