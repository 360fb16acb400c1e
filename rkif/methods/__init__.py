"""Continual-learning methods: one file each, registered by name (import order fills the registry; a user's
own methods register from their file, imported by ``import_user_modules``: ``--user-module``)."""

from rkif.methods import (  # noqa: F401
    ewc,
    inclora,
    l2p,
    lfpt5,
    migu,
    moelora,
    mtl,
    olora,
    osf,
    replay,
    rkif,
    sapt,
    seqlora,
    tasl,
    vrmcl,
)
from rkif.methods.base import MemoryMethod, Method, MethodConfig, parse_options
from rkif.methods.registry import (
    METHODS,
    PRESETS,
    available,
    import_user_module,
    import_user_modules,
    register,
    register_preset,
    resolve,
)

__all__ = ["METHODS", "PRESETS", "MemoryMethod", "Method", "MethodConfig", "available",
           "import_user_module", "import_user_modules", "parse_options", "register", "register_preset", "resolve"]
