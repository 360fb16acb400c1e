"""The files that let a fresh clone resume a grid's unfinished runs: results.json and the last checkpoint.

Checkpoints are not committed (``.gitignore``), so a half-finished run found in a fresh clone would start
over; for grids whose runs take longer than a session (SmolLM2), commit what resuming needs::

    git add -f $(python benchmarks/unfinished.py benchmarks/results/smollm2)

Only the checkpoint of the last finished stage is listed (``runner.load_checkpoint`` reads no other), and a
run whose results.json and checkpoints disagree (stopped while writing) is listed at its last consistent stage.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    print("\n".join(str(p) for arg in sys.argv[1:] for p in resumable_files(Path(arg))))
