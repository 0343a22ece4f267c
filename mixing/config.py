"""Typed config sections: the base of every section (a method's knobs, training, resources, data).

A section is a dataclass whose fields are flat config keys: `noisymix train lr=0.1` sets the `lr` field
of the section that declares it. Sections coerce and validate their own values, so every layer reads
typed settings and no layer rebuilds them from a dict. Plain Python: importable from every layer.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping
from functools import cache


class ConfigError(ValueError):
    """A config key that does not exist, or a value it cannot take; the message names the key."""


@dataclasses.dataclass
class Section:
    """Base of a config section: `from_values` coerces a mapping of its keys, `validate` checks them."""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_values(cls, values: Mapping[str, object]):
        """A validated section from (a subset of) its keys; the others keep their defaults."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"unknown key(s): {', '.join(unknown)} (known keys: {', '.join(cls.keys())})")
        section = cls(**{key: coerce(cls, key, value) for key, value in values.items()})
        section.validate()
        return section

    def validate(self) -> None:
        """Check every value; subclasses call super().validate() and raise ConfigError naming the key."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def coerce(cls: type, key: str, value):
    """Check a value against the field's type; ints are accepted where floats are expected, numbers where
    strings are."""
    hint = _hints(cls)[key]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    base = typing.get_args(hint)[0] if optional else hint
    base = typing.get_origin(base) or base
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {base.__name__}, got {value!r} ({type(value).__name__})")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def check_choice(key: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def check_range(key: str, value, lo, hi=None, lo_open: bool = False, hi_open: bool = False) -> None:
    """lo <= value <= hi, with either end open; hi=None is unbounded. NaN is never in range."""
    below = value <= lo if lo_open else value < lo
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above or value != value:
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
        raise ConfigError(f"{key}={value!r} is outside {lo_b}{lo}, {'inf' if hi is None else hi}{hi_b}")


def check_epochs_or_auto(key: str, value: int, minimum: int = 0) -> None:
    """-1 means: derive from the run's length (a method's share of the authors' schedule)."""
    if value != -1 and value < minimum:
        raise ConfigError(f"{key} must be -1 (auto) or a number of epochs >= {minimum}, got {value}")
