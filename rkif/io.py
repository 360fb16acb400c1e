"""Atomic, safe writes: JSON for results, safetensors for weights (temp file + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a crash leaves the previous file intact."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    _atomic(Path(path), write)


def read_json(path: Path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors as safetensors atomically (contiguous CPU copies)."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(data, tmp))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing file is an error (never silently an empty state)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (needed to resume; delete the run's "
                                "results.json to start it over)")
    return load_file(str(path))
