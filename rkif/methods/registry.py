"""Method registry: name -> class, plus named presets (a method with fixed options).

Registration refuses a duplicate name; lookup of an unknown name lists the known ones. A user's own
methods register from their own file or module, imported by ``import_user_modules`` (``--user-module``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from rkif.backbones.config import FAMILY_NAMES
from rkif.checks import CheckError
from rkif.methods.base import Method

METHODS: dict[str, type[Method]] = {}
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS or cls.name in PRESETS:
        raise ValueError(f"method name {cls.name!r} is already registered")
    families = cls.families
    if families is not None and (not isinstance(families, tuple) or not families
                                 or not set(families) <= set(FAMILY_NAMES)):
        raise ValueError(f"method {cls.name}: families={families!r}: expected None or a non-empty tuple of "
                         f"{', '.join(FAMILY_NAMES)}")
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
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS) + sorted(PRESETS)} "
                         "(a method of your own: --user-module FILE.py)")
    return METHODS[name], options


def available() -> list[str]:
    return sorted(METHODS) + sorted(PRESETS)


_USER_FILES: dict[Path, ModuleType] = {}     # resolved path -> module: a file is imported once per process
_USER_NAMES: set[str] = set()                # the user's modules: those given, and those defining what they registered


@contextmanager
def _registering() -> Iterator[None]:
    """Run an import; if it fails, drop the methods and presets it registered before failing, so the
    module, fixed, imports again in the same process (rather than being refused as its own duplicate)."""
    methods, presets = set(METHODS), set(PRESETS)
    try:
        yield
    except BaseException:
        for name in set(METHODS) - methods:
            del METHODS[name]
        for name in set(PRESETS) - presets:
            del PRESETS[name]
        raise
    for name in set(METHODS) - methods:        # a package may register classes defined in its other modules
        _add_user_name(METHODS[name].__module__)
        _add_user_name(METHODS[name].config_class.__module__)


def _add_user_name(module: str) -> None:
    """Count ``module`` (and its submodules) as the user's code for ``raised_in_user_module``; never rkif's."""
    if module != "rkif" and not module.startswith("rkif."):
        _USER_NAMES.add(module)


def _imported_file(path: Path) -> ModuleType | None:
    """The module already imported from the file ``path`` (resolved) under any name: by ``--user-module``,
    or as a dotted module (``import mine`` in the user's own script), whose methods are registered."""
    if path in _USER_FILES:
        return _USER_FILES[path]
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and os.path.basename(file) == path.name and Path(file).resolve() == path:
            return module
    return None


def _import_dotted(spec: str) -> ModuleType:
    """``importlib.import_module(spec)``, reusing the module if its file was imported as a path before."""
    if spec not in sys.modules:
        found = importlib.util.find_spec(spec)
        origin = found.origin if found is not None else None
        if origin and os.path.isfile(origin) and Path(origin).resolve() in _USER_FILES:
            sys.modules[spec] = _USER_FILES[Path(origin).resolve()]
    _add_user_name(spec)                  # before it runs: an error in its top level is the user's too
    with _registering():
        return importlib.import_module(spec)


def import_user_module(spec: str) -> ModuleType:
    """Import a user's module of methods, once per process: a ``.py`` file (any path with ``/`` or ending in
    ``.py``) or a dotted module name importable here. Its ``@register`` lines add its methods; a file already
    imported under another name (a dotted one, or a path before) is that module, not imported again. A missing
    file or module is one line naming it; an error inside the module is the module's own."""
    if not (spec.endswith(".py") or "/" in spec or os.sep in spec):
        try:
            return _import_dotted(spec)
        except ImportError as err:
            raise ImportError(f"--user-module {spec}: {err}; give a .py file or a module importable here "
                              "(installed, or on PYTHONPATH)") from err
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--user-module {spec}: no such file" if not path.exists() else
                                f"--user-module {spec}: not a file; give a .py file or a dotted module name")
    key = path.resolve()
    module = _imported_file(key)
    if module is not None:
        _USER_FILES[key] = module
        _add_user_name(module.__name__)
        return module
    name = "rkif_user_" + re.sub(r"\W", "_", path.stem)
    while name in sys.modules:            # another file of the same name: a name of its own
        name += "_"
    module_spec = importlib.util.spec_from_file_location(name, key)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module            # dataclasses and type hints look the module up by name
    _add_user_name(name)                  # before it runs: an error in its top level is the user's too
    try:
        with _registering():
            module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _USER_FILES[key] = module
    return module


def raised_in_user_module(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from or while handling, comes from a user module's own code:
    of the frames it passed through that belong to rkif or to a user module, the innermost is the user's (a
    library the user called may have raised it). Then its traceback is worth showing. A refusal by a check
    (``rkif.checks.fail``, ``check_ranges``: a ``CheckError``) stays one line wherever it was raised."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if not isinstance(err, CheckError) and _innermost_owner(err.__traceback__) == "user":
            return True
        err = err.__cause__ or err.__context__
    return False


def _innermost_owner(tb: TracebackType | None) -> str | None:
    """``"user"`` or ``"rkif"``: whose code the innermost frame of ``tb`` that is either's belongs to."""
    owner = None
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if any(name == user or name.startswith(user + ".") for user in _USER_NAMES):
            owner = "user"
        elif name == "rkif" or name.startswith("rkif."):
            owner = "rkif"
        tb = tb.tb_next
    return owner


def import_user_modules(specs: list[str]) -> None:
    """``import_user_module`` each of ``specs`` (a run's ``user_modules``), in order."""
    for spec in specs:
        import_user_module(spec)
