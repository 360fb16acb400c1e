"""The terminal shows progress bars and one line per task; the Trainer's log dicts go to log.jsonl."""

import json
import logging

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
