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
from dataclasses import fields, replace
from pathlib import Path

from rkif import io, metrics
from rkif.backbones import BackboneConfig
from rkif.backbones.sources import infer_family
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
              label: str) -> tuple[list[list[float]], list[float]]:
    """Train the order as ``rkif run`` would: the held-out accuracy matrix (rows: task, columns: stage)
    and the held-out accuracy before any training."""
    backbone, learner = build_learner(run, answer_tasks)
    initial = evaluate(backbone, tasks, HELD_OUT, f"{label} untrained", precision=run.precision)
    logger.info("%s untrained: %s", label, [round(a, 3) for a in initial])
    columns = []
    for j, stage in enumerate(learner.stages(tasks)):
        learn_stage(j, stage, backbone, learner, run, workdir)
        names = "+".join(t.name for t in stage)
        columns.append(evaluate(backbone, tasks, HELD_OUT, f"{label} after {names}", precision=run.precision))
        logger.info("%s after %s: %s", label, names, [round(a, 3) for a in columns[-1]])
    return [[col[i] for col in columns] for i in range(len(tasks))], initial


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def value_key(text: str) -> str:
    """How a candidate value is stored: numbers as %g (so 1e-3 and 0.001 are one value), words as given;
    a combination of several options' values is joined by ':'."""
    if ":" in text:
        return ":".join(value_key(part) for part in text.split(":"))
    number = _number(text)
    return text if number is None else f"{number:g}"


def choose(results: dict[str, dict], reference: set[str] = frozenset()) -> float | str:
    """The value with the best held-out OP; ties: the smaller number, or the first listed word.
    Reference values are never chosen."""
    keys = [k for k in results if k not in reference]
    if not keys:
        raise ValueError("every measured value is a reference; nothing to choose")
    best = max(results[k]["op"] for k in keys)
    tied = [k for k in keys if results[k]["op"] == best]
    numbers = [_number(k) for k in tied]
    return min(numbers) if all(n is not None for n in numbers) else tied[0]


def with_option(run: RunConfig, option: str, value: str, fixed: dict[str, str]) -> RunConfig:
    """``run`` with ``option = value``: a RunConfig field, a BackboneConfig field, else a method option."""
    run = replace(run, method_options=dict(fixed))
    for config in (RunConfig(), BackboneConfig()):
        if option in {f.name for f in fields(config)} - {"backbone", "method_options"}:
            return run.with_settings(**{option: _typed(value, getattr(config, option))})
    return replace(run, method_options={**fixed, option: float(value) if _number(value) is not None else value})


def _typed(value: str, default):
    """``value`` as the type of the setting's default (a number where the default is None)."""
    if default is None:                                   # e.g. max_steps, train_size
        number = _number(value)
        return value if number is None else int(number) if number == int(number) else number
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(float(value))
    return float(value) if isinstance(default, float) else value


# settings added to this script later, at the values earlier selections implicitly used
LATER_SETTINGS = {"prompt_format": "raw", "precision": "fp32", "group_by_length": False, "eval_batch_size": 64}
_FREE = ("values", "reference")


def reusable_results(path: Path, settings: dict) -> dict[str, dict]:
    """Results of an earlier selection at ``path`` (or its ``.partial.json``, written after every value)
    made with the same settings (any values), else {}."""
    def normal(given: dict) -> dict:           # later settings at their old values; family "auto" resolved
        full = {k: v for k, v in {**LATER_SETTINGS, **given}.items() if k not in _FREE}
        if full.get("family") == "auto":
            full["family"] = infer_family(full["model"])
        return full

    results = {}
    for file in (path.with_suffix(".partial.json"), path):
        if not file.exists():
            continue
        earlier = io.read_json(file)
        if normal(earlier.get("settings", {})) != normal(settings):
            logger.warning("%s was made with other settings; it will be replaced", file)
            continue
        results.update(earlier["results"])
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True)
    p.add_argument("--option", required=True,
                   help="what to choose: a method option (ewc_lambda), a run setting (lr) or a backbone one "
                        "(prompt_format); several, comma-separated, with values joined by ':' (raw:2e-3)")
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
    p.add_argument("--family", default="auto")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--prompt-format", default="raw")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--group-by-length", action="store_true")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="default: benchmarks/results/heldout/<method>_<option>.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(a.out or f"benchmarks/results/heldout/{a.method}_{a.option}.json")
    fixed = dict(kv.split("=", 1) for kv in a.set.split(",") if kv)

    backbone = BackboneConfig(model=a.model, family=a.family, max_length=a.max_length, prompt_format=a.prompt_format,
                              eval_batch_size=a.eval_batch_size)
    run = RunConfig(method=a.method, backbone=backbone, precision=a.precision, group_by_length=a.group_by_length,
                    data=a.data, benchmark=a.benchmark, order=a.order,
                    tasks=a.tasks.split(",") if a.tasks else None, train_size=a.train_size, test_size=1,
                    epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    names = resolve_task_names(Path(run.data), run.benchmark, run.order, run.tasks)
    full = load_benchmark(Path(run.data), names, run.train_size, run.test_size, run.eval_split, run.seed)
    tasks = split_train(full, a.held_out)
    settings = {**vars(a), "out": str(out)}
    results = reusable_results(out, settings)
    with tempfile.TemporaryDirectory() as tmp:
        for value in a.values.split(","):
            key = value_key(value)
            if key in results:
                logger.info("%s=%s: held-out OP %.4f (from %s)", a.option, key, results[key]["op"], out)
                continue
            trial = run
            names, parts = a.option.split(","), value.split(":")
            if len(names) != len(parts):
                raise SystemExit(f"--values {value!r}: expected {len(names)} ':'-joined values for {a.option}")
            for name, part in zip(names, parts):
                trial = with_option(trial, name, part, {**trial.method_options, **fixed})
            matrix, initial = run_value(trial, tasks, full, tmp, f"{a.option}={key}")
            results[key] = {"accuracy": matrix, "initial_accuracy": initial,
                            "op": metrics.overall_performance(matrix), "bwt": metrics.backward_transfer(matrix)}
            io.write_json(out.with_suffix(".partial.json"), {"settings": settings, "results": results})
            logger.info("%s=%s: held-out OP %.4f BWT %s", a.option, key, results[key]["op"], results[key]["bwt"])
    reference = {value_key(x) for x in a.reference.split(",") if x}
    chosen = choose(results, reference)
    report = {"method": a.method, "option": a.option, "chosen": chosen, "reference": sorted(reference),
              "criterion": "held-out OP (mean accuracy after the last task)",
              "tasks": names, "train_per_task": [len(t.split("train")) for t in tasks],
              "held_out_per_task": [len(t.split(HELD_OUT)) for t in tasks], "fixed_options": fixed,
              "settings": {**settings, "values": ",".join(results)}, "results": results,
              "versions": library_versions()}
    io.write_json(out, report)
    logger.info("chosen %s = %s (written to %s)", a.option, chosen, out)


if __name__ == "__main__":
    main()
