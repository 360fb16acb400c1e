"""A method of your own, outside the package: ``--user-module FILE.py`` (or a dotted module) on ``rkif run``,
``bench`` and ``methods``, recorded in results.json so a resume imports it again; ``examples/my_method.py``
end to end."""

import json
import logging
import sys
import traceback
from pathlib import Path

import pytest

from rkif import runner
from rkif.bench import grid_runs, load_grid
from rkif.cli import main
from rkif.config import RunConfig
from rkif.methods import METHODS, PRESETS, registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "my_method.py"


@pytest.fixture(autouse=True)
def forget_user_modules():
    """Each test starts and ends with the package's own methods only (as a fresh process)."""
    state = dict(METHODS), dict(PRESETS), dict(registry._USER_FILES), set(registry._USER_NAMES), set(sys.modules)

    def forget():
        for saved, now in zip(state[:4], (METHODS, PRESETS, registry._USER_FILES, registry._USER_NAMES)):
            now.clear()
            now.update(saved)
        for name in set(sys.modules) - state[4]:
            del sys.modules[name]

    forget()
    yield forget
    forget()


def _one_error(caplog) -> str:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    assert "\n" not in errors[0].getMessage()
    return errors[0].getMessage()


def test_the_example_method_runs_end_to_end_through_the_cli_and_resumes(tiny_data, tmp_path, forget_user_modules,
                                                                         monkeypatch):
    out = tmp_path / "mine"
    code = main(["run", "--user-module", str(EXAMPLE), "--method", "replay-l2", "-O", "l2_weight=0.5",
                 "--data", str(tiny_data), "--tasks", "alpha,beta", "--train-size", "all", "--test-size", "all",
                 "--max-steps", "4", "--batch-size", "4", "--max-length", "32", "--output", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["method"] == "replay-l2"
    assert results["config"]["user_modules"] == [str(EXAMPLE)]
    assert results["method_config"] == {"l2_weight": 0.5}
    records = [json.loads(line) for line in (out / "trainer" / "log.jsonl").read_text().splitlines()]
    pulls = {(r["stage_index"], r["tasks"]): r["l2_pull"] for r in records if "l2_pull" in r}
    assert set(pulls) == {(0, "alpha"), (1, "beta")}             # its extra_loss ran in both stages
    assert all(p > 0 for p in pulls.values())                    # the weights left their start: a real pull

    forget_user_modules()                                        # as a new process: replay-l2 unknown
    assert "replay-l2" not in METHODS
    again = runner.run_experiment(RunConfig.from_dict({**results["config"], "resume": True}))
    assert again["complete"] and "replay-l2" in METHODS          # imported again from the recorded config

    monkeypatch.chdir(REPO)                                      # the same file by a relative path: the same run
    assert main(["run", "--user-module", "examples/my_method.py", "--method", "replay-l2", "-O", "l2_weight=0.5",
                 "--data", str(tiny_data), "--tasks", "alpha,beta", "--train-size", "all", "--test-size", "all",
                 "--max-steps", "4", "--batch-size", "4", "--max-length", "32", "--output", str(out),
                 "--resume"]) == 0


def test_the_example_refuses_a_bad_option_naming_it(tmp_path, caplog):
    code = main(["run", "--user-module", str(EXAMPLE), "--method", "replay-l2", "-O", "l2_weight=-1",
                 "--tasks", "alpha", "--output", str(tmp_path / "out")])
    assert code == 2
    assert "replay-l2 option l2_weight=-1.0: expected a number >= 0" in _one_error(caplog)
    assert not (tmp_path / "out").exists()


BUGGY = """
from dataclasses import dataclass
from typing import ClassVar

from rkif.methods import MethodConfig, register
from rkif.methods.replay import Replay


@dataclass
class BuggyConfig(MethodConfig):
    method: ClassVar[str] = "buggy"

    def check(self) -> None:
        super().check()
        {check}


@register
class Buggy(Replay):
    name = "buggy"
    config_class = BuggyConfig
"""


def test_an_error_from_a_user_modules_own_code_shows_its_traceback(tmp_path, caplog):
    """rkif's own checks stay one line; a bug in the user's code (here a KeyError, which rkif's checks also
    raise) shows the traceback down to the user's line, which its author needs."""
    module = tmp_path / "buggy_methods.py"
    module.write_text(BUGGY.format(check='{}["missing_setting"]   # the bug: a KeyError in the user\'s own code'))
    code = main(["run", "--user-module", str(module), "--method", "buggy", "--tasks", "alpha",
                 "--output", str(tmp_path / "out")])
    assert code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].getMessage() == "missing_setting"
    assert errors[0].exc_info is not None
    frames = traceback.extract_tb(errors[0].exc_info[2])
    assert frames[-1].filename == str(module) and "missing_setting" in frames[-1].line
    assert registry.raised_in_user_module(errors[0].exc_info[1])


def test_a_user_modules_refusal_through_fail_stays_one_line(tmp_path, caplog):
    module = tmp_path / "strict_methods.py"
    module.write_text("from rkif.checks import fail\n" + BUGGY.format(
        check='raise fail("buggy option mode=", "x", "choose a or b")'))
    code = main(["run", "--user-module", str(module), "--method", "buggy", "--tasks", "alpha",
                 "--output", str(tmp_path / "out")])
    assert code == 2 and _one_error(caplog) == "buggy option mode='x': choose a or b"


def test_a_bug_in_a_module_the_users_package_registers_from_shows_its_traceback(tmp_path, monkeypatch, caplog):
    """The method is defined in ``mylab.impl`` and registered by ``mylab.methods`` (the module given); a bug
    re-raised by rkif as another error (``raise ... from``) still counts as the user's."""
    package = tmp_path / "mylab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "impl.py").write_text(BUGGY.replace("@register\n", "").format(check='{}["in_impl"]'))
    (package / "methods.py").write_text("from rkif.methods import register\nfrom mylab.impl import Buggy\n\n"
                                        "register(Buggy)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["run", "--user-module", "mylab.methods", "--method", "buggy", "--tasks", "alpha",
                 "--output", str(tmp_path / "out")])
    assert code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    try:
        registry.METHODS["buggy"].config_class()
    except KeyError as bug:
        try:
            raise ValueError("rkif's one-line summary") from bug
        except ValueError as wrapped:
            assert registry.raised_in_user_module(wrapped)


@pytest.mark.parametrize("spec, words", [("{tmp}/nope.py", "no such file"),
                                         ("{tmp}", "not a file"),
                                         ("no_such_package.methods", "No module named 'no_such_package'")])
def test_a_missing_user_module_is_one_line_naming_it_before_the_output_folder(tiny_data, tmp_path, caplog, spec,
                                                                                words):
    spec = spec.format(tmp=tmp_path)
    code = main(["run", "--user-module", spec, "--method", "replay-l2", "--data", str(tiny_data), "--tasks", "alpha",
                 "--output", str(tmp_path / "out")])
    assert code == 2
    message = _one_error(caplog)
    assert message.startswith(f"--user-module {spec}: ") and words in message
    assert not (tmp_path / "out").exists()


def test_a_dotted_module_adds_its_method_to_rkif_methods(tmp_path, monkeypatch, capsys):
    package = tmp_path / "my_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "frozen.py").write_text(
        '"""Frozen: trains nothing new (a test method)."""\n'
        "from rkif.methods import Method, register\n\n\n"
        "@register\nclass Frozen(Method):\n    name = 'frozen-test'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["methods", "--user-module", "my_methods.frozen"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("frozen-test")]
    assert len(listed) == 1 and "Frozen: trains nothing new" in listed[0]


def test_an_unknown_method_points_to_user_module(tmp_path, caplog):
    assert main(["run", "--method", "replay-l2", "--tasks", "alpha", "--output", str(tmp_path / "out")]) == 2
    assert "unknown method 'replay-l2'" in _one_error(caplog) and "--user-module" in caplog.text


GRID = """
name = "mine"
orders = [1]
methods = ["replay-l2"]
{modules}
[method_options.replay-l2]
l2_weight = 0.3
"""


def test_a_grid_imports_its_user_modules_and_records_them_in_each_run(tmp_path, forget_user_modules):
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(modules=f"user_modules = [{json.dumps(str(EXAMPLE))}]"))
    runs = grid_runs(load_grid(path), tmp_path / "out")
    assert [r.user_modules for r in runs] == [[str(EXAMPLE)]]
    assert runs[0].method_config()[1].l2_weight == 0.3

    forget_user_modules()                                    # the option instead of the key (rkif bench --user-module)
    path.write_text(GRID.format(modules=""))
    with pytest.raises(ValueError, match="unknown method 'replay-l2'"):
        load_grid(path)
    assert [r.user_modules for r in grid_runs(load_grid(path, [str(EXAMPLE)]), tmp_path / "out")] == [[str(EXAMPLE)]]
    forget_user_modules()
    assert main(["bench", str(path), "--report", "--out", str(tmp_path / "out"), "--user-module", str(EXAMPLE)]) == 0
    assert json.loads((tmp_path / "out" / "grid.json").read_text())["user_modules"] == [str(EXAMPLE)]

    path.write_text(GRID.format(modules='user_modules = ["nope.py"]'))
    with pytest.raises(ValueError, match=rf"{path}: --user-module nope.py: no such file"):
        load_grid(path)


def test_a_resume_refuses_another_user_module(tmp_path):
    """The recorded modules are settings of the run: resuming with others is refused (a file compared resolved)."""
    registry.import_user_module(str(EXAMPLE))
    saved = {"config": RunConfig(method="replay-l2", user_modules=[str(EXAMPLE)]).to_dict()}
    other = tmp_path / "other.py"
    other.write_text("")
    run = RunConfig(method="replay-l2", user_modules=[str(EXAMPLE), str(other)])
    with pytest.raises(ValueError, match=r"cannot resume, settings differ .*user_modules"):
        runner._check_resumable(run, saved, tmp_path / "results.json")


def test_a_file_already_imported_under_its_own_name_is_not_imported_again(tmp_path, monkeypatch):
    """``import mine`` in a script, then ``rkif.run(user_modules=["mine.py"])`` (so results.json names it), or the
    same file as a dotted module and as a path: its methods are registered once, not refused as duplicates."""
    (tmp_path / "mine.py").write_text("from rkif.methods import Method, register\n\n\n"
                                      "@register\nclass Mine(Method):\n    name = 'mine-test'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mine

    assert registry.import_user_module(str(tmp_path / "mine.py")) is mine
    assert registry.import_user_module("mine") is mine
    assert METHODS["mine-test"] is mine.Mine

    (tmp_path / "other.py").write_text(
        "from rkif.methods import Method, register\n\n\n@register\nclass Other(Method):\n    name = 'other-test'\n")
    by_path = registry.import_user_module(str(tmp_path / "other.py"))
    assert registry.import_user_module("other") is by_path and METHODS["other-test"] is by_path.Other


def test_a_module_that_failed_to_import_can_be_imported_once_fixed(tmp_path):
    """A file that fails half-way (after an @register) leaves no registration behind: fixed, it imports (a
    notebook, a script that retries) rather than being refused as a duplicate of its own method."""
    path = tmp_path / "half.py"
    body = "from rkif.methods import Method, register\n\n\n@register\nclass Half(Method):\n    name = 'half-test'\n"
    path.write_text(body + "\nraise RuntimeError('a bug further down')\n")
    with pytest.raises(RuntimeError, match="a bug further down"):
        registry.import_user_module(str(path))
    assert "half-test" not in METHODS
    path.write_text(body)
    assert registry.import_user_module(str(path)).Half is METHODS["half-test"]


def test_rkif_methods_shows_a_default_made_by_a_factory(tmp_path, capsys):
    (tmp_path / "listed.py").write_text(
        "from dataclasses import dataclass, field\n"
        "from rkif.methods import Method, MethodConfig, register\n\n\n"
        "@dataclass\nclass ListedConfig(MethodConfig):\n"
        "    layers: list = field(default_factory=lambda: [0, 1])\n    weight: float = 0.5\n\n\n"
        "@register\nclass Listed(Method):\n    name = 'listed-test'\n    config_class = ListedConfig\n")
    assert main(["methods", "--user-module", str(tmp_path / "listed.py")]) == 0
    out = capsys.readouterr().out
    assert "-O layers=[0, 1] weight=0.5" in out and "MISSING" not in out


def test_a_user_methods_families_are_checked_listed_and_validated(tmp_path, capsys):
    from rkif.config import RunConfig

    (tmp_path / "causal_only.py").write_text(
        "from rkif.methods import Method, register\n\n\n"
        "@register\nclass CausalOnly(Method):\n    name = 'causal-only-test'\n    families = ('causal',)\n")
    with pytest.raises(ValueError, match="method causal-only-test cannot run on the encoder family: it needs a "
                                         "causal backbone"):
        RunConfig(method="causal-only-test", user_modules=[str(tmp_path / "causal_only.py")]).check()
    assert main(["methods", "--user-module", str(tmp_path / "causal_only.py")]) == 0
    assert "needs a causal backbone" in capsys.readouterr().out
    for bad in ("causal", ("casual",), ()):                   # a string, a typo, nothing
        with pytest.raises(ValueError, match=r"method bad-test: families=.*expected None or a non-empty tuple"):
            registry.register(type("Bad", (registry.Method,), {"name": "bad-test", "families": bad}))
    assert "bad-test" not in METHODS
