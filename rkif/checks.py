"""Checks of setting values: each failure is one line naming the setting, its value and what is allowed.

Config dataclasses (``RunConfig``, ``BackboneConfig``, every method's config) check their own
fields with these helpers before any data or model is loaded; the messages read
``--grad-accum 0: expected an integer >= 1`` or ``rkif option top_fraction=1.5: expected ...``.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import Any, NamedTuple


class Rule(NamedTuple):
    """A range a value must lie in: ``ok(value)`` and the words saying what is allowed."""

    ok: Callable[[Any], bool]
    allowed: str


AT_LEAST_ONE = Rule(lambda v: v >= 1, "expected an integer >= 1")
NON_NEGATIVE_INT = Rule(lambda v: v >= 0, "expected an integer >= 0")
POSITIVE = Rule(lambda v: v > 0, "expected a number > 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, "expected a number >= 0")
UNIT = Rule(lambda v: 0 <= v <= 1, "expected a number in [0, 1]")
EMA_WEIGHT = Rule(lambda v: 0 <= v < 1, "expected a number in [0, 1) (the weight of the old value; 1 never updates)")
NOT_EMPTY = Rule(lambda v: bool(v.strip()), "expected a non-empty string")


def flag(name: str) -> str:
    """The label of a run setting in messages, its command-line spelling: ``grad_accum`` -> ``--grad-accum ``."""
    return "--" + name.replace("_", "-") + " "


class CheckError(ValueError):
    """A setting refused by a check (``fail``): one line on the command line, wherever it was raised (a user
    module's own ``check`` included)."""


def fail(label: str, value: Any, allowed: str) -> CheckError:
    """The one-line error ``<label><value>: <allowed>``; ``label`` is ``--flag `` or ``method option name=``."""
    return CheckError(f"{label}{value!r}: {allowed}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:            # an integer is a number too; NaN and infinities are not settings
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, origin or hint)


def describe(hint: Any) -> str:
    """What a type hint allows, in words (``int | None`` -> ``an integer or none``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(h) for h in typing.get_args(hint))
    if origin is list:
        return f"a list of {describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            dict: "a table", type(None): "none"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_type(label: str, value: Any, hint: Any) -> None:
    if not _matches(value, hint):
        raise fail(label, value, f"expected {describe(hint)}")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type hint of every dataclass field of ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def check_types(cls: type, values: dict[str, Any], label: Callable[[str], str],
                skip: Iterable[str] = ()) -> None:
    """Refuse a value whose type its dataclass field does not allow (``values``: field -> value)."""
    hints = field_types(cls)
    for name, value in values.items():
        if name in hints and name not in skip:
            check_type(label(name), value, hints[name])


def check_rules(obj: Any, rules: dict[str, Rule], label: Callable[[str], str]) -> None:
    """Refuse a field of ``obj`` outside its rule (a None value is left to the type check)."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        if value is not None and not rule.ok(value):
            raise fail(label(name), value, rule.allowed)


def check_choice(label: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise fail(label, value, "choose from " + ", ".join(map(str, allowed)))
