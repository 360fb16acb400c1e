"""The continual-learning loop: train each stage, evaluate every task, checkpoint, resume.

    for each stage j of method.stages(tasks):          (one task per stage unless the method says)
        learn_stage: data = method.before_task(j, ...)
                     ContinualTrainer(backbone, data, method).train()
                     method.after_task(j, ...)
        evaluate every task -> column j of the score matrix (each task's metric: accuracy, ROUGE-L)
        save adapter + method state (safetensors + JSON), write results.json (atomic)

The runner never names a method: everything method-specific happens in the method's hooks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from transformers import set_seed

from rkif import io, metrics
from rkif.backbones import Backbone, build_backbone
from rkif.config import RunConfig, library_versions
from rkif.data import Task, load_benchmark, resolve_task_names
from rkif.methods import Method, parse_options, resolve
from rkif.precision import autocast, resolve_precision
from rkif.training import train_stage, training_device

logger = logging.getLogger(__name__)

RESULTS = "results.json"
# settings that may differ between a run and its resumption
_RESUME_FREE = {"resume", "output"}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


EVAL_SCOPES = ("all", "seen+next")


def tasks_to_evaluate(stages: list[list[Task]], j: int, scope: str) -> set[str] | None:
    """The tasks evaluated after stage ``j``: None (every task) or, for ``"seen+next"``, the tasks
    of stages 0..j+1. Those are all the cells OP, BWT, FWT and forgetting read (Eq. 10, 11 and FWT:
    a[i][K], a[i][i], a[i][i-1]); the others stay empty (None). A 15-task order then evaluates 134
    of the 225 cells (a 4-task order 13 of 16), and the heatmap's upper triangle is blank.
    """
    if scope not in EVAL_SCOPES:
        raise ValueError(f"eval_scope {scope!r}: expected one of {', '.join(EVAL_SCOPES)}")
    if scope == "all":
        return None
    return {t.name for stage in stages[:j + 2] for t in stage}


def evaluate(backbone: Backbone, tasks: list[Task], split: str, desc: str,
             only: set[str] | None = None, precision: str = "fp32") -> list[float | None]:
    """Score of the current model on every task's evaluation split (None: not in ``only``), by the task's
    metric (exact match, ROUGE-L: ``rkif.metrics``), under the run's ``precision`` (autocast for bf16/fp16)."""
    accs: list[float | None] = []
    device_type = backbone.device.type
    precision = resolve_precision(precision, device_type)
    for task in tasks:
        if only is not None and task.name not in only:
            accs.append(None)
            continue
        examples = task.split(split)
        with autocast(precision, device_type):
            answers = backbone.predict(examples, desc=f"{desc} {task.name}")
        accs.append(metrics.score(task.metric, answers, [ex.answers for ex in examples]))
    return accs


def build_learner(run: RunConfig, answer_tasks: list[Task]) -> tuple[Backbone, Method]:
    """The run's backbone (answer space: the labels of ``answer_tasks``) and its method, seeded."""
    method_cls, options = resolve(run.method, run.method_options)
    method_config = parse_options(method_cls.config_class, options)
    set_seed(run.seed)
    backbone = build_backbone(run.backbone, method_cls.peft_config(method_config, run.backbone))
    backbone.to(training_device())        # where the Trainer will train it: the untrained evaluation runs there too
    backbone.set_answer_space(answer_tasks)
    return backbone, method_cls(method_config, backbone, run)


def build(run: RunConfig) -> tuple[list[Task], Backbone, Method]:
    """Tasks, backbone (answer space set) and method of a run."""
    names = resolve_task_names(Path(run.data), run.benchmark, run.order, run.tasks)
    tasks = load_benchmark(Path(run.data), names, run.train_size, run.test_size, run.eval_split, run.seed,
                           run.benchmark)
    for task in tasks:                    # an unknown metric or a missing scorer package fails before the model loads
        metrics.scorer(task.metric)
    return (tasks, *build_learner(run, tasks))


def learn_stage(j: int, stage: list[Task], backbone: Backbone, method: Method, run: RunConfig,
                workdir: str) -> dict:
    """Learn stage ``j``: the method's before_task, Trainer training, its after_task; the training log."""
    set_seed(run.seed + j)
    train = [ex for t in stage for ex in t.split("train")]
    data = method.before_task(j, stage, train)
    logger.info("stage %d: %s (%d training examples)", j + 1, "+".join(t.name for t in stage), len(data))
    log = train_stage(backbone, data, method, run, j, workdir)
    method.after_task(j, stage, train)
    return log


def _changed_behaviour(saved: dict) -> str | None:
    """Why a run saved by an earlier rkif would not continue as it started, where no setting restores it."""
    if "prompt_format" not in saved.get("backbone", {}) and saved.get("backbone", {}).get("family") in (
            "causal", "seq2seq"):
        return "generative evaluation changed since it was saved (prompt tokens, truncation, generation length)"
    if "group_by_length" not in saved and saved.get("precision") == "bf16":
        return "bf16 runs now also evaluate under bf16 autocast (they evaluated in fp32 when it was saved)"
    return None


def _check_resumable(run: RunConfig, previous: dict, path: Path) -> None:
    changed = _changed_behaviour(previous["config"])
    if changed and not previous.get("complete"):
        raise ValueError(f"{path}: cannot resume: {changed}; start it again with another --output")
    now = {k: v for k, v in run.to_dict().items() if k not in _RESUME_FREE}
    # a setting added to RunConfig after the run started was, in effect, at its default then
    # (the rule for a new setting: its default must reproduce the old behaviour)
    defaults = RunConfig().to_dict()
    saved = {**defaults, **previous["config"]}
    saved["backbone"] = {**defaults["backbone"], **previous["config"].get("backbone", {})}
    before = {k: v for k, v in saved.items() if k not in _RESUME_FREE}
    diff = sorted(k for k in now if now[k] != before.get(k))
    if diff:
        raise ValueError(f"{path}: cannot resume, settings differ from the saved run: {diff}")


def load_checkpoint(out: Path, stage: int, method: Method, backbone: Backbone) -> None:
    """Restore the method state and the adapter weights saved after ``stage`` (0-based) of the run in ``out``."""
    ckpt = out / "checkpoints" / f"stage_{stage}"
    # method state first: a method that adds adapters per task recreates them before the weights load
    method.load_state_dict(io.read_tensors(ckpt / "method.safetensors"), io.read_json(ckpt / "method.json"))
    backbone.load_adapter_state(io.read_tensors(ckpt / "adapter.safetensors"))


def _check_method_config(method: Method, previous: dict, path: Path) -> None:
    """A method default changed since the run started (same options, other values) also forbids resuming."""
    saved = previous.get("method_config")
    if saved is None:
        return
    now = json.loads(json.dumps(asdict(method.config)))
    diff = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
    if diff:
        raise ValueError(f"{path}: cannot resume, the method's settings differ from the saved run: "
                         + ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in diff))


def _results(run, method_config, tasks, stages, columns, initial, extra) -> dict:
    """results.json: rows = evaluated task, columns = after training stage j."""
    matrix = [[col[i] for col in columns] for i in range(len(tasks))]
    done = len(columns) == len(stages)
    summary = metrics.summarize(matrix, initial) if done else {}
    return {
        "method": run.method, "model": run.backbone.model, "family": run.backbone.family,
        "benchmark": run.benchmark if not run.tasks else "custom",
        "order": run.order if not run.tasks else None,
        "tasks": [t.name for t in tasks], "stages": [[t.name for t in s] for s in stages],
        "metrics": [t.metric for t in tasks],       # the scorer of each row: "accuracy" holds its scores
        "accuracy": matrix, "initial_accuracy": initial,
        "op": summary.get("op"), "bwt": summary.get("bwt"), "fwt": summary.get("fwt"),
        "forgetting": summary.get("forgetting"), "precision_used": resolve_precision(run.precision),
        "finished_stages": len(columns), "complete": done,
        "config": run.to_dict(), "method_config": asdict(method_config), "versions": library_versions(), **extra,
    }


def run_experiment(run: RunConfig) -> dict:
    """Run (or resume) one continual-learning experiment and return its results dict."""
    out = run.output_dir
    results_path = out / RESULTS
    previous = io.read_json(results_path) if results_path.exists() else None
    if previous and not run.resume:
        raise FileExistsError(f"{results_path} exists: pass --resume to continue it or choose another --output")
    if previous:
        _check_resumable(run, previous, results_path)
        if previous.get("complete"):
            logger.info("%s is complete; nothing to resume", results_path)
            return previous

    tasks, backbone, method = build(run)
    stages = method.stages(tasks)
    tasks_to_evaluate(stages, 0, run.eval_scope)          # a bad scope fails before any training
    columns: list[list[float]] = []
    extra = {"seconds": 0.0, "stage_log": []}
    if previous and previous["finished_stages"] > 0:
        _check_method_config(method, previous, results_path)
        columns = [list(c) for c in zip(*previous["accuracy"])]
        initial = previous["initial_accuracy"]
        extra = {k: previous[k] for k in ("seconds", "stage_log", "diagnostics") if k in previous}
        load_checkpoint(out, len(columns) - 1, method, backbone)
        logger.info("resuming %s after stage %d/%d", out, len(columns), len(stages))
    else:
        initial = evaluate(backbone, tasks, run.eval_split, "eval (untrained)", precision=run.precision)
        logger.info("untrained score: %s", _fmt(tasks, initial))

    for j in range(len(columns), len(stages)):
        start = time.perf_counter()
        names = "+".join(t.name for t in stages[j])
        log = learn_stage(j, stages[j], backbone, method, run, str(out / "trainer"))
        column = evaluate(backbone, tasks, run.eval_split, f"eval after {names}",
                          tasks_to_evaluate(stages, j, run.eval_scope), run.precision)
        columns.append(column)
        log.update(stage=j, tasks=names, seconds=time.perf_counter() - start)
        extra["stage_log"].append(log)
        extra["seconds"] += log["seconds"]
        extra["diagnostics"] = method.diagnostics()
        logger.info("after %s: %s", names, _fmt(tasks, column))
        adapter, (tensors, meta) = backbone.adapter_state(), method.state_dict()   # every process: may gather shards
        if is_main_process():
            ckpt = out / "checkpoints" / f"stage_{j}"
            io.write_tensors(ckpt / "adapter.safetensors", adapter)
            io.write_tensors(ckpt / "method.safetensors", tensors)
            io.write_json(ckpt / "method.json", meta)
            io.write_json(results_path, _results(run, method.config, tasks, stages, columns, initial, extra))
    results = _results(run, method.config, tasks, stages, columns, initial, extra)
    if is_main_process():
        io.write_json(results_path, results)
    return results


def _fmt(tasks: list[Task], accs: list[float | None]) -> str:
    return " ".join(f"{t.name}={a:.3f}" for t, a in zip(tasks, accs) if a is not None)
