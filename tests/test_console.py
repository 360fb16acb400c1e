"""The terminal shows progress bars and one line per task; the Trainer's log dicts go to log.jsonl."""

import io
import itertools
import json
import logging
import sys
from types import SimpleNamespace

import pytest
import tqdm

from rkif import console, training
from rkif.cli import main
from tests.conftest import ToyBackbone, toy_examples


def _run(tiny_data, out, *extra, tasks="alpha,beta", method=("rkif", "-O", "inner_steps=2", "-O", "outer_steps=1")):
    return main(["run", "--method", *method, "--data", str(tiny_data), "--tasks", tasks, "--train-size", "all",
                 "--test-size", "all", "--max-steps", "6", "--batch-size", "4", "--max-length", "32",
                 "--output", str(out), *extra])


def test_log_dicts_go_to_the_log_file_not_the_terminal(tiny_data, tmp_path, capsys):
    assert _run(tiny_data, tmp_path / "quiet") == 0
    shown = "".join(capsys.readouterr())
    assert "'loss'" not in shown and '"loss"' not in shown and "rkif/in_only" not in shown
    assert "train 2: beta" in shown                                     # the stage's progress bar
    records = [json.loads(line) for line in (tmp_path / "quiet" / "trainer" / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)                             # the Trainer's logs, kept
    assert any("rkif/round" in r and "rkif/in_only" in r for r in records)   # R-KIF's rounds, with their number


def test_verbose_prints_the_log_dicts(tiny_data, tmp_path, capsys):
    assert _run(tiny_data, tmp_path / "loud", "--verbose", tasks="alpha", method=("seqlora",)) == 0
    assert '"loss"' in "".join(capsys.readouterr())
    assert console.TRAINER_LOG.isEnabledFor(logging.INFO)
    console.show_trainer_logs(False)


def test_every_log_record_names_its_stage_and_tasks(tmp_path):
    """``step`` restarts with every stage: each record carries the stage's 0-based index and its tasks."""
    state = SimpleNamespace(max_steps=4, global_step=0, is_local_process_zero=False, is_world_process_zero=True)
    for index, tasks in ((0, "alpha"), (1, "beta+gamma")):
        callback = training.ConsoleCallback(f"train {index + 1}: {tasks}", index, tasks)
        callback.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), state, None)
        state.global_step = 2
        callback.on_log(None, state, None, logs={"loss": 0.5})
        callback.on_train_end(None, state, None)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records == [{"stage_index": 0, "tasks": "alpha", "step": 2, "loss": 0.5},
                       {"stage_index": 1, "tasks": "beta+gamma", "step": 2, "loss": 0.5}]


# -- progress bars in a log file (nohup, Slurm): rare redraws, one final bar -----------------------------------------

class _Log(io.StringIO):
    """A file stderr is redirected to, or a terminal."""

    def __init__(self, tty: bool = False):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def slow_clock(monkeypatch):
    """tqdm's clock advances a second per reading (its monitor thread off), so every update is 'late'."""
    ticks = itertools.count()
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(ticks)))
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)


def test_progress_options_are_tqdms_own_on_a_terminal():
    assert console.progress_options(_Log(tty=True)) == {}
    assert console.progress_options(_Log())["mininterval"] == console.LOG_FILE_REDRAW_S


def test_a_training_bar_in_a_log_file_redraws_rarely_and_ends_once(slow_clock, monkeypatch, tmp_path):
    log = _Log()
    monkeypatch.setattr(sys, "stderr", log)
    bar = training.ConsoleCallback("train 1: alpha")
    state = SimpleNamespace(max_steps=20, global_step=0, is_local_process_zero=True)
    bar.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    for step in range(1, 21):
        state.global_step = step
        bar.on_step_end(None, state, None)
    bar.on_train_end(None, state, None)
    drawn = log.getvalue()
    assert drawn.count("\r") <= 3 and drawn.count("20/20") == 1, drawn       # tqdm's default: a redraw per step


def test_an_evaluation_bar_in_a_log_file_redraws_rarely(slow_clock, monkeypatch):
    log = _Log()
    monkeypatch.setattr(sys, "stderr", log)
    backbone = ToyBackbone()
    backbone.config.eval_batch_size = 1
    answers = backbone.predict(toy_examples("alpha", 40, 0), desc="eval alpha")
    assert len(answers) == 40
    assert 1 <= log.getvalue().count("eval alpha") <= 3, log.getvalue()


def test_progress_bars_in_a_notebook_update_as_usual(monkeypatch):
    """In Jupyter stderr is no terminal, but tqdm.auto draws a live widget there: no once-a-minute redraws."""
    import tqdm.notebook

    class NotebookBar(tqdm.notebook.tqdm):
        pass

    monkeypatch.setattr(console, "tqdm", NotebookBar)
    assert console.progress_options(_Log()) == {}
