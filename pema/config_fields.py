"""The field checks every config section uses: a ConfigError that names the field, the value (bounded) and the
allowed range (:mod:`pema.config` renames the field to its full dotted key)."""
from __future__ import annotations

import math
import reprlib

from pema.errors import ConfigError

_REPR = reprlib.Repr()  # a value in a message is shown bounded, however large (or aliased) it is
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 200, 200, 4


def _invalid(name: str, value, allowed: str) -> ConfigError:
    exc = ConfigError(f"{name}={_REPR.repr(value)} is invalid: expected {allowed}")
    exc.key, exc.value, exc.allowed = name, value, allowed  # _build renames the key to its full dotted path
    return exc


def _check(cond: bool, name: str, value, allowed: str) -> None:
    if not cond:
        raise _invalid(name, value, allowed)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:  # finite: inf and nan are in no range
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))


def _choice(name: str, value, options: tuple) -> None:
    _check(value in options, name, value, f"one of {options}")
