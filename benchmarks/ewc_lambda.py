"""Choose EWC's lambda on data held out from the TRAIN split (never dev/test, which equals test here).

Each task's training sample (the one a benchmark run trains on: same ``--train-size`` and seed) is
cut in two: the first ``1 - held_out`` part trains, the rest is the validation set. For every lambda
of the grid (normalised Fisher by default) the whole order is trained with EWC and the held-out
accuracy of every task is measured after every task; the chosen lambda maximises the held-out OP
(mean accuracy after the last task; ties: the smaller lambda). lambda = 0 (plain sequential LoRA on
the same split) can be added to the grid as a reference; it is never chosen.

    python benchmarks/ewc_lambda.py                                   # Standard order 1, 500/task
    python benchmarks/ewc_lambda.py --train-size 40 --tasks dbpedia,amazon --lambdas 1,100   # smoke test
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from transformers import set_seed

import rkif.methods.ewc  # noqa: F401  (registers "ewc")
from rkif import io, metrics
from rkif.backbones import BackboneConfig, build_backbone
from rkif.config import RunConfig, library_versions
from rkif.data import Task, load_benchmark, resolve_task_names
from rkif.methods import parse_options, resolve
from rkif.runner import evaluate
from rkif.training import train_stage

logger = logging.getLogger("ewc_lambda")
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


def run_lambda(lam: float, tasks: list[Task], answer_tasks: list[Task], run: RunConfig, options: dict,
               workdir: str) -> list[list[float]]:
    """Train the order with EWC at ``lam``; the held-out accuracy matrix (rows: task, columns: after stage)."""
    cls, opts = resolve("ewc", {**options, "ewc_lambda": lam})
    config = parse_options(cls.config_class, opts)
    set_seed(run.seed)
    backbone = build_backbone(run.backbone, cls.peft_config(config, run.backbone))
    backbone.set_answer_space(answer_tasks)
    method = cls(config, backbone, run)
    columns = []
    for j, task in enumerate(tasks):
        set_seed(run.seed + j)
        data = method.before_task(j, [task], task.split("train"))
        train_stage(backbone, data, method, run, j, workdir)
        method.after_task(j, [task], task.split("train"))
        columns.append(evaluate(backbone, tasks, HELD_OUT, f"lambda={lam:g} after {task.name}"))
        logger.info("lambda=%g after %s: %s", lam, task.name, [round(a, 3) for a in columns[-1]])
    return [[col[i] for col in columns] for i in range(len(tasks))]


def choose(results: dict[str, dict]) -> float:
    """The lambda with the best held-out OP, smaller lambda on ties; lambda = 0 is a reference only."""
    candidates = [(r["op"], -float(k)) for k, r in results.items() if float(k) > 0]
    if not candidates:
        raise ValueError("the grid has no lambda > 0")
    return -max(candidates)[1]


def reusable_results(path: Path, settings: dict) -> dict[str, dict]:
    """Results of an earlier selection at ``path`` made with the same settings (any lambdas), else {}.

    So a grid can be extended (e.g. when the best lambda lies on its edge) or resumed without
    retraining the lambdas already measured; every lambda's numbers stay in one file.
    """
    if not path.exists():
        return {}
    earlier = io.read_json(path)
    same = {k: v for k, v in earlier.get("settings", {}).items() if k != "lambdas"}
    if same != {k: v for k, v in settings.items() if k != "lambdas"}:
        logger.warning("%s was made with other settings; it will be replaced", path)
        return {}
    return dict(earlier["results"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--benchmark", default="standard")
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--tasks", default=None, help="comma-separated tasks instead of the order")
    p.add_argument("--train-size", type=int, default=500, help="per-task training sample before the split")
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of each task's sample held out")
    p.add_argument("--lambdas", default="1,10,100,1000")
    p.add_argument("--normalize-fisher", default="true")
    p.add_argument("--fisher-samples", type=int, default=200)
    p.add_argument("--model", default="minilm")
    p.add_argument("--family", default="encoder")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="benchmarks/results/ewc_lambda.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    run = RunConfig(method="ewc", backbone=BackboneConfig(model=a.model, family=a.family, max_length=a.max_length),
                    data=a.data, benchmark=a.benchmark, order=a.order,
                    tasks=a.tasks.split(",") if a.tasks else None, train_size=a.train_size, test_size=1,
                    epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    names = resolve_task_names(Path(run.data), run.benchmark, run.order, run.tasks)
    full = load_benchmark(Path(run.data), names, run.train_size, run.test_size, run.eval_split, run.seed)
    tasks = split_train(full, a.held_out)
    options = {"normalize_fisher": a.normalize_fisher, "fisher_samples": a.fisher_samples}
    results = reusable_results(Path(a.out), vars(a))
    with tempfile.TemporaryDirectory() as tmp:
        for lam in (float(x) for x in a.lambdas.split(",")):
            if f"{lam:g}" in results:
                logger.info("lambda=%g: held-out OP %.4f (from %s)", lam, results[f"{lam:g}"]["op"], a.out)
                continue
            matrix = run_lambda(lam, tasks, full, run, options, tmp)
            results[f"{lam:g}"] = {"accuracy": matrix, "op": metrics.overall_performance(matrix),
                                   "bwt": metrics.backward_transfer(matrix)}
            logger.info("lambda=%g: held-out OP %.4f BWT %s", lam, results[f"{lam:g}"]["op"],
                        results[f"{lam:g}"]["bwt"])
    chosen = choose(results)
    report = {"chosen_lambda": chosen, "criterion": "held-out OP (mean accuracy after the last task)",
              "tasks": names, "train_per_task": [len(t.split("train")) for t in tasks],
              "held_out_per_task": [len(t.split(HELD_OUT)) for t in tasks], "options": options,
              "settings": {**vars(a), "lambdas": ",".join(results)}, "results": results, "versions": library_versions()}
    io.write_json(Path(a.out), report)
    logger.info("chosen lambda = %g (written to %s)", chosen, a.out)


if __name__ == "__main__":
    main()
