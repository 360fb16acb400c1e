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

import torch
from transformers import set_seed

from rkif import io, metrics
from rkif.backbones import Backbone, build_backbone
from rkif.config import EVAL_SCOPES, RunConfig, library_versions
from rkif.data import Task, load_benchmark, resolve_task_names
from rkif.distributed import predict_sharded
from rkif.methods import Method, parse_options, resolve
from rkif.precision import autocast, resolve_precision
from rkif.training import train_stage, training_device

logger = logging.getLogger(__name__)

RESULTS = "results.json"
# settings that may differ between a run and its resumption
_RESUME_FREE = {"resume", "output"}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    metric (exact match, ROUGE-L: ``rkif.metrics``), under the run's ``precision`` (autocast for bf16/fp16).
    Under DDP each rank answers its share of the examples and every rank gets every answer
    (``predict_sharded``): all ranks must call it."""
    accs: list[float | None] = []
    device_type = backbone.device.type
    precision = resolve_precision(precision, device_type)
    for task in tasks:
        if only is not None and task.name not in only:
            accs.append(None)
            continue
        examples = task.split(split)
        with autocast(precision, device_type):
            answers = predict_sharded(backbone, examples, desc=f"{desc} {task.name}")
        accs.append(metrics.score(task.metric, answers, [ex.answers for ex in examples]))
    return accs


def build_learner(run: RunConfig, answer_tasks: list[Task]) -> tuple[Backbone, Method]:
    """The run's backbone (answer space: the labels of ``answer_tasks``) and its method, seeded."""
    method_cls, method_config = run.method_config()
    method_cls.check_family(run.backbone.family)          # before the model loads
    set_seed(run.seed)
    backbone = build_backbone(run.backbone, method_cls.peft_config(method_config, run.backbone))
    backbone.to(training_device())        # where the Trainer will train it: the untrained evaluation runs there too
    backbone.set_answer_space(answer_tasks)
    return backbone, method_cls(method_config, backbone, run)


def prepare(run: RunConfig) -> list[Task]:
    """Check every setting of ``run`` and load its tasks: whatever is wrong with a run's settings or data
    is refused here, in one line, before a model loads or its output folder is touched."""
    run.check()
    names = resolve_task_names(Path(run.data), run.benchmark, run.order, run.tasks)
    tasks = load_benchmark(Path(run.data), names, run.train_size, run.test_size, run.eval_split, run.seed,
                           run.benchmark)
    for task in tasks:                    # an unknown metric or a missing scorer package fails before the model loads
        metrics.scorer(task.metric)
    return tasks


def build(run: RunConfig) -> tuple[list[Task], Backbone, Method]:
    """Tasks (checked: ``prepare``), backbone (answer space set) and method of a run."""
    tasks = prepare(run)
    return (tasks, *build_learner(run, tasks))


def learn_stage(j: int, stage: list[Task], backbone: Backbone, method: Method, run: RunConfig,
                workdir: str) -> dict:
    """Learn stage ``j``: the method's before_task, Trainer training, its after_task; the training log."""
    set_seed(run.seed + j)
    train = [ex for t in stage for ex in t.split("train")]
    data = method.before_task(j, stage, train)
    names = "+".join(t.name for t in stage)
    logger.info("stage %d: %s (%d training examples)", j + 1, names, len(data))
    log = train_stage(backbone, data, method, run, j, workdir, desc=f"train {j + 1}: {names}", tasks=names)
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


def _resolved_method_config(method: str, options: dict) -> dict:
    """The method's full config (defaults filled, option strings parsed) as JSON values."""
    method_cls, options = resolve(method, options)
    return json.loads(json.dumps(asdict(parse_options(method_cls.config_class, options))))


def _flat(config: dict) -> dict:
    """``{setting: value}`` of a RunConfig dict, backbone settings as ``backbone.KEY``, the free ones left out
    (method options are compared parsed, apart)."""
    flat = {k: v for k, v in config.items() if k not in _RESUME_FREE | {"backbone", "method_options"}}
    flat.update({f"backbone.{k}": v for k, v in config.get("backbone", {}).items()})
    return flat


def _normalised(flat: dict) -> dict:
    """``_flat`` settings with the paths resolved, so ``data/``, ``data`` and ``/abs/data`` compare equal
    (and so do the files of ``user_modules``)."""
    flat = dict(flat, data=os.path.realpath(os.path.expanduser(str(flat["data"]))))
    flat["user_modules"] = [os.path.realpath(os.path.expanduser(m)) if os.path.isfile(os.path.expanduser(m)) else m
                            for m in flat.get("user_modules") or []]
    model = os.path.expanduser(str(flat["backbone.model"]))
    if os.path.exists(model):
        flat["backbone.model"] = os.path.realpath(model)
    return json.loads(json.dumps(flat))


def with_defaults(saved: dict) -> dict:
    """A saved run's config (``RunConfig.to_dict``) with the settings it lacks at their defaults: a setting
    added to RunConfig after the run started was, in effect, at its default then (the rule for a new setting:
    its default must reproduce the old behaviour)."""
    defaults = RunConfig().to_dict()
    return {**defaults, **saved, "backbone": {**defaults["backbone"], **saved.get("backbone", {})}}


def _check_resumable(run: RunConfig, previous: dict, path: Path) -> None:
    """Refuse to resume a run under other settings than it started with, listing each as ``saved -> now``.

    Paths are compared resolved and method options parsed (``-O x=02`` is ``x=2``); the method's full
    config is compared with the one saved, so a method default changed since also refuses.
    """
    changed = _changed_behaviour(previous["config"])
    if changed and not previous.get("complete"):
        raise ValueError(f"{path}: cannot resume: {changed}; start it again with another --output")
    saved = with_defaults(previous["config"])
    before, now = _flat(saved), _flat(run.to_dict())
    differ = [k for k, v in _normalised(now).items() if v != _normalised(before).get(k)]
    diff = [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in sorted(differ)]
    if "method" not in differ:
        current = _resolved_method_config(run.method, run.method_options)
        old = previous.get("method_config")
        if old is not None:                    # a field added since the run started was at its default then
            method_cls, _ = resolve(run.method, {})
            old = {**json.loads(json.dumps(asdict(method_cls.config_class()))), **old}
        else:                                  # saved before results recorded the resolved config
            try:
                old = _resolved_method_config(saved["method"], saved["method_options"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: cannot resume, its method options no longer parse ({err})") from err
        diff += [f"method option {k} {old.get(k)!r} -> {current.get(k)!r}"
                 for k in sorted(set(old) | set(current)) if old.get(k) != current.get(k)]
    if diff:
        raise ValueError(f"{path}: cannot resume, settings differ from the saved run (saved -> now): "
                         + ", ".join(diff) + "; resume with the saved settings or choose another --output")


def check_checkpoint(out: Path, stage: int) -> None:
    """Refuse a checkpoint whose files are missing or differ from the checksums saved with it, naming the file."""
    ckpt = out / "checkpoints" / f"stage_{stage}"
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found (needed to resume after stage {stage + 1}; "
                                "copy it back or start the run again with another --output)")
    if not io.verify_checksums(ckpt):
        logger.warning("%s: saved without checksums (by an older rkif); loading it unchecked", ckpt)


def load_checkpoint(out: Path, stage: int, method: Method, backbone: Backbone) -> None:
    """Restore the method state and the adapter weights saved after ``stage`` (0-based) of the run in ``out``."""
    ckpt = out / "checkpoints" / f"stage_{stage}"
    # method state first: a method that adds adapters per task recreates them before the weights load
    method.load_state_dict(io.read_tensors(ckpt / "method.safetensors"), io.read_json(ckpt / "method.json"))
    try:
        backbone.load_adapter_state(io.read_tensors(ckpt / "adapter.safetensors"))
    except KeyError as err:
        raise ValueError(f"{ckpt / 'adapter.safetensors'}: {err.args[0] if err.args else err}; was it saved by "
                         "another model or method? resume with the saved settings or choose another --output") from err


def save_checkpoint(out: Path, stage: int, adapter: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                    meta: dict) -> None:
    """Write the adapter weights and method state after ``stage``, then their checksums (last)."""
    ckpt = out / "checkpoints" / f"stage_{stage}"
    io.write_tensors(ckpt / "adapter.safetensors", adapter)
    io.write_tensors(ckpt / "method.safetensors", tensors)
    io.write_json(ckpt / "method.json", meta)
    io.write_checksums(ckpt, ["adapter.safetensors", "method.safetensors", "method.json"])


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


def run_experiment(run: RunConfig, tasks: list[Task] | None = None) -> dict:
    """Run (or resume) one continual-learning experiment and return its results dict.

    ``tasks``: the run's tasks as ``prepare(run)`` returned them (checked and loaded here when None).
    """
    tasks = prepare(run) if tasks is None else tasks
    out = run.output_dir
    results_path = out / RESULTS
    if results_path.exists() and not run.resume:
        raise FileExistsError(f"{results_path} exists: pass --resume to continue it or choose another --output")
    if is_main_process():
        io.check_output_dir(out)           # a file or a read-only folder fails now, not after the first task
    previous = io.read_results(results_path) if results_path.exists() else None
    if run.resume and previous is None and is_main_process():
        logger.info("--resume: no %s yet, so this starts a new run with the settings given", results_path)
    if previous:
        _check_resumable(run, previous, results_path)
        if previous.get("complete"):
            logger.info("%s is complete; nothing to resume", results_path)
            return previous
        if previous["finished_stages"] > 0:
            check_checkpoint(out, previous["finished_stages"] - 1)     # before the model loads

    backbone, method = build_learner(run, tasks)
    stages = method.stages(tasks)
    tasks_to_evaluate(stages, 0, run.eval_scope)          # a bad scope fails before any training
    columns: list[list[float]] = []
    extra = {"seconds": 0.0, "stage_log": []}
    if previous and previous["finished_stages"] > 0:
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
            save_checkpoint(out, j, adapter, tensors, meta)
            io.write_json(results_path, _results(run, method.config, tasks, stages, columns, initial, extra))
    results = _results(run, method.config, tasks, stages, columns, initial, extra)
    if is_main_process():
        io.write_json(results_path, results)
    return results


def _fmt(tasks: list[Task], accs: list[float | None]) -> str:
    return "  ".join(f"{t.name} {metrics.points(100 * a)}" for t, a in zip(tasks, accs) if a is not None)
