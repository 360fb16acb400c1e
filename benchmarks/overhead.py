"""Wall time of Recurrent-KIF training against replay training, side by side, same data and model.

Both start from the same adapter trained on the first task and run the same number of new-task
optimizer steps on the second; R-KIF adds M outer steps per Q inner steps, so its floor is
1 + M/Q. The bookkeeping (importance, snapshots, thresholds, fusion) is timed inside the method.
Runs alternate (replay, rkif, replay, rkif, ...) and medians are reported.

    python benchmarks/overhead.py --steps 48 --repeats 3 --out benchmarks/results/overhead.json
    python benchmarks/overhead.py --model smollm2 --steps 16 --repeats 2 --out benchmarks/results/overhead_smollm2.json

With ``--model smollm2`` the run settings are those ``rkif run --model smollm2`` implies (sizes, lr,
precision, prompt format: ``MODEL_DEFAULTS``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

from rkif import io
from rkif.backbones import BackboneConfig
from rkif.backbones.sources import MODEL_DEFAULTS
from rkif.config import RunConfig, library_versions
from rkif.methods import parse_options, resolve
from rkif.runner import build
from rkif.training import train_stage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--tasks", default="dbpedia,amazon")
    p.add_argument("--steps", type=int, default=48, help="new-task optimizer steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner-steps", type=int, default=8)
    p.add_argument("--outer-steps", type=int, default=4)
    p.add_argument("--model", default="minilm")
    p.add_argument("--out", default="benchmarks/results/overhead.json")
    a = p.parse_args()

    implied = {k: v for k, v in MODEL_DEFAULTS.get(a.model, {}).items()
               if k not in ("test_size", "output", "eval_scope")}
    run = RunConfig(method="replay", backbone=BackboneConfig(model=a.model), data=a.data, tasks=a.tasks.split(","),
                    train_size=500, test_size=8, max_steps=a.steps, seed=42).with_settings(**implied)
    tasks, backbone, replay = build(run)
    first, second = tasks
    with tempfile.TemporaryDirectory() as tmp:
        train_stage(backbone, first.split("train"), replay, run, 0, tmp)       # shared starting point
        replay.after_task(0, [first], first.split("train"))
        start = backbone.adapter_state()
        cls, opts = resolve("rkif", {"inner_steps": a.inner_steps, "outer_steps": a.outer_steps})
        timings = {"replay": [], "rkif": [], "rkif_bookkeeping": [], "rkif_outer": []}
        for _ in range(a.repeats):
            for name in ("replay", "rkif"):
                backbone.load_adapter_state(start)
                method = replay if name == "replay" else cls(parse_options(cls.config_class, opts), backbone, run)
                if name == "rkif":
                    method.memory = copy.deepcopy(replay.memory)
                data = method.before_task(1, [second], second.split("train"))
                t0 = time.perf_counter()
                train_stage(backbone, data, method, run, 1, tmp)
                timings[name].append(time.perf_counter() - t0)
                if name == "rkif":
                    timings["rkif_bookkeeping"].append(method.timing["bookkeeping"])
                    timings["rkif_outer"].append(method.timing["outer"])
    med = {k: statistics.median(v) for k, v in timings.items()}
    floor = 1 + a.outer_steps / a.inner_steps
    result = {
        "command": "python benchmarks/overhead.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
        "model": a.model, "run": run.to_dict(), "steps": a.steps, "inner_steps": a.inner_steps,
        "outer_steps": a.outer_steps,
        "seconds": timings, "median_seconds": med,
        "ratio_rkif_to_replay": med["rkif"] / med["replay"], "floor": floor,
        "bookkeeping_fraction_of_rkif_time": med["rkif_bookkeeping"] / med["rkif"],
        "outer_fraction_of_rkif_time": med["rkif_outer"] / med["rkif"],
        "versions": library_versions(),
    }
    io.write_json(Path(a.out), result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("seconds", "versions")}, indent=2))


if __name__ == "__main__":
    main()
