"""Method registry: name -> class, plus named presets (a method with fixed options).

Registration refuses a duplicate name; lookup of an unknown name lists the known ones.
"""

from __future__ import annotations

from typing import Any

from rkif.methods.base import Method

METHODS: dict[str, type[Method]] = {}
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS or cls.name in PRESETS:
        raise ValueError(f"method name {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def register_preset(name: str, method: str, options: dict[str, Any]) -> None:
    """A named configuration of a method, usable wherever a method name is."""
    if name in METHODS or name in PRESETS:
        raise ValueError(f"method name {name!r} is already registered")
    PRESETS[name] = (method, dict(options))


def resolve(name: str, options: dict[str, Any] | None = None) -> tuple[type[Method], dict[str, Any]]:
    """The method class and its options for a method or preset name (explicit options win)."""
    options = dict(options or {})
    if name in PRESETS:
        base, preset = PRESETS[name]
        options = {**preset, **options}
        name = base
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS) + sorted(PRESETS)}")
    return METHODS[name], options


def available() -> list[str]:
    return sorted(METHODS) + sorted(PRESETS)
