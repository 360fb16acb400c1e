"""benchmarks/heldout_select.py: the choice rule and extending a finished selection without retraining."""

import pytest

from rkif import io
from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def sel():
    return benchmark_script("heldout_select")


def test_choose_takes_the_best_op_smaller_value_on_ties_and_never_a_reference(sel):
    results = {"0": {"op": 0.9}, "1": {"op": 0.5}, "10": {"op": 0.6}, "100": {"op": 0.6}}
    assert sel.choose(results, {"0"}) == 10.0
    assert sel.choose(results) == 0.0
    with pytest.raises(ValueError, match="nothing to choose"):
        sel.choose({"0": {"op": 0.9}}, {"0"})


def test_earlier_results_are_reused_only_with_the_same_settings(sel, tmp_path):
    path = tmp_path / "sel.json"
    settings = {"method": "ewc", "option": "ewc_lambda", "order": 1, "train_size": 500, "values": "1,10",
                "out": str(path)}
    assert sel.reusable_results(path, settings) == {}
    io.write_json(path, {"settings": settings, "results": {"1": {"op": 0.5}, "10": {"op": 0.4}}})
    assert sel.reusable_results(path, {**settings, "values": "0,0.1"}) == {"1": {"op": 0.5}, "10": {"op": 0.4}}
    assert sel.reusable_results(path, {**settings, "train_size": 400}) == {}
    assert sel.reusable_results(path, {**settings, "method": "osf"}) == {}


def test_split_keeps_the_sample_order_and_holds_out_the_tail(sel):
    from rkif.data import Example, Task

    train = [Example("t", f"x{i}", "a") for i in range(10)]
    (task,) = sel.split_train([Task("t", {"train": train})], 0.2)
    assert task.split("train") == train[:8] and task.split(sel.HELD_OUT) == train[8:]
    with pytest.raises(ValueError, match="task t: 1 training examples"):
        sel.split_train([Task("t", {"train": train[:1]})], 0.2)


def test_a_value_is_trained_through_the_method_stages_as_the_runner_does(sel, tiny_data, tmp_path):
    """OSF must see stages() before its first task (a crash found in a real selection)."""
    from rkif.backbones import BackboneConfig
    from rkif.config import RunConfig
    from rkif.data import load_benchmark

    full = load_benchmark(tiny_data, ["alpha", "beta"], None, None, "test", 7)
    tasks = sel.split_train(full, 0.25)
    run = RunConfig(method="osf", method_options={"lr": 1e-4}, backbone=BackboneConfig(max_length=32),
                    data=str(tiny_data), tasks=["alpha", "beta"], epochs=1, batch_size=8, seed=7)
    matrix, initial = sel.run_value(run, tasks, full, str(tmp_path), "lr=1e-4")
    assert len(initial) == 2 and all(0.0 <= a <= 1.0 for a in initial)
    assert len(matrix) == 2 and all(len(row) == 2 and all(0.0 <= a <= 1.0 for a in row) for row in matrix)


def test_choosing_words_combinations_and_run_settings(sel):
    from rkif.config import RunConfig

    results = {"raw:0.002": {"op": 0.6}, "chat:0.002": {"op": 0.6}, "raw:0.001": {"op": 0.5}}
    assert sel.choose(results) == "raw:0.002"                   # a tie between words: the first listed
    assert sel.choose({"1": {"op": 0.5}, "0.1": {"op": 0.5}}) == 0.1
    assert sel.value_key("raw:2e-3") == "raw:0.002" and sel.value_key("1e-3") == "0.001"
    run = sel.with_option(RunConfig(), "lr", "2e-3", {})
    run = sel.with_option(run, "prompt_format", "chat", {})
    run = sel.with_option(run, "ewc_lambda", "10", {})
    assert run.lr == 2e-3 and run.backbone.prompt_format == "chat" and run.method_options == {"ewc_lambda": 10.0}


def test_earlier_selections_and_partial_results_are_reused(sel, tmp_path):
    from rkif import io

    old = {"method": "osf", "option": "lr", "values": "1e-05", "model": "minilm", "family": "encoder", "lr": 0.001}
    path = tmp_path / "osf_lr.json"
    io.write_json(path, {"settings": old, "results": {"1e-05": {"op": 0.5}}})       # saved before the new settings
    now = {**old, **sel.LATER_SETTINGS, "values": "1e-05,0.001"}
    assert sel.reusable_results(path, now) == {"1e-05": {"op": 0.5}}
    io.write_json(path.with_suffix(".partial.json"), {"settings": now, "results": {"0.001": {"op": 0.4}}})
    assert set(sel.reusable_results(path, now)) == {"1e-05", "0.001"}
    assert sel.reusable_results(path, {**now, "precision": "bf16"}) == {}
