"""Where do a finished encoder run's wrong answers go? Cross-task confusion after the last task.

The MiniLM backbone scores every label of the run (``answer_space = "all"``), so a model can
forget a task in two ways: it maps the task's inputs to the wrong label *of the same task*, or to a
label *of another task* (typically the latest one). This script reloads the final checkpoint of
each run folder and measures, per task and in total:

- ``accuracy``: the run's own metric (checked against the stored matrix);
- ``cross_task``: the share of wrong answers that are a label of another task only;
- ``task_space``: the accuracy when each example may only choose among its own task's labels,
  i.e. with the cross-task errors removed (the setting of generative models prompted with options).

Nothing is selected or tuned with these numbers; they explain the matrix. For example::

    R=benchmarks/results/standard/runs
    python benchmarks/error_analysis.py $R/{seqlora,inclora,olora,replay,rkif}/order1-seed42
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from rkif import io
from rkif.config import RunConfig
from rkif.runner import RESULTS, build, load_checkpoint

logger = logging.getLogger("error_analysis")


def analyse(run_dir: Path) -> dict:
    """Per-task accuracy, cross-task error share and own-labels accuracy of the run's final model."""
    results = io.read_json(run_dir / RESULTS)
    if not results.get("complete"):
        raise ValueError(f"{run_dir}: the run is not finished")
    run = RunConfig.from_dict(results["config"])
    if run.backbone.family != "encoder":
        raise ValueError(f"{run_dir}: only encoder runs score over a shared answer space")
    tasks, backbone, method = build(run)
    load_checkpoint(run_dir, results["finished_stages"] - 1, method, backbone)
    owner = Counter(label for t in tasks for label in t.labels)
    rows = {}
    for i, task in enumerate(tasks):
        examples = task.split(run.eval_split)
        gold = [ex.output for ex in examples]
        backbone.config.answer_space = "all"
        answers = backbone.predict(examples, desc=f"{run_dir.parent.name} {task.name}")
        backbone.config.answer_space = "task"
        own = backbone.predict(examples, desc=f"{run_dir.parent.name} {task.name} (own labels)")
        wrong = [a for a, g in zip(answers, gold) if a != g]
        foreign = [a for a in wrong if a not in task.labels]
        into = Counter(t.name for a in foreign for t in tasks if a in t.labels and owner[a] == 1)
        rows[task.name] = {
            "n": len(examples), "accuracy": sum(a == g for a, g in zip(answers, gold)) / len(examples),
            "stored_accuracy": results["accuracy"][i][-1],
            "cross_task": len(foreign) / len(wrong) if wrong else 0.0,
            "cross_task_into": dict(into.most_common()),
            "task_space": sum(a == g for a, g in zip(own, gold)) / len(examples)}
    n = sum(r["n"] for r in rows.values())
    wrong = sum(r["n"] * (1 - r["accuracy"]) for r in rows.values())
    foreign = sum(r["n"] * (1 - r["accuracy"]) * r["cross_task"] for r in rows.values())
    return {"run": str(run_dir), "method": results["method"], "order": results["order"], "tasks": rows,
            "mean_accuracy": sum(r["accuracy"] for r in rows.values()) / len(rows),
            "mean_task_space": sum(r["task_space"] for r in rows.values()) / len(rows),
            "cross_task": foreign / wrong if wrong else 0.0, "examples": n}


def table(analyses: list[dict]) -> str:
    """Markdown: one row per run."""
    lines = ["| method | order | OP (all labels) | OP (own labels only) | wrong answers that are "
             "another task's label |", "|---|---|---|---|---|"]
    for a in analyses:
        lines.append(f"| {a['method']} | {a['order']} | {100 * a['mean_accuracy']:.1f} | "
                     f"{100 * a['mean_task_space']:.1f} | {100 * a['cross_task']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="finished run folders (with their checkpoints)")
    p.add_argument("--out", default="benchmarks/results/standard/error_analysis")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    analyses = []
    for run_dir in a.runs:
        analyses.append(analyse(Path(run_dir)))
        for name, row in analyses[-1]["tasks"].items():
            if abs(row["accuracy"] - row["stored_accuracy"]) > 1e-9:
                logger.warning("%s %s: re-evaluated %.4f differs from the stored %.4f",
                               run_dir, name, row["accuracy"], row["stored_accuracy"])
    md = table(analyses)
    io.write_json(Path(a.out + ".json"), {"runs": analyses})
    Path(a.out + ".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
