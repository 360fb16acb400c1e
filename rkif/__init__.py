"""rkif: continual learning of language models (Recurrent-KIF and its baselines).

The Python API (each name is imported on first use, so ``import rkif`` stays light):

- ``rkif.run(**settings)``: one experiment, exactly as ``rkif run`` (``rkif/cli.py``);
- ``rkif.RunConfig`` and ``rkif.run_experiment(config)``: the same run from a RunConfig, without the
  command's defaults, lock and plots;
- ``rkif.RecurrentKIFCallback``: Recurrent-KIF in your own ``transformers.Trainer`` (``rkif/callback.py``);
- ``rkif.MethodCallback``: the callback that forwards Trainer events to any method's hooks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {"run": "rkif.cli", "RunConfig": "rkif.config", "run_experiment": "rkif.runner",
            "RecurrentKIFCallback": "rkif.callback", "MethodCallback": "rkif.training"}
__all__ = ["MethodCallback", "RecurrentKIFCallback", "RunConfig", "run", "run_experiment"]

if TYPE_CHECKING:
    from rkif.callback import RecurrentKIFCallback
    from rkif.cli import run
    from rkif.config import RunConfig
    from rkif.runner import run_experiment
    from rkif.training import MethodCallback


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rkif' has no attribute {name!r}")
