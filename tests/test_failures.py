"""Failures a user meets: one line naming the file and what to do, before the expensive work; Ctrl-C with the
command that continues; checksummed checkpoints; resume after normalising settings; reports of any runs.

Training is replaced by a no-op where only the bookkeeping is tested, so each test loads MiniLM at most
a few times and evaluates tiny tasks.
"""

import json
import logging
import shlex
from pathlib import Path

import pytest

from rkif import io, runner
from rkif.cli import main
from rkif.report import report
from tests.test_runner import config


def _no_training(monkeypatch, stop_at: int | None = None) -> None:
    """Training stages do nothing; the one at index ``stop_at`` (counted over this process) is a Ctrl-C."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at + 1:
            raise KeyboardInterrupt
        return {}

    monkeypatch.setattr(runner, "train_stage", fake)


def _cut_after_first_stage(monkeypatch, run) -> dict:
    """Run ``run`` until Ctrl-C in its second stage; its results.json then holds one finished stage."""
    _no_training(monkeypatch, stop_at=1)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(run)
    _no_training(monkeypatch)
    return json.loads((Path(run.output) / "results.json").read_text())


def _errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def _one_line_without_traceback(caplog, *needles: str) -> str:
    errors = _errors(caplog)
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, message
    return message


# -- filesystem and model loading --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["auto", "encoder"])
def test_a_model_path_that_does_not_exist_is_one_line(tiny_data, tmp_path, caplog, family):
    missing = str(tmp_path / "nonexistent")
    code = main(["run", "--model", missing, "--family", family, "--data", str(tiny_data), "--tasks", "alpha",
                 "--output", str(tmp_path / "out")])
    assert code == 2
    _one_line_without_traceback(caplog, missing, "no such model folder", "a hub name")
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_model_folder_without_weights_is_one_line(tiny_data, tmp_path, caplog):
    folder = tmp_path / "empty_model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code = main(["run", "--model", str(folder), "--family", "encoder", "--data", str(tiny_data), "--tasks", "alpha",
                 "--output", str(tmp_path / "out")])
    assert code == 2
    _one_line_without_traceback(caplog, f"--model {folder}: cannot load it", "weights")


def test_an_output_that_is_a_file_is_refused_before_the_model_loads(tiny_data, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(runner, "build", lambda run: pytest.fail("the model was loaded"))
    taken = tmp_path / "taken"
    taken.write_text("a user's file")
    for output in (taken, taken / "run"):
        caplog.clear()
        code = main(["run", "--data", str(tiny_data), "--tasks", "alpha", "--output", str(output)])
        assert code == 2
        _one_line_without_traceback(caplog, f"--output {output}", "choose another --output")
    assert taken.read_text() == "a user's file"


def test_a_read_only_output_is_refused_before_the_model_loads(tiny_data, tmp_path, caplog, monkeypatch):
    """Tests run as root, for whom no folder is read-only: the refusal of the write test is simulated."""
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(runner, "build", lambda run: pytest.fail("the model was loaded"))
    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    code = main(["run", "--data", str(tiny_data), "--tasks", "alpha", "--output", str(tmp_path / "ro")])
    assert code == 2
    _one_line_without_traceback(caplog, f"--output {tmp_path / 'ro'}", "Permission denied", "choose another --output")


@pytest.mark.parametrize("model, family", [("/nonexistent.gguf", "auto"), ("no-such-org/no-such-model", "encoder")])
def test_a_model_that_does_not_load_leaves_no_empty_output_folder(tiny_data, tmp_path, caplog, monkeypatch, model,
                                                                  family):
    if family == "encoder":      # a hub name neither cached nor reachable: the loader's error, without the network
        def unreachable(config, *args, **kwargs):
            raise OSError(f"--model {config.model}: cannot load it (not in the cache, no network)")
        monkeypatch.setattr(runner, "build_backbone", unreachable)
    output = tmp_path / "runs" / "new"                           # neither folder exists yet
    code = main(["run", "--model", model, "--family", family, "--data", str(tiny_data), "--tasks", "alpha",
                 "--output", str(output)])
    assert code == 2
    _one_line_without_traceback(caplog, f"--model {model}")
    assert not (tmp_path / "runs").exists()                      # both were made by this run: both removed


@pytest.mark.parametrize("earlier", [None, "notes.txt", "other-run/results.json"])
def test_a_failed_model_load_keeps_a_folder_that_existed(tiny_data, tmp_path, caplog, earlier):
    output = tmp_path / "kept"
    output.mkdir()
    if earlier:
        (output / earlier).parent.mkdir(parents=True, exist_ok=True)
        (output / earlier).write_text("earlier results")
    code = main(["run", "--model", "/nonexistent.gguf", "--data", str(tiny_data), "--tasks", "alpha",
                 "--output", str(output)])
    assert code == 2
    assert output.is_dir() and [p.name for p in output.iterdir()] == ([earlier.split("/")[0]] if earlier else [])
    if earlier:
        assert (output / earlier).read_text() == "earlier results"


def test_debug_shows_the_traceback(tmp_path, caplog, monkeypatch):
    missing = str(tmp_path / "nonexistent")
    assert main(["run", "--model", missing, "--output", str(tmp_path / "out"), "--debug"]) == 2
    assert _errors(caplog)[-1].exc_info is not None
    caplog.clear()
    monkeypatch.setenv("RKIF_DEBUG", "1")
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert _errors(caplog)[-1].exc_info is not None


# -- checkpoints and results files --------------------------------------------------------------------------------

def test_checkpoints_carry_checksums_and_a_damaged_one_is_refused_by_name(tiny_data, tmp_path, monkeypatch):
    make = lambda **kw: config(tiny_data, tmp_path / "run", method="replay", tasks=["alpha", "beta"], **kw)  # noqa: E731
    _cut_after_first_stage(monkeypatch, make())
    ckpt = tmp_path / "run" / "checkpoints" / "stage_0"
    recorded = json.loads((ckpt / "checkpoint.json").read_text())["sha256"]
    assert set(recorded) == {"adapter.safetensors", "method.safetensors", "method.json"}
    assert all(io.sha256(ckpt / name) == digest for name, digest in recorded.items())
    adapter = ckpt / "adapter.safetensors"
    intact = adapter.read_bytes()
    results_before = (tmp_path / "run" / "results.json").read_text()
    real_build = runner.build
    monkeypatch.setattr(runner, "build", lambda run: pytest.fail("the model was loaded"))   # refused before

    ckpt.rename(ckpt.with_name("moved"))
    with pytest.raises(FileNotFoundError, match=r"stage_0: checkpoint not found"):
        runner.run_experiment(make(resume=True))
    ckpt.with_name("moved").rename(ckpt)
    adapter.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))            # one bit flipped, same size
    with pytest.raises(ValueError, match=r"stage_0/adapter.safetensors: checkpoint corrupted"):
        runner.run_experiment(make(resume=True))
    adapter.write_bytes(intact[: len(intact) // 2])                         # truncated
    with pytest.raises(ValueError, match=r"stage_0/adapter.safetensors: checkpoint corrupted"):
        runner.run_experiment(make(resume=True))
    assert (tmp_path / "run" / "results.json").read_text() == results_before      # nothing overwritten
    monkeypatch.setattr(runner, "build", real_build)

    # a checkpoint saved before checksums existed: a truncated file is still named, without a traceback
    (ckpt / "checkpoint.json").unlink()
    with pytest.raises(ValueError, match=r"stage_0/adapter.safetensors: unreadable checkpoint"):
        runner.run_experiment(make(resume=True))
    adapter.write_bytes(intact)                                             # and an intact one resumes
    assert runner.run_experiment(make(resume=True))["complete"]


def test_a_results_file_missing_a_key_is_one_line(tiny_data, tmp_path, monkeypatch, caplog):
    make = lambda **kw: config(tiny_data, tmp_path / "run", method="seqlora", tasks=["alpha", "beta"], **kw)  # noqa: E731
    saved = _cut_after_first_stage(monkeypatch, make())
    del saved["config"]
    (tmp_path / "run" / "results.json").write_text(json.dumps(saved))
    code = main(["run", "--method", "seqlora", "--data", str(tiny_data), "--tasks", "alpha,beta", "--resume",
                 "--output", str(tmp_path / "run")])
    assert code == 2
    _one_line_without_traceback(caplog, "results.json: not an rkif results file, missing config")
    caplog.clear()
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 2
    _one_line_without_traceback(caplog, "missing config", "leave it out of the report")


# -- Ctrl-C ---------------------------------------------------------------------------------------------------------

def test_ctrl_c_stops_with_the_command_that_continues(tiny_data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    args = ["--method", "seqlora", "--data", str(tiny_data), "--tasks", "alpha,beta", "--train-size", "8",
            "--max-length", "32", "--output", str(out)]
    _no_training(monkeypatch, stop_at=1)
    assert main(args) == 130
    message = _one_line_without_traceback(caplog, "interrupted", str(out), "continue with: rkif run")
    assert json.loads((out / "results.json").read_text())["finished_stages"] == 1
    assert not (out / ".lock").exists()
    command = shlex.split(message.split("continue with: ")[1])
    assert command[:2] == ["rkif", "run"] and "--resume" in command
    caplog.clear()
    assert main(command[1:]) == 0                                            # the printed command continues it
    assert json.loads((out / "results.json").read_text())["complete"]


def test_ctrl_c_in_a_grid_prints_the_command_that_continues_it(tiny_data, tmp_path, monkeypatch, caplog):
    from tests.test_bench import TINY_GRID

    (tiny_data / "orders.json").write_text(json.dumps({"1": ["alpha", "beta", "gamma"]}))    # data is checked first
    grid = tmp_path / "tiny.toml"
    grid.write_text(TINY_GRID)

    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_experiment", interrupted)
    args = ["bench", str(grid), "--out", str(tmp_path / "out"), "--data", str(tiny_data)]
    assert main(args) == 130
    _one_line_without_traceback(caplog, "continue with: rkif " + shlex.join(args))
    assert not list((tmp_path / "out").rglob(".lock"))


# -- resume: settings compared after normalising -------------------------------------------------------------------

def test_resume_compares_resolved_paths_and_parsed_options_and_lists_every_difference(tiny_data, tmp_path,
                                                                                      monkeypatch):
    import rkif.methods.ewc as ewc

    monkeypatch.setattr(ewc.EWC, "after_task", lambda self, *a: None)       # no Fisher: bookkeeping only
    monkeypatch.chdir(tmp_path)
    relative = Path(tiny_data).relative_to(tmp_path)

    def make(data=f"{relative}/", **kw):
        settings = dict(tasks=["alpha", "beta", "gamma"], method_options={"ewc_lambda": "0100"})
        return config(data, "run", method="ewc", **{**settings, **kw})

    _cut_after_first_stage(monkeypatch, make())
    with pytest.raises(ValueError) as refused:
        runner.run_experiment(make(resume=True, data=str(tiny_data), epochs=2.0, lr=1e-2,
                                   method_options={"ewc_lambda": "5"}))
    message = str(refused.value)
    for change in ("epochs 1 -> 2.0", "lr 0.005 -> 0.01", "method option ewc_lambda 100.0 -> 5.0"):
        assert change in message, message
    assert "data" not in message.split("(saved -> now)")[1]                  # the same folder, written otherwise
    # the same folder (absolute, no slash) and the same value (100 vs 0100): resumes
    resumed = runner.run_experiment(make(resume=True, data=str(tiny_data), method_options={"ewc_lambda": "100"}))
    assert resumed["complete"]


# -- reports ----------------------------------------------------------------------------------------------------------

def _results(method="seqlora", tasks=("alpha", "beta", "gamma"), finished=3, seen_next=False, order=1) -> dict:
    """A results.json as the runner writes it, with a matrix that tells runs apart."""
    n = len(tasks)
    matrix = [[(0.1 * (i + 1) + 0.05 * j) if j < finished else None for j in range(n)] for i in range(n)]
    if seen_next:
        for i in range(n):
            for j in range(finished):
                if i > j + 1:
                    matrix[i][j] = None
    matrix = [row[:finished] for row in matrix]
    done = finished == n
    return {"method": method, "model": "minilm", "order": order, "tasks": list(tasks),
            "stages": [[t] for t in tasks], "accuracy": matrix, "initial_accuracy": [0.0] * n,
            "op": 0.5 if done else None, "bwt": -0.1 if done else None, "fwt": 0.0 if done else None,
            "finished_stages": finished, "complete": done, "config": {"seed": 42}, "seconds": 60.0}


def _write_run(folder: Path, results: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_a_run_given_tasks_shows_them_where_an_order_would_be(tmp_path):
    """A ``--tasks`` run has no order: the terminal's header, table.md and report.html name its tasks."""
    from rkif.html_report import _run_summary
    from rkif.report import matrix_table

    custom = _results(tasks=("alpha", "beta"), finished=2, order=None)
    assert matrix_table(custom).splitlines()[0] == "### seqlora (minilm, tasks alpha,beta, accuracy %)"
    assert "order 1," in matrix_table(_results())
    table = report([_write_run(tmp_path / "custom", custom), _write_run(tmp_path / "o1", _results())], tmp_path / "r")
    assert "| custom | seqlora | tasks alpha,beta |" in table and "| o1 | seqlora | 1 |" in table
    assert "tasks alpha,beta" in _run_summary(custom) and "None" not in _run_summary(custom)
    assert "order 1" in _run_summary(_results())


def test_report_names_runs_by_folder_and_copes_with_half_finished_and_partial_scope_runs(tmp_path):
    first = _write_run(tmp_path / "a" / "order1-seed42", _results())
    second = _write_run(tmp_path / "b" / "order1-seed42", {**_results(), "op": 0.7})   # same method, order, name
    half = _write_run(tmp_path / "half", _results(finished=1, seen_next=True))        # None in its last column
    other = _write_run(tmp_path / "other", _results(tasks=("alpha", "delta")))         # another task list
    out = tmp_path / "rep"
    table = report([first, second, half, other], out)

    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4 and len(set(rows)) == 4
    assert rows[0].startswith("| a/order1-seed42 |") and rows[1].startswith("| b/order1-seed42 |")
    assert "(1/3 stages)" in rows[2]
    for label in ("a_order1-seed42", "b_order1-seed42", "half", "other"):
        assert (out / f"matrix_{label}.png").stat().st_size > 0
    # one Figure-4 plot per task list, none drawing a task a run lacks
    assert not (out / "final_accuracy.png").exists()
    assert (out / "final_accuracy_1.png").exists() and (out / "final_accuracy_2.png").exists()
    assert "final_accuracy_2.png: other (tasks alpha, delta)" in table


def test_report_without_out_never_writes_into_the_run_folder(tmp_path, monkeypatch, capsys):
    run = _write_run(tmp_path / "runs" / "main", _results())
    (run / "table.md").write_text("the run's own table\n")
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run)]) == 0
    assert (run / "table.md").read_text() == "the run's own table\n"
    assert sorted(p.name for p in run.iterdir()) == ["results.json", "table.md"]
    assert (tmp_path / "reports" / "main" / "table.md").exists()
    assert "written to reports/main" in capsys.readouterr().out


def test_report_out_that_is_a_file_is_one_line(tmp_path, caplog):
    run = _write_run(tmp_path / "run", _results())
    (tmp_path / "taken").write_text("keep")
    assert main(["report", str(run), "--out", str(tmp_path / "taken")]) == 2
    _one_line_without_traceback(caplog, f"--out {tmp_path / 'taken'}: is a file")
    assert (tmp_path / "taken").read_text() == "keep"


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    import os

    from rkif import io

    io.write_json(tmp_path / "r.json", {"a": 1})
    (tmp_path / "plain").write_text("x")
    assert os.stat(tmp_path / "r.json").st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777


def test_a_failed_run_keeps_an_empty_folder_it_did_not_make_behind_dot_dot(tmp_path):
    """``--output new/../kept``: ``kept`` existed (empty) before the run, only ``new`` is the run's."""
    kept = tmp_path / "kept"
    kept.mkdir()
    output = tmp_path / "new" / ".." / "kept"
    with pytest.raises(OSError, match="no model"), io.removed_if_failed_empty(output):
        io.check_output_dir(output)                  # creates new/ on the way, as a run does
        raise OSError("no model")
    assert kept.is_dir()
    assert not (tmp_path / "new").exists()
