"""What a run shows in the terminal: one progress bar per training stage, with the live loss and a
method's round in its postfix; the runner's line per finished stage; the final matrix (the CLI).

The Trainer's log dicts, a method's per-round diagnostics included, go to ``<workdir>/log.jsonl`` (one
JSON object per line) and to the loggers of ``--report-to``; the terminal shows them only with
``--verbose`` (the CLI sets ``TRAINER_LOG`` to INFO; a library user does the same with ``logging``).
``quiet_dependencies`` silences what a user cannot act on (deprecations inside
dependencies, their loading bars).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

TRAINER_LOG = logging.getLogger("rkif.trainer_log")      # INFO: the Trainer's log dicts in the terminal too
TRAINER_LOG.setLevel(logging.WARNING)
# seconds between redraws of a progress bar written to a file or a pipe (nohup, Slurm) rather than a terminal
LOG_FILE_REDRAW_S = 60


def progress_options(stream=None) -> dict:
    """tqdm's keyword arguments for every rkif progress bar (``stream``: where it draws; stderr by default).

    On a terminal, or as a Jupyter widget, tqdm's own. In a file or a pipe every redraw stays (its carriage
    return erases nothing), so at most one a minute: a long job's progress still shows in its log, which stays
    small, and the final bar is drawn once (by ``close``) rather than by the last update and again by ``close``.
    """
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)() or _notebook():
        return {}
    return {"mininterval": LOG_FILE_REDRAW_S, "maxinterval": LOG_FILE_REDRAW_S}


def _notebook() -> bool:
    """Whether tqdm.auto draws Jupyter widgets here (live, though stderr is no terminal there)."""
    return any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)


def show_trainer_logs(on: bool) -> None:
    """The CLI's ``--verbose``: print every Trainer log dict above the progress bar (or stop)."""
    TRAINER_LOG.setLevel(logging.INFO if on else logging.WARNING)


def quiet_dependencies() -> None:
    """Hide dependency deprecation warnings and transformers' own loading bars and info logs."""
    import transformers

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|accelerate|torch)(\.|$)")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def log_once() -> None:
    """Send the log records of huggingface_hub and transformers to the root logger's handler (the CLI's) only.

    huggingface_hub adds a stderr handler of its own and also propagates (transformers too, under ``CI=1``),
    so beside the CLI's handler each of its lines (e.g. the hub's retries) printed twice.
    """
    import transformers

    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        if type(handler) is logging.StreamHandler:
            hub.removeHandler(handler)
    hub.propagate = True
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


class ConsoleCallback(TrainerCallback):
    """A progress bar over the stage's optimizer steps and the Trainer's logs written to ``log.jsonl``.

    Each record is ``{"stage_index", "tasks", "step", **logs}``: ``step`` restarts with every stage, so
    ``stage_index`` (0-based, as ``checkpoints/stage_<j>`` and results.json's ``stage_log``; the terminal's
    ``train <j + 1>``) and ``tasks`` (the stage's task names joined by ``+``) tell the stages apart.
    """

    def __init__(self, desc: str, stage_index: int = 0, tasks: str | None = None):
        self.desc = desc
        self.stage = {"stage_index": stage_index, "tasks": tasks}
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kw):
        self.log_path = Path(args.output_dir) / "log.jsonl"
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True,
                        disable=not state.is_local_process_zero, **progress_options())

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps({**self.stage, "step": state.global_step, **logs}) + "\n")
        if "loss" in logs:
            self.postfix["loss"] = f"{float(logs['loss']):.3f}"
        for key, value in logs.items():
            if key.endswith("/round"):
                self.postfix[key.rsplit("/", 1)[0] + " round"] = str(value)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            if TRAINER_LOG.isEnabledFor(logging.INFO):
                self.bar.write(json.dumps(logs))       # through tqdm, so the bar is redrawn below it

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
