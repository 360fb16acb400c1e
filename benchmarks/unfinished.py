"""The files that let a fresh clone resume a grid's unfinished runs: results.json and the last checkpoint.

Checkpoints are not committed (``.gitignore``), so a half-finished run found in a fresh clone would start
over; for grids whose runs take longer than a session (SmolLM2), commit what resuming needs::

    git add -f $(python benchmarks/unfinished.py benchmarks/results/smollm2)

Only the checkpoint of the last finished stage is listed (``runner.load_checkpoint`` reads no other), and a
run whose results.json and checkpoints disagree (stopped while writing) is listed at its last consistent stage.

Once a run moves on (or finishes), the checkpoint committed earlier is no longer read; ``--superseded`` lists
the tracked checkpoint files that nothing resumes from, to untrack::

    git rm -q --cached $(python benchmarks/unfinished.py --superseded benchmarks/results/smollm2)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rkif import io


def resumable_files(grid_dir: Path) -> list[Path]:
    """results.json + checkpoints/stage_<k> (k = finished stages - 1) of every unfinished run under ``grid_dir``."""
    out = []
    for results in sorted(grid_dir.glob("runs/*/*/results.json")):
        saved = io.read_json(results)
        stage = saved.get("finished_stages", 0) - 1
        checkpoint = results.parent / "checkpoints" / f"stage_{stage}"
        if saved.get("complete") or stage < 0 or not (checkpoint / "adapter.safetensors").exists():
            continue
        out += [results, checkpoint]
    return out


def superseded_checkpoints(grid_dir: Path, tracked: list[Path]) -> list[Path]:
    """The files of ``tracked`` inside a run's ``checkpoints/`` that ``resumable_files`` does not list."""
    needed = {p for p in resumable_files(grid_dir) if p.name != "results.json"}
    runs = grid_dir / "runs"
    return [
        path for path in tracked
        if path.is_relative_to(runs) and "checkpoints" in path.relative_to(runs).parts
        and not any(path.is_relative_to(keep) for keep in needed)
    ]


def tracked_files(grid_dir: Path) -> list[Path]:
    """The files under ``grid_dir`` that git tracks, spelled as ``grid_dir`` is (relative or absolute)."""
    listing = subprocess.run(["git", "ls-files", "-z", "--", str(grid_dir)], capture_output=True, check=True)
    base = Path.cwd() if grid_dir.is_absolute() else Path()   # git prints paths relative to the working directory
    return [base / name for name in listing.stdout.decode().split("\0") if name]


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--superseded"]:
        listed = [p for arg in args[1:] for p in superseded_checkpoints(Path(arg), tracked_files(Path(arg)))]
    else:
        listed = [p for arg in args for p in resumable_files(Path(arg))]
    print("\n".join(str(p) for p in listed))
