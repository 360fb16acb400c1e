"""The command line a new user meets: a bare ``rkif`` and ``--version`` (at once), ``rkif run --help``,
``--resume`` with only ``--output``, a model name that is nowhere, and dependency log lines printed once."""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import rkif
from rkif import cli, runner

ROOT = Path(__file__).resolve().parents[1]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- no command, --version ----------------------------------------------------------------------------------------

def test_bare_rkif_prints_the_help_and_starts_nothing(monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_and_report", lambda config: pytest.fail("a bare `rkif` started a run"))
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rkif") and all(command in err for command in ("run", "report", "bench", "methods"))


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"rkif {metadata.version('rkif')}"


HEAVY = ("torch", "transformers", "peft", "accelerate", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["bench", "--help"]])
def test_help_and_version_import_no_heavy_dependency(argv):
    """``rkif --help`` answers at once: the parser is built from torch-free modules, so the help, the version
    and an argument error load none of torch, transformers, peft, accelerate or matplotlib."""
    script = ("import sys\nfrom rkif.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = _rkif(*argv, script=script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# -- rkif run --help -----------------------------------------------------------------------------------------------

def _run_help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main(["run", *argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())          # unwrapped


def test_run_help_describes_every_option_with_its_default(capsys):
    text = _run_help(capsys)
    run_parser = cli.build_parser().get_default("run_parser")
    for action in run_parser._actions:
        assert action.help, f"{action.option_strings}: no help"
        switch = isinstance(action, argparse.BooleanOptionalAction)      # a store_true flag's False is no default
        if action.dest != "help" and action.default not in (None, []) and (action.default is not False or switch):
            assert f"(default: {action.default})" in text, action.option_strings
    for expected in ("--train-size TRAIN_SIZE training examples per task", "(default: 500)", "(default: 300)",
                     "(default: runs/main)", "as a fraction of its training examples", "(default: 0.02)"):
        assert expected in text, expected
    assert "default: None" not in text and "default: []" not in text
    assert re.search(r"--eval-split .*dev overlaps test, so never tune on it", text)


def test_run_help_shows_the_defaults_the_model_implies(capsys):
    text = _run_help(capsys, "--model", "smollm2")
    assert "(default: runs/smollm2)" in text and "(default: 160)" in text


# -- --resume takes what is not given from the saved run ----------------------------------------------------------

def _interrupted_run(tiny_data, out, monkeypatch) -> None:
    """An EWC run with -O ewc_lambda=5 and non-default sizes, Ctrl-C in its second task (training a no-op)."""
    import rkif.methods.ewc as ewc

    monkeypatch.setattr(ewc.EWC, "after_task", lambda self, *a: None)       # no Fisher: bookkeeping only
    calls = []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {}

    monkeypatch.setattr(runner, "train_stage", train)
    assert cli.main(["run", "--method", "ewc", "-O", "ewc_lambda=5", "--data", str(tiny_data), "--tasks",
                     "alpha,beta", "--train-size", "all", "--test-size", "all", "--max-length", "32",
                     "--eval-batch-size", "4", "--output", str(out)]) == 130
    monkeypatch.setattr(runner, "train_stage", lambda *a, **k: {})


def test_resume_needs_only_the_output_folder(tiny_data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    _interrupted_run(tiny_data, out, monkeypatch)

    # options given that differ from the saved run are still refused, naming each
    caplog.clear()
    assert cli.main(["run", "--output", str(out), "--resume", "--epochs", "2", "-O", "ewc_lambda=6"]) == 2
    [error] = _errors(caplog)
    assert "settings differ" in error and "epochs 1.0 -> 2.0" in error and "ewc_lambda 5.0 -> 6.0" in error

    # the rest comes from results.json; options given at the saved values are fine
    assert cli.main(["run", "--output", str(out), "--resume", "--max-length", "32", "-O", "ewc_lambda=5"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["finished_stages"] == 2
    assert results["config"]["method"] == "ewc" and results["config"]["method_options"] == {"ewc_lambda": "5"}
    assert results["config"]["backbone"]["eval_batch_size"] == 4 and results["config"]["train_size"] is None

    # the Python entry point too: a finished run is returned again
    assert rkif.run(output=str(out), resume=True)["complete"]
    with pytest.raises(ValueError, match=r"settings differ.*lr 0.001 -> 0.01"):
        rkif.run(output=str(out), resume=True, lr=1e-2)


def test_given_settings_are_what_the_command_line_names():
    assert cli.given_settings([]) == set()
    assert cli.given_settings(["--output", "x", "--resume", "--epochs", "1", "-O", "a=1", "--no-group-by-length",
                               "--debug"]) == {"output", "resume", "epochs", "method_options", "group_by_length"}


# -- a model that is nowhere; dependency log lines once ------------------------------------------------------------

def _rkif(*argv: str, env: dict | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [sys.executable, "-c", script, *argv] if script else [sys.executable, "-m", "rkif", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


NOT_FOUND = ("model 'nosuch-model' not found locally and not downloadable from the hub "
             "(offline: HF_HUB_OFFLINE is set)")


def test_a_model_that_is_nowhere_is_one_line(tiny_data, tmp_path):
    done = _rkif("run", "--model", "nosuch-model", "--data", str(tiny_data), "--tasks", "alpha",
                 "--output", str(tmp_path / "out"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].endswith(f"rkif: {NOT_FOUND}; --model takes a model folder, a .gguf file, minilm, smollm2 or "
                             "a hub name")
    assert not (tmp_path / "out").exists()


def test_a_model_that_is_nowhere_is_one_line_when_loaded_too(tiny_data, tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)          # no network in tests
    assert cli.main(["run", "--model", "nosuch-model", "--family", "encoder", "--data", str(tiny_data),
                     "--tasks", "alpha", "--output", str(tmp_path / "out")]) == 2
    [error] = _errors(caplog)
    assert error.startswith(NOT_FOUND)


LIBRARY_LINES = """
import logging, sys
from rkif import cli

def noisy(config):
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
    raise OSError("no model")

cli._run = noisy
sys.exit(cli.main(sys.argv[1:]))
"""


def test_dependency_log_lines_print_once(tmp_path):
    done = _rkif("run", "--verbose", "--output", str(tmp_path / "out"), script=LIBRARY_LINES, env={"CI": "1"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2
    assert len(lines) == 3 and len(set(lines)) == 3, done.stderr
    assert lines[0].endswith("huggingface_hub.utils._http: Retrying in 1s [Retry 1/5].")
    assert lines[1].endswith("transformers.modeling_utils: a transformers warning")
    assert lines[2].endswith("rkif: no model")


def test_resume_of_an_older_results_file_takes_the_defaults_of_its_time(tmp_path):
    """A setting missing from an older rkif's results.json was at RunConfig's default then (the runner's rule for
    a new setting), not at the defaults the --model given now implies: `make run-smollm2` passes --model smollm2
    with --resume, and its eval_scope / eval_batch_size (smollm2: seen+next, 16) must not be refused as changed."""
    from rkif.config import RunConfig

    out = tmp_path / "old"
    config = cli.settings_config(model="smollm2", method="seqlora", output=str(out)).to_dict()
    del config["eval_scope"], config["backbone"]["eval_batch_size"]            # not recorded by the older rkif
    results = {"method": "seqlora", "model": "smollm2", "order": 1, "tasks": [], "stages": [], "accuracy": [],
               "initial_accuracy": [], "op": None, "bwt": None, "fwt": None, "finished_stages": 0,
               "complete": False, "config": config}
    out.mkdir()
    (out / "results.json").write_text(json.dumps(results))

    args = cli.parse_args(cli.build_parser(), ["run", "--model", "smollm2", "--output", str(out), "--resume"])
    resumed = cli.resumed(cli.config_from_args(args), args.given)
    assert (resumed.eval_scope, resumed.backbone.eval_batch_size) == (RunConfig.eval_scope, 64)
    assert resumed.lr == config["lr"] and resumed.backbone.max_length == config["backbone"]["max_length"]
    runner._check_resumable(resumed, results, out / "results.json")             # the runner agrees: no refusal


def test_resume_without_a_saved_run_says_it_starts_a_new_one(tiny_data, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runner, "train_stage", lambda *a, **k: {"steps": 0, "train_loss": 0.0})
    out = tmp_path / "typo"
    with caplog.at_level(logging.INFO):
        assert cli.main(["run", "--data", str(tiny_data), "--tasks", "alpha", "--train-size", "all", "--test-size",
                         "all", "--max-length", "32", "--output", str(out), "--resume"]) == 0
    said = [r for r in caplog.records if "--resume: no" in r.getMessage() and "starts a new run" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO      # `make run`'s first run: news, not a warning
