"""Every setting is checked before work starts: one line naming the setting, its value and what is allowed;
``rkif run`` and ``rkif bench`` exit 2 without a traceback, load no model and create no output folder."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from rkif import runner
from rkif.bench import load_grid
from rkif.cli import build_parser, config_from_args, main, parse_args
from rkif.config import RunConfig
from tests.conftest import BENCHMARKS


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Loading a model fails the test; the working folder (where ``--output ''`` would write) starts empty."""
    def refuse(*args, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "build_backbone", refuse)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def refused(argv: list[str], out: Path, cwd: Path, caplog) -> str:
    """``rkif ARGV`` exits 2 with one error line and no traceback, creating neither ``out`` nor anything in
    ``cwd``; returns the line."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in caplog.text
    assert not out.exists() and not any(cwd.iterdir())
    return errors[0]


def run_refused(extra: list[str], data: Path, tmp_path: Path, cwd: Path, caplog) -> str:
    out = tmp_path / "out"
    tasks = [] if {"--tasks", "--order"} & set(extra) else ["--tasks", "alpha,beta"]
    argv = ["run", "--data", str(data), *tasks, "--output", str(out), *extra]
    return refused(argv, out, cwd, caplog)


@pytest.mark.parametrize("option, value, shown", [
    ("--epochs", "0", "0"), ("--epochs", "inf", "inf"), ("--max-steps", "0", "0"), ("--train-size", "0", "'all'"),
    ("--train-size", "-5", "-5"), ("--test-size", "0", "0"), ("--eval-batch-size", "0", "0"),
    ("--batch-size", "0", "0"), ("--grad-accum", "0", "0"), ("--max-length", "0", "0"),
    ("--max-target-length", "0", "0"), ("--lr", "nan", "nan"), ("--lr", "0", "0"), ("--warmup-steps", "-1", "-1"),
    ("--lora-r", "0", "0"), ("--lora-alpha", "0", "0"), ("--lora-dropout", "1.5", "1.5"),
    ("--memory-fraction", "0", "0"), ("--memory-fraction", "2", "2"), ("--seed", "-1", "-1"),
    ("--output", "", "''"), ("--data", "", "''"), ("--tasks", "", "''"), ("--tasks", "alpha,,beta", "alpha,,beta"),
    ("--tasks", "alpha,alpha", "alpha,alpha"), ("--lora-targets", "", "''"), ("--order", "4", "4"),
    ("--report-to", "carrier-pigeon", "carrier-pigeon"),
])
def test_an_option_out_of_range_is_refused_naming_it(tiny_data, tmp_path, no_work, caplog, option, value, shown):
    line = run_refused([option, value], tiny_data, tmp_path, no_work, caplog)
    assert line.startswith(option + " ") and shown in line and ("expected" in line or "choose from" in line)


def test_size_all_asks_for_every_example_and_zero_is_not_all():
    args = parse_args(build_parser(), ["run", "--train-size", "all", "--test-size", "ALL"])
    assert config_from_args(args).train_size is None and config_from_args(args).test_size is None
    with pytest.raises(ValueError, match="--train-size 0: .*'all' for every one"):
        config_from_args(parse_args(build_parser(), ["run", "--train-size", "0"])).check()


@pytest.mark.parametrize("extra, words", [
    (["--max-length", "600"], "--max-length 600: --model minilm embeds at most 512"),     # the model's limit
    (["--answer-mode", "rank"], "--answer-mode 'rank': applies to the causal family only"),
    (["--prompt-format", "chat"], "--prompt-format 'chat': applies to the causal family only"),
    (["--family", "causal"], "--family 'causal': --model minilm is encoder"),
    (["-O", "outer_batch_size=3"], "rkif option outer_batch_size=3: expected a multiple of the number of processes"),
])
def test_options_inconsistent_with_each_other_are_refused(tiny_data, tmp_path, no_work, caplog, monkeypatch,
                                                          extra, words):
    monkeypatch.setenv("WORLD_SIZE", "2")                    # as torchrun sets it for two processes
    assert words in run_refused(extra, tiny_data, tmp_path, no_work, caplog)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="fp16 is refused only without an accelerator")
def test_fp16_without_an_accelerator_is_refused_up_front(tiny_data, tmp_path, no_work, caplog):
    assert "--precision fp16 needs a GPU" in run_refused(["--precision", "fp16"], tiny_data, tmp_path, no_work, caplog)


@pytest.mark.parametrize("method, option, words", [
    ("rkif", "inner_steps=0", "rkif option inner_steps=0: expected an integer >= 1"),
    ("rkif", "outer_steps=0", "rkif option outer_steps=0: expected an integer >= 1"),
    ("rkif", "outer_batch_size=0", "rkif option outer_batch_size=0: expected an integer >= 1"),
    ("rkif", "top_fraction=0", "rkif option top_fraction=0.0: expected a fraction in (0, 1]"),
    ("rkif", "top_fraction=1.5", "rkif option top_fraction=1.5"),
    ("rkif", "alpha_in=5", "rkif option alpha_in=5.0: expected a number in [0, 1)"),
    ("rkif", "alpha_out=-0.1", "rkif option alpha_out=-0.1"),
    ("rkif", "outer_lr=0", "rkif option outer_lr=0.0"),
    ("rkif", "inner_steps=1.5", "rkif option inner_steps='1.5': expected an integer"),
    ("rkif", "share=maybe", "rkif option share='maybe': expected true or false"),
    ("rkif", "fusion=magic", "rkif option fusion='magic': choose from mask"),
    ("rkif-ki", "smoothing=magic", "rkif option smoothing='magic'"),
    ("rkif", "inner_step=3", "unknown option(s) ['inner_step']"),
    ("rkif-release", "alpha_in=0.6", "rkif option alpha_in=0.6: used only with smoothing=ema"),
    ("rkif", "adaptive_temperature=2", "rkif option adaptive_temperature=2.0: used only with fusion=adaptive"),
    ("tasl", "tau=0.5", "tasl option tau=0.5: used only with rule=soft"),
    ("ewc", "gamma=-1", "ewc option gamma=-1.0"),
    ("ewc", "ewc_lambda=-1", "ewc option ewc_lambda=-1.0"),
    ("vrmcl", "r=1", "vrmcl option r=1.0: expected 0 <= r < 1"),
    ("vrmcl", "inner_lr=0", "vrmcl option inner_lr=0.0"),
    ("tasl", "top_percent=0", "tasl option top_percent=0.0"),
    ("tasl", "beta1=1", "tasl option beta1=1.0"),
    ("osf", "first_fraction=1", "osf option first_fraction=1.0"),
    ("migu", "threshold=2", "migu option threshold=2.0"),
    ("olora", "lambda1=-1", "olora option lambda1=-1.0"),
    ("rkif", "inner_steps", "--option 'inner_steps': expected KEY=VALUE"),
])
def test_a_bad_method_option_is_refused_naming_it(tiny_data, tmp_path, no_work, caplog, method, option, words):
    assert words in run_refused(["--method", method, "-O", option], tiny_data, tmp_path, no_work, caplog)


def test_an_option_given_twice_is_refused(tiny_data, tmp_path, no_work, caplog):
    line = run_refused(["-O", "inner_steps=2", "-O", "inner_steps=3"], tiny_data, tmp_path, no_work, caplog)
    assert "--option inner_steps: given twice ('2' and '3')" in line


def test_method_options_from_text_and_toml_take_the_fields_types():
    from rkif.methods import parse_options
    from rkif.methods.rkif import RKIFConfig

    cfg = parse_options(RKIFConfig, {"outer_lr": "none", "alpha_in": 0, "inner_steps": "02", "share": "no"})
    assert cfg.outer_lr is None and cfg.alpha_in == 0.0 and isinstance(cfg.alpha_in, float)
    assert cfg.inner_steps == 2 and cfg.share is False
    with pytest.raises(ValueError, match=re.escape("rkif option inner_steps=2.0: expected an integer")):
        parse_options(RKIFConfig, {"inner_steps": 2.0})                         # a TOML float for an int
    with pytest.raises(ValueError, match="rkif option top_fraction=1.5"):
        RKIFConfig(top_fraction=1.5)                                             # built directly, checked too


def _corrupt(data: Path, how: str) -> str:
    """Damage the tiny data in one way; return what the message must name."""
    train = data / "long_sequence" / "train"
    if how == "empty output":
        recs = json.loads((train / "beta.json").read_text())
        recs[3]["output"] = " "
        (train / "beta.json").write_text(json.dumps(recs))
        return f"{train / 'beta.json'}: record 3 (id ?) has an empty 'output'"
    if how == "json and jsonl":
        (train / "alpha.jsonl").write_text('{"input": "x", "output": "yes"}\n')
        return f"both {train / 'alpha.json'} and {train / 'alpha.jsonl'} exist"
    if how == "no dev split":
        return "task 'alpha': no dev split"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["empty output", "json and jsonl", "no dev split"])
def test_a_data_file_problem_is_refused_naming_the_file(tiny_data, tmp_path, no_work, caplog, how):
    words = _corrupt(tiny_data, how)
    extra = ["--eval-split", "dev"] if how == "no dev split" else []
    assert words in run_refused(extra, tiny_data, tmp_path, no_work, caplog)


def test_an_order_file_with_a_bad_order_is_refused(tiny_data, tmp_path, no_work, caplog):
    (tiny_data / "orders.json").write_text(json.dumps({"1": "alpha", "2": ["beta"]}))
    out = tmp_path / "out"
    line = refused(["run", "--data", str(tiny_data), "--output", str(out)], out, no_work, caplog)
    assert "orders.json: order 1 must be a non-empty list of task names, got 'alpha'" in line


GRID = """name = "g"
methods = ["seqlora", "rkif"]
orders = [1]
seeds = [7]
[run]
train_size = 8
"""


@pytest.mark.parametrize("old, new, words", [
    ("orders = [1]", "orders = [7]", "orders [7]: the standard benchmark has orders [1, 2, 3]"),
    ('name = "g"', 'name = "g"\nbenchmark = "huge"', "benchmark 'huge': choose from standard, long"),
    ('name = "g"', 'name = ""', "'name' must be a non-empty string"),
    ("seeds = [7]", "seeds = [-1]", "--seed -1"),
    ("train_size = 8", "train_size = 0", "--train-size 0"),
    ("[run]", '[run]\nepochs = "1"', "[run] epochs = '1': expected a finite number"),
    ("[run]", "[run]\ngrad_accum = 0", "run seqlora order 1 seed 7: --grad-accum 0: expected an integer >= 1"),
    ("[run]", '[run]\neval_scope = "seen"', "--eval-scope 'seen': choose from all, seen+next"),
    ("[run]", '[run]\nlr_scheduler = "reduce_lr_on_plateau"', "--lr-scheduler 'reduce_lr_on_plateau'"),
    ("[run]", '[backbone]\nmax_length = "128"\n[run]', "[backbone] max_length = '128': expected an integer"),
    ("[run]", "[backbone]\nmax_length = 1024\n[run]", "--max-length 1024: --model minilm embeds at most 512"),
    ("[run]", "[method_options.rkif]\ninner_steps = 1.5\n[run]", "rkif option inner_steps=1.5: expected an integer"),
    ("[run]", "[method_options.rkif]\ntop_fraction = 0\n[run]", "rkif option top_fraction=0.0"),
])
def test_a_bad_grid_is_refused_before_any_run(tiny_data, tmp_path, no_work, caplog, old, new, words):
    path = tmp_path / "grid.toml"
    path.write_text(GRID.replace(old, new, 1))
    out = tmp_path / "out"
    line = refused(["bench", str(path), "--out", str(out), "--data", str(tiny_data)], out, no_work, caplog)
    assert line.startswith(str(path)) and words in line


@pytest.mark.parametrize("how", ["empty output", "json and jsonl"])
def test_bench_refuses_bad_data_before_the_first_run(tiny_data, tmp_path, no_work, caplog, how):
    (tiny_data / "orders.json").write_text(json.dumps({"1": ["alpha", "beta", "gamma"]}))
    words = _corrupt(tiny_data, how)
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    out = tmp_path / "out"
    line = refused(["bench", str(path), "--out", str(out), "--data", str(tiny_data)], out, no_work, caplog)
    assert line.startswith(f"{path}: run seqlora order 1 seed 7: ") and words in line


def test_all_in_a_grid_asks_for_every_example(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(GRID.replace("train_size = 8", 'train_size = "all"\ntest_size = "all"'))
    assert load_grid(path)["run"] == {"train_size": None, "test_size": None}


@pytest.mark.parametrize("grid", sorted(BENCHMARKS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_grid_passes_the_checks(grid):
    load_grid(grid)                                            # every run of it is checked


def test_the_defaults_pass_the_checks():
    RunConfig().check()
