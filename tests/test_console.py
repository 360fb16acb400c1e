"""The terminal shows progress bars and one line per task; the Trainer's log dicts go to log.jsonl."""

import json
import logging
from types import SimpleNamespace

from rkif import console
from rkif.cli import main


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
        callback = console.ConsoleCallback(f"train {index + 1}: {tasks}", index, tasks)
        callback.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), state, None)
        state.global_step = 2
        callback.on_log(None, state, None, logs={"loss": 0.5})
        callback.on_train_end(None, state, None)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records == [{"stage_index": 0, "tasks": "alpha", "step": 2, "loss": 0.5},
                       {"stage_index": 1, "tasks": "beta+gamma", "step": 2, "loss": 0.5}]
