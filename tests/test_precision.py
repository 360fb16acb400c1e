"""Precision resolution (auto -> bf16 only where native), autocast in evaluation, length-grouped training batches."""

import pytest
import torch

from rkif import precision
from rkif.config import RunConfig
from rkif.methods import resolve
from rkif.methods.base import parse_options
from rkif.training import ContinualTrainer, training_arguments
from tests.test_backbones import tiny_llama
from tests.test_causal import EXAMPLES


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_takes_bf16_only_where_the_hardware_has_it(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: native)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"              # explicit: honoured (warned if emulated)


def test_bad_precisions_are_refused():
    with pytest.raises(ValueError, match="choose from"):
        precision.resolve_precision("int8", "cpu")
    with pytest.raises(ValueError, match="needs a GPU"):
        precision.resolve_precision("fp16", "cpu")


def test_autocast_context():
    a = torch.randn(4, 4)
    with precision.autocast("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert (a @ a).dtype == torch.float32


def test_evaluation_runs_under_the_run_precision(monkeypatch):
    from rkif.data import Task
    from rkif.runner import evaluate

    backbone = tiny_llama()
    seen = []
    monkeypatch.setattr(backbone, "predict_batch",
                        lambda exs: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                                else None) or [ex.output for ex in exs])
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: True)
    task = Task("t", {"test": EXAMPLES})
    assert evaluate(backbone, [task], "test", "eval", precision="auto") == [1.0]
    assert evaluate(backbone, [task], "test", "eval", precision="fp32") == [1.0]
    assert seen[0] == torch.bfloat16 and seen[-1] is None


def test_group_by_length_batches_examples_of_similar_token_length(tmp_path):
    backbone = tiny_llama()
    data = EXAMPLES * 8                                                  # 56 examples, 7 lengths
    cls, opts = resolve("seqlora")
    method = cls(parse_options(cls.config_class, opts), backbone, RunConfig())

    def batches(group: bool) -> list[list[int]]:
        run = RunConfig(batch_size=4, group_by_length=group)
        trainer = ContinualTrainer(model=backbone, args=training_arguments(run, 0, str(tmp_path)),
                                   train_dataset=data, data_collator=backbone.collate, method=method)
        order = list(trainer._get_train_sampler())
        return [[backbone.example_length(data[i]) for i in order[k:k + 4]] for k in range(0, len(order), 4)]

    spread = lambda bs: sum(max(b) - min(b) for b in bs)  # noqa: E731
    grouped, random = batches(True), batches(False)
    assert sorted(n for b in grouped for n in b) == sorted(n for b in random for n in b)   # same examples
    assert spread(grouped) < spread(random) / 2
