"""Atomic, safe writes: JSON for results, safetensors for weights (temp file + rename); checksummed
checkpoint folders; the checks that an output folder is writable and a results file is whole; no empty
output folder left by a failed run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKSUMS = "checkpoint.json"
# what every rkif results.json holds (resuming and reporting read these)
RESULT_KEYS = ("method", "model", "order", "tasks", "stages", "accuracy", "initial_accuracy", "op", "bwt", "fwt",
               "finished_stages", "complete", "config")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()          # read once: os.umask is process-wide, toggling it per write would race threads


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``; the file gets the permissions a plain ``open`` would give
    (mkstemp's are private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
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


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically: a crash leaves the previous file intact."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: unreadable checkpoint, truncated or corrupted ({err}); "
                         "start the run again with another --output") from err


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path, names: list[str]) -> None:
    """Record the SHA-256 of the files ``names`` of a checkpoint ``folder`` in its ``checkpoint.json``
    (written last: a checkpoint without it is one whose writing was cut)."""
    folder = Path(folder)
    write_json(folder / CHECKSUMS, {"sha256": {name: sha256(folder / name) for name in names}})


def verify_checksums(folder: Path) -> bool:
    """Refuse a checkpoint file that is missing or whose bytes differ from its recorded SHA-256, naming it.

    Returns False for a checkpoint written before checksums were recorded (nothing to compare).
    """
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        return False
    recorded = read_json(folder / CHECKSUMS).get("sha256")
    if not isinstance(recorded, dict):
        raise ValueError(f"{folder / CHECKSUMS}: no 'sha256' table; start the run again with another --output")
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found (needed to resume; delete the run's "
                                    "results.json to start it over)")
        if sha256(path) != digest:
            raise ValueError(f"{path}: checkpoint corrupted or truncated (its SHA-256 differs from the one in "
                             f"{CHECKSUMS}); start the run again with another --output")
    return True


def read_results(path: Path, fix: str = "move it away or choose another --output") -> dict:
    """A run's results.json, refused (naming the file, the missing keys and ``fix``) unless it holds RESULT_KEYS."""
    results = read_json(path)
    missing = [k for k in RESULT_KEYS if k not in results] if isinstance(results, dict) else list(RESULT_KEYS)
    if missing:
        raise ValueError(f"{path}: not an rkif results file, missing {', '.join(missing)}; {fix}")
    return results


def check_output_dir(path: Path, option: str = "--output") -> None:
    """Make sure ``path`` is (or can become) a folder this process can write, by creating it and a temporary
    file in it; one line naming the folder otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path}: is a file, not a folder; choose another {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".rkif-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        reason = err.strerror or str(err)
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise PermissionError(f"{option} {path}: cannot write there{where}: {reason}; "
                              f"choose another {option}") from err


@contextlib.contextmanager
def removed_if_failed_empty(path: Path) -> Iterator[None]:
    """Run the block; if it raises, remove the folders it created for ``path`` (``path`` and the parents
    missing before it ran, deepest first) that it left empty. A folder that existed before, or that holds
    anything, is never removed: a failed run leaves no empty output folder, and never loses a result."""
    created = []
    folder = Path(path).absolute()
    while not os.path.lexists(folder) and folder != folder.parent:
        if ".." not in folder.parts:      # new/../kept names kept once new exists: kept may be older
            created.append(folder)
        folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()                # only ever an empty folder
            except OSError:
                break                         # not empty (or gone): it and its parents stay
        raise
