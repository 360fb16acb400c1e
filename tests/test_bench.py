"""``rkif bench``: grid files, the runs of a grid, a tiny grid end to end (resumable), the grid table."""

import json
import os
import re
from pathlib import Path

import pytest

from rkif import runner
from rkif.backbones import BackboneConfig
from rkif.bench import bench, grid_runs, load_grid
from rkif.cli import main
from rkif.report import grid_table, summary_table

TINY_GRID = """
name = "tiny"
benchmark = "standard"
orders = [1]
seeds = [7]
methods = ["seqlora", "replay"]
[run]
train_size = 8
test_size = 4
epochs = 1.0
batch_size = 8
lr = 5e-3
memory_fraction = 0.25
[backbone]
max_length = 32
[method_options.replay]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, fault", [
    ('name = "g"\nmethods = ["seqlora"]\norders = [1]\nmethds = ["x"]\n', "methds"),
    ('name = "g"\norders = [1]\n', "'methods'"),
    ('name = "g"\nmethods = ["seqlora"]\norders = [1]\n[run]\ntrain_size = 5\nlearning_rate = 1.0\n', "learning_rate"),
    ('name = "g"\nmethods = ["seqlora"]\norders = [1]\n[backbone]\nlora_rank = 4\n', "lora_rank"),
    ('name = "g"\nmethods = ["seqlora"\n', "cannot read grid"),
])
def test_load_grid_errors_name_the_file_and_the_key(tmp_path, text, fault):
    path = write(tmp_path / "grid.toml", text)
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        load_grid(path)
    assert fault in str(err.value)
    if fault == "learning_rate":
        assert "[run]" in str(err.value) and "train_size" not in str(err.value)


def test_load_grid_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope.toml"))):
        load_grid(tmp_path / "nope.toml")


def test_grid_runs_is_methods_x_orders_x_seeds_with_folders_and_options(tmp_path):
    grid = {"name": "g", "methods": ["seqlora", "ewc"], "orders": [1, 2], "seeds": [3, 4],
            "run": {"train_size": 5, "data": "/grid/data"}, "backbone": {"max_length": 16},
            "method_options": {"ewc": {"ewc_lambda": 10.0}}}
    runs = grid_runs(grid, tmp_path)
    assert [(r.method, r.order, r.seed) for r in runs] == [
        (m, o, s) for m in ("seqlora", "ewc") for o in (1, 2) for s in (3, 4)]
    assert [Path(r.output) for r in runs] == [
        tmp_path / "runs" / m / f"order{o}-seed{s}" for m in ("seqlora", "ewc") for o in (1, 2) for s in (3, 4)]
    assert all(r.method_options == ({"ewc_lambda": 10.0} if r.method == "ewc" else {}) for r in runs)
    assert all(r.resume and r.train_size == 5 and r.benchmark == "standard" and r.data == "/grid/data"
               for r in runs)
    assert all(r.backbone == BackboneConfig(max_length=16) for r in runs)
    assert len({id(r.backbone) for r in runs}) == len(runs) and len({id(r.method_options) for r in runs}) == len(runs)
    overridden = grid_runs({**grid, "seeds": [3], "benchmark": "long"}, tmp_path, data="/cli/data")
    assert len(overridden) == 4 and all(r.data == "/cli/data" and r.benchmark == "long" for r in overridden)
    assert [r.seed for r in grid_runs({k: v for k, v in grid.items() if k != "seeds"}, tmp_path)] == [42] * 4


def _result(method, order, op, bwt, fwt, seconds, seed=42):
    return {"method": method, "order": order, "op": op, "bwt": bwt, "fwt": fwt, "seconds": seconds,
            "stage_log": [{"train_seconds": seconds / 4}, {"train_seconds": seconds / 4}], "config": {"seed": seed}}


def _row(table: str, method: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_grid_table_mean_and_sample_std_with_the_paper_columns():
    results = [_result("seqlora", o, op, bwt, None, s)
               for o, op, bwt, s in ((1, 0.4, -0.1, 60), (2, 0.5, -0.2, 120), (3, 0.6, -0.3, 180))]
    results += [_result("rkif-die", 4, 0.45, -0.05, 0.01, 30), _result("mine", 1, 0.7, None, None, 6)]
    table = grid_table(results, "standard")
    assert len(table.splitlines()) == 2 + 3                                  # header, rule, one row per method
    assert "paper OP" in table.splitlines()[0]
    # sample std (n - 1): 40, 50, 60 -> 10.0 (the population std would be 8.2)
    assert _row(table, "seqlora") == ["seqlora", "3 (1,2,3)", "50.0 ± 10.0", "-20.0 ± 10.0", "-", "-", "1.0 / 2.0",
                                      "43.7", "-50.4", "-"]
    assert _row(table, "rkif-die") == ["rkif-die", "1 (4)", "45.0", "-5.0", "-", "1.0", "0.2 / 0.5", "-", "-",
                                       "74.8 / -4.8"]
    assert _row(table, "mine") == ["mine", "1 (1)", "70.0", "-", "-", "-", "0.1 / 0.1", "-", "-", "-"]
    long = grid_table([_result("seqlora", 4, 0.1, -0.7, 0.0, 60), _result("rkif", 4, 0.8, -0.03, 0.0, 60)], "long")
    assert _row(long, "seqlora")[7:9] == ["11.6", "-73.4"] and _row(long, "rkif")[7:] == ["77.8", "-3.6", "77.9 / -3.4"]
    assert _row(grid_table(results[:1], "custom"), "seqlora")[7:9] == ["-", "-"]


def test_grid_table_and_run_table_round_one_value_alike():
    # OP 0.6375 is 63.74999999999999 once multiplied by 100: both tables must print the exact value's 63.8
    run = {**_result("rkif", 3, 0.6375, -0.06, 0.35, 60), "complete": True}
    assert _row(grid_table([run], "standard"), "rkif")[2] == "63.8"
    assert "| 63.8 |" in summary_table([run])


@pytest.fixture
def tiny_root(tiny_data) -> Path:
    """The tiny tasks as a benchmark: order 1 of the standard benchmark is alpha -> beta -> gamma."""
    (tiny_data / "orders.json").write_text(json.dumps({"1": ["alpha", "beta", "gamma"]}))
    return tiny_data


def test_tiny_grid_runs_end_to_end_and_a_second_call_skips_finished_runs(tiny_root, tmp_path, monkeypatch, capsys):
    config = write(tmp_path / "tiny.toml", TINY_GRID)
    out = tmp_path / "results"
    table, failed = bench(config, out, str(tiny_root))
    assert not failed and "Failed" not in table
    for method in ("seqlora", "replay"):
        res = json.loads((out / "runs" / method / "order1-seed7" / "results.json").read_text())
        assert res["complete"] and res["tasks"] == ["alpha", "beta", "gamma"] and res["config"]["seed"] == 7
        assert res["config"]["data"] == str(tiny_root) and res["config"]["backbone"]["max_length"] == 32
        assert (out / "plots" / f"matrix_{method}_order1_seed7.png").stat().st_size > 0
    assert (out / "plots" / "final_accuracy_order1.png").stat().st_size > 0
    written = (out / "table.md").read_text()
    assert written.strip() == table.strip() and len(table.splitlines()) == 4
    assert _row(table, "seqlora")[1] == "1 (1)" and _row(table, "replay")[7:9] == ["68.8", "-11.7"]
    assert json.loads((out / "grid.json").read_text())["config_file"] == str(config)

    def must_not_run(run):
        raise AssertionError(f"finished run {run.output} was run again")

    monkeypatch.setattr(runner, "run_experiment", must_not_run)
    assert bench(config, out, str(tiny_root)) == (table, [])
    assert main(["bench", str(config), "--out", str(out), "--data", str(tiny_root)]) == 0   # the CLI subcommand
    assert "| replay |" in capsys.readouterr().out


def test_a_failing_run_is_reported_and_the_grid_goes_on(tiny_root, tmp_path, caplog, monkeypatch):
    config = write(tmp_path / "two.toml", TINY_GRID)
    real = runner.run_experiment

    def fail_replay(run):
        if run.method == "replay":
            raise RuntimeError("boom")
        return real(run)

    monkeypatch.setattr(runner, "run_experiment", fail_replay)
    table, failed = bench(config, tmp_path / "out", str(tiny_root))
    assert failed == [str(tmp_path / "out" / "runs" / "replay" / "order1-seed7")]
    assert "Failed runs" in table and "| seqlora |" in table and "boom" in caplog.text
    assert main(["bench", str(config), "--out", str(tmp_path / "out"), "--data", str(tiny_root)]) == 1


@pytest.mark.parametrize("text, fault", [
    ('methods = ["magic"]\norders = [1]\n', "magic"),
    ('methods = "seqlora"\norders = [1]\n', "methods"),
    ('methods = ["seqlora"]\norders = 1\n', "orders"),
    ('methods = ["seqlora"]\norders = [1]\nrun = 5\n', "[run]"),
    ('methods = ["seqlora"]\norders = [1]\n[run]\nseed = 1\n', "seed"),
    ('methods = ["rkif"]\norders = [1]\n[method_options.rkif]\ninner_step = 3\n', "inner_step"),
    ('methods = ["rkif"]\norders = [1]\n[method_options.ewcc]\newc_lambda = 3\n', "ewcc"),
])
def test_load_grid_checks_values_up_front(tmp_path, text, fault):
    path = write(tmp_path / "grid.toml", 'name = "g"\n' + text)
    with pytest.raises(ValueError, match=re.escape(fault)) as err:
        load_grid(path)
    assert str(path) in str(err.value)


def test_cli_bench_rejects_a_bad_grid_naming_it(tmp_path, caplog):
    path = write(tmp_path / "grid.toml", 'name = "g"\nmethods = ["seqlora"]\norders = [1]\ncolour = "red"\n')
    assert main(["bench", str(path)]) == 2
    assert str(path) in caplog.text and "colour" in caplog.text


def test_report_only_runs_nothing_and_counts_what_is_left(tiny_root, tmp_path, monkeypatch):
    config = write(tmp_path / "tiny.toml", TINY_GRID)

    def must_not_run(run):
        raise AssertionError("report-only ran an experiment")

    monkeypatch.setattr(runner, "run_experiment", must_not_run)
    table, failed = bench(config, tmp_path / "out", str(tiny_root), report_only=True)
    assert not failed and "0 of 2 runs finished" in table and (tmp_path / "out" / "table.md").exists()


def test_methods_orders_and_seeds_subsets_run_only_those_and_reject_strangers(tiny_root, tmp_path, monkeypatch, caplog,
                                                                              capsys):
    config = write(tmp_path / "tiny.toml", TINY_GRID)
    ran = []
    monkeypatch.setattr(runner, "run_experiment", lambda run: ran.append(run.method))
    table, failed = bench(config, tmp_path / "out", str(tiny_root), methods=["replay"])
    assert ran == ["replay"] and not failed and "0 of 2 runs finished" in table
    with pytest.raises(ValueError, match=r"\['ewc'\] are not in the grid"):
        bench(config, tmp_path / "out", str(tiny_root), methods=["replay", "ewc"])
    assert main(["bench", str(config), "--out", str(tmp_path / "out"), "--methods", "seqlora,magic"]) == 2
    assert "magic" in caplog.text and ran == ["replay"]
    with pytest.raises(ValueError, match=r"order\(s\) \[2\] are not in the grid"):
        bench(config, tmp_path / "out", str(tiny_root), orders=[2])
    bench(config, tmp_path / "out", str(tiny_root), orders=[1])
    assert ran == ["replay", "seqlora", "replay"]
    with pytest.raises(ValueError, match=r"seed\(s\) \[8\] are not in the grid; it has \[7\]"):
        bench(config, tmp_path / "out", str(tiny_root), seeds=[8])
    two_seeds = write(tmp_path / "seeds.toml", TINY_GRID.replace("seeds = [7]", "seeds = [7, 8]"))
    monkeypatch.setattr(runner, "run_experiment", lambda run: ran.append((run.method, run.seed)))
    assert main(["bench", str(two_seeds), "--out", str(tmp_path / "out2"), "--data", str(tiny_root),
                 "--seeds", "8"]) == 0
    assert ran[3:] == [("seqlora", 8), ("replay", 8)]
    with pytest.raises(SystemExit) as stop:              # argparse: not a list of whole numbers
        main(["bench", str(two_seeds), "--seeds", "8,x"])
    assert stop.value.code == 2 and "--seeds: '8,x': expected whole numbers" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"method\(s\) \[''\] are not in the grid"):
        bench(config, tmp_path / "out", str(tiny_root), methods=[""])


def test_a_run_locked_by_a_live_process_is_left_and_a_dead_ones_lock_is_taken_over(tiny_root, tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    config = write(tmp_path / "tiny.toml", TINY_GRID)
    out = tmp_path / "out"
    ran = []
    monkeypatch.setattr(runner, "run_experiment", lambda run: ran.append(run.method))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for method, pid in (("seqlora", os.getppid()), ("replay", dead.pid)):   # alive / exited
        lock = out / "runs" / method / "order1-seed7" / ".lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(f"{socket.gethostname()} {pid}")
    bench(config, out, str(tiny_root))
    assert ran == ["replay"]
    assert (out / "runs" / "seqlora" / "order1-seed7" / ".lock").exists()         # not ours: untouched
    assert not (out / "runs" / "replay" / "order1-seed7" / ".lock").exists()      # ours: released
