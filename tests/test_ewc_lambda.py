"""benchmarks/ewc_lambda.py: the choice rule and extending a finished selection without retraining."""

import importlib.util
from pathlib import Path

import pytest

from rkif import io

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ewc_lambda.py"


@pytest.fixture(scope="module")
def sel():
    spec = importlib.util.spec_from_file_location("ewc_lambda", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_choose_takes_the_best_op_smaller_lambda_on_ties_and_never_zero(sel):
    assert sel.choose({"0": {"op": 0.9}, "1": {"op": 0.5}, "10": {"op": 0.6}, "100": {"op": 0.6}}) == 10.0
    with pytest.raises(ValueError, match="no lambda > 0"):
        sel.choose({"0": {"op": 0.9}})


def test_earlier_results_are_reused_only_with_the_same_settings(sel, tmp_path):
    path = tmp_path / "sel.json"
    settings = {"order": 1, "train_size": 500, "lambdas": "1,10", "out": str(path)}
    assert sel.reusable_results(path, settings) == {}
    io.write_json(path, {"settings": settings, "results": {"1": {"op": 0.5}, "10": {"op": 0.4}}})
    assert sel.reusable_results(path, {**settings, "lambdas": "0,0.1"}) == {"1": {"op": 0.5}, "10": {"op": 0.4}}
    assert sel.reusable_results(path, {**settings, "train_size": 400}) == {}
