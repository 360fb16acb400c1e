"""What a run shows in the terminal: one progress bar per training stage, with the live loss and a
method's round in its postfix (``training.ConsoleCallback``, drawn with ``progress_options``); the runner's
line per finished stage; the final matrix (the CLI). This module imports no torch or transformers.

The Trainer's log dicts, a method's per-round diagnostics included, go to ``<workdir>/log.jsonl`` (one
JSON object per line) and to the loggers of ``--report-to``; the terminal shows them only with
``--verbose`` (the CLI sets ``TRAINER_LOG`` to INFO; a library user does the same with ``logging``).
``quiet_dependencies`` silences what a user cannot act on (deprecations inside
dependencies, their loading bars).
"""

from __future__ import annotations

import logging
import sys
import warnings

from tqdm.auto import tqdm

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
