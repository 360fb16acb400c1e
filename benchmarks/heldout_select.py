"""Choose one option of a method on data held out from the TRAIN split (never dev/test, which equals test here).

Each task's training sample (the one a benchmark run trains on: same ``--train-size`` and seed) is
cut in two: the first ``1 - held_out`` part trains, the rest is the validation set. For every value
of the option the whole order is trained and the held-out accuracy of every task is measured after
every task; the chosen value maximises the held-out OP (mean accuracy after the last task; ties: the
smaller value). ``--reference`` values (e.g. EWC's lambda = 0, plain sequential LoRA on the same
split) are measured and reported but never chosen. Results of an earlier call with the same settings
are reused, so a grid can be extended (a best value on its edge) or resumed.

    python benchmarks/heldout_select.py --method ewc --option ewc_lambda --values 0,0.1,1,10,100,1000 --reference 0
    python benchmarks/heldout_select.py --method osf --option lr --values 1e-5,3e-5,1e-4,3e-4,1e-3
    python benchmarks/heldout_select.py --method ewc --option ewc_lambda --values 1,100 \\
        --train-size 40 --tasks dbpedia,amazon --out /tmp/smoke.json                       # smoke test

``benchmarks/results/ewc_lambda.json`` was written by this script's first form (``ewc_lambda.py``,
the same procedure for EWC only); later selections go to ``benchmarks/results/heldout/``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from rkif import io, metrics
from rkif.backbones import BackboneConfig
from rkif.config import RunConfig, library_versions
from rkif.data import Task, load_benchmark, resolve_task_names
from rkif.runner import build_learner, evaluate, learn_stage

logger = logging.getLogger("heldout_select")
HELD_OUT = "heldout"


def split_train(tasks: list[Task], held_out: float) -> list[Task]:
    """Tasks whose train split is the first (1 - held_out) of the sample and whose HELD_OUT split is the rest."""
    out = []
    for task in tasks:
        train = task.split("train")
        cut = len(train) - max(1, round(held_out * len(train)))
        if cut < 1:
            raise ValueError(f"task {task.name}: {len(train)} training examples cannot be split")
        out.append(Task(task.name, {"train": train[:cut], HELD_OUT: train[cut:]}))
    return out


def run_value(run: RunConfig, tasks: list[Task], answer_tasks: list[Task], workdir: str,
              label: str) -> list[list[float]]:
    """Train the order as ``rkif run`` would; the held-out accuracy matrix (rows: task, columns: stage)."""
    backbone, learner = build_learner(run, answer_tasks)
    columns = []
    for j, stage in enumerate(learner.stages(tasks)):
        learn_stage(j, stage, backbone, learner, run, workdir)
        names = "+".join(t.name for t in stage)
        columns.append(evaluate(backbone, tasks, HELD_OUT, f"{label} after {names}"))
        logger.info("%s after %s: %s", label, names, [round(a, 3) for a in columns[-1]])
    return [[col[i] for col in columns] for i in range(len(tasks))]


def choose(results: dict[str, dict], reference: set[str] = frozenset()) -> float:
    """The value with the best held-out OP, the smaller value on ties; reference values are never chosen."""
    candidates = [(r["op"], -float(k)) for k, r in results.items() if k not in reference]
    if not candidates:
        raise ValueError("every measured value is a reference; nothing to choose")
    return -max(candidates)[1]


def reusable_results(path: Path, settings: dict) -> dict[str, dict]:
    """Results of an earlier selection at ``path`` made with the same settings (any values), else {}."""
    if not path.exists():
        return {}
    earlier = io.read_json(path)
    same = {k: v for k, v in earlier.get("settings", {}).items() if k not in ("values", "reference")}
    if same != {k: v for k, v in settings.items() if k not in ("values", "reference")}:
        logger.warning("%s was made with other settings; it will be replaced", path)
        return {}
    return dict(earlier["results"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True)
    p.add_argument("--option", required=True, help="the method option to choose, e.g. ewc_lambda")
    p.add_argument("--values", required=True, help="comma-separated candidate values")
    p.add_argument("--reference", default="", help="comma-separated values measured but never chosen")
    p.add_argument("--set", default="", help="other method options, k=v,k=v (fixed for every value)")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--benchmark", default="standard")
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--tasks", default=None, help="comma-separated tasks instead of the order")
    p.add_argument("--train-size", type=int, default=500, help="per-task training sample before the split")
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of each task's sample held out")
    p.add_argument("--model", default="minilm")
    p.add_argument("--family", default="encoder")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="default: benchmarks/results/heldout/<method>_<option>.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(a.out or f"benchmarks/results/heldout/{a.method}_{a.option}.json")
    fixed = dict(kv.split("=", 1) for kv in a.set.split(",") if kv)

    run = RunConfig(method=a.method, backbone=BackboneConfig(model=a.model, family=a.family, max_length=a.max_length),
                    data=a.data, benchmark=a.benchmark, order=a.order,
                    tasks=a.tasks.split(",") if a.tasks else None, train_size=a.train_size, test_size=1,
                    epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    names = resolve_task_names(Path(run.data), run.benchmark, run.order, run.tasks)
    full = load_benchmark(Path(run.data), names, run.train_size, run.test_size, run.eval_split, run.seed)
    tasks = split_train(full, a.held_out)
    settings = {**vars(a), "out": str(out)}
    results = reusable_results(out, settings)
    with tempfile.TemporaryDirectory() as tmp:
        for value in (float(x) for x in a.values.split(",")):
            key = f"{value:g}"
            if key in results:
                logger.info("%s=%s: held-out OP %.4f (from %s)", a.option, key, results[key]["op"], out)
                continue
            trial = replace(run, method_options={**fixed, a.option: value})
            matrix = run_value(trial, tasks, full, tmp, f"{a.option}={key}")
            results[key] = {"accuracy": matrix, "op": metrics.overall_performance(matrix),
                            "bwt": metrics.backward_transfer(matrix)}
            logger.info("%s=%s: held-out OP %.4f BWT %s", a.option, key, results[key]["op"], results[key]["bwt"])
    reference = {f"{float(x):g}" for x in a.reference.split(",") if x}
    chosen = choose(results, reference)
    report = {"method": a.method, "option": a.option, "chosen": chosen, "reference": sorted(reference),
              "criterion": "held-out OP (mean accuracy after the last task)",
              "tasks": names, "train_per_task": [len(t.split("train")) for t in tasks],
              "held_out_per_task": [len(t.split(HELD_OUT)) for t in tasks], "fixed_options": fixed,
              "settings": {**settings, "values": ",".join(results)}, "results": results,
              "versions": library_versions()}
    io.write_json(out, report)
    logger.info("chosen %s = %g (written to %s)", a.option, chosen, out)


if __name__ == "__main__":
    main()
