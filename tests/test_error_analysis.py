"""benchmarks/error_analysis.py: re-evaluates a finished run exactly and splits its errors by task."""

import pytest

from rkif import runner
from tests.conftest import benchmark_script
from tests.test_runner import config


def test_analysis_reproduces_the_matrix_and_own_labels_never_hurt(tiny_data, tmp_path):
    ea = benchmark_script("error_analysis")
    run_dir = tmp_path / "run"
    res = runner.run_experiment(config(tiny_data, run_dir, method="seqlora"))
    out = ea.analyse(run_dir)
    assert list(out["tasks"]) == ["alpha", "beta", "gamma"]
    for i, row in enumerate(out["tasks"].values()):
        assert row["accuracy"] == pytest.approx(res["accuracy"][i][-1])     # the final checkpoint, reloaded
        assert row["task_space"] >= row["accuracy"] and 0.0 <= row["cross_task"] <= 1.0
        if row["cross_task"] == 0.0:             # no foreign answers: restricting the labels changes nothing
            assert row["task_space"] == row["accuracy"]
        assert sum(row["cross_task_into"].values()) == round(row["n"] * (1 - row["accuracy"]) * row["cross_task"])
    assert "| seqlora |" in ea.table([out])


def test_analysis_refuses_an_unfinished_run(tiny_data, tmp_path):
    ea = benchmark_script("error_analysis")
    run_dir = tmp_path / "run"
    runner.run_experiment(config(tiny_data, run_dir, method="seqlora"))
    results = run_dir / "results.json"
    results.write_text(results.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(ValueError, match="not finished"):
        ea.analyse(run_dir)
