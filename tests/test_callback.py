"""The public API: Recurrent-KIF as a callback of a stock Trainer (the same result as the runner),
the README's example as written, and ``rkif.run`` equal to ``rkif run``."""

import re
from pathlib import Path

import pytest
import torch
from transformers import Trainer

import rkif
from rkif import cli
from rkif.data import Example, ReplayMemory, Task
from rkif.methods import resolve
from rkif.methods.base import parse_options
from rkif.training import training_arguments
from tests.conftest import ToyBackbone, toy_examples, train_sequence
from tests.test_backbones import tiny_llama
from tests.test_rkif_method import OUTER_LR, _run_config, _tasks

OPTIONS = {"inner_steps": 3, "outer_steps": 2, "outer_lr": OUTER_LR}


def through_runner(backbone, tasks, run, workdir):
    """The runner's path: learn_stage (ContinualTrainer, before_task/after_task, ReplayMemory)."""
    cls, opts = resolve("rkif", OPTIONS)
    method = cls(parse_options(cls.config_class, opts), backbone, run)
    train_sequence(backbone, method, run, tasks, workdir)
    return method.diagnostics()["rounds"]


def through_callback(model, collate, tasks, run, workdir):
    """A user's loop: one stock Trainer per task, the callback attached, the finished task's sample
    added to the memory (the sample the runner keeps: ReplayMemory with the run's fraction and seed)."""
    kif = rkif.RecurrentKIFCallback(seed=run.seed, **OPTIONS)
    keep = ReplayMemory(run.memory_fraction, run.seed)
    for j, task in enumerate(tasks):
        trainer = Trainer(model=model, args=training_arguments(run, j, str(workdir)),
                          train_dataset=task.split("train"), data_collator=collate)
        kif.attach(trainer)
        trainer.train()
        kif.add_to_memory(keep.add(task.name, task.split("train")))
    return kif.diagnostics()["rounds"]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_callback_in_a_stock_trainer_equals_the_runner_exactly(tmp_path):
    run = _run_config()
    ours = ToyBackbone(seed=0)
    rounds_cb = through_callback(ours, ours.collate, _tasks(), run, tmp_path / "cb")
    theirs = ToyBackbone(seed=0)
    rounds_runner = through_runner(theirs, _tasks(), run, tmp_path / "runner")
    assert [r["step"] for r in rounds_cb] == [3, 6, 9, 10]                # task 2 only: 3 rounds + the partial
    assert rounds_cb == rounds_runner                                     # same masks, weights, overlaps
    a, b = _params(ours), _params(theirs)
    assert all(torch.equal(a[n], b[n]) for n in b)                       # bit for bit


def _llama_tasks() -> list[Task]:
    def task(name, labels, n=16):
        return Task(name, {"train": [Example(name, f"Item {i} of {name}.\nAnswer:", labels[i % len(labels)],
                                             f"Choose {' or '.join(labels)}.\n") for i in range(n)]})
    return [task("A", ["good", "bad"]), task("B", ["red", "blue"])]


def test_callback_on_a_users_peft_model_equals_the_runner(tmp_path):
    """The user's model is the bare PeftModel (LoRA, dropout 0.05) in a stock Trainer, collated by the
    same function; the runner trains the same weights wrapped in its CausalBackbone. The same seeds
    give the same dropout masks and memory draws; the Trainer hands the PeftModel the label-token
    count (sum / count) where the backbone takes the mean, which is the same division."""
    run = _run_config(batch_size=4, epochs=2, lr=1e-2, memory_fraction=0.5)
    ours, theirs = tiny_llama(), tiny_llama()
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))
    rounds_cb = through_callback(ours.model, ours.collate, _llama_tasks(), run, tmp_path / "cb")
    rounds_runner = through_runner(theirs, _llama_tasks(), run, tmp_path / "runner")
    assert [r["step"] for r in rounds_cb] == [3, 6, 8] and rounds_cb == rounds_runner
    a, b = _params(ours.model), _params(theirs.model)
    assert any(not torch.equal(a[n], p) for n, p in _params(tiny_llama().model).items())     # it trained
    assert all(torch.equal(a[n], b[n]) for n in b)                                           # bit for bit


def _trainer(model, data, tmp_path, **kw) -> Trainer:
    run = _run_config(**kw)
    return Trainer(model=model, args=training_arguments(run, 0, str(tmp_path)), train_dataset=data,
                   data_collator=model.collate)


def test_a_memory_of_collated_batches_draws_whole_batches(tmp_path):
    toy = ToyBackbone(seed=0)
    batches = [toy.collate(toy_examples("old", 4, seed)) for seed in range(3)]
    drawn = []
    kif = rkif.RecurrentKIFCallback(batches, batched=True, **OPTIONS)
    kif.model_view.collate = lambda items: drawn.append(items) or items[0]
    trainer = _trainer(toy, toy_examples("new", 16, 9), tmp_path)
    kif.attach(trainer)
    trainer.train()
    assert len(kif.diagnostics()["rounds"]) == 4
    assert len(drawn) == 4 * 2 and all(len(d) == 1 and any(d[0] is b for b in batches) for d in drawn)


class _Examples(torch.utils.data.Dataset):
    """A user's map-style dataset (len and [i], no iteration)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_first_task_without_memory_trains_plainly_and_the_second_fuses(tmp_path):
    toy = ToyBackbone(seed=0)
    kif = rkif.RecurrentKIFCallback(**OPTIONS)
    for j in range(2):
        trainer = _trainer(toy, toy_examples(f"t{j}", 16, j), tmp_path / str(j))
        kif.attach(trainer)
        trainer.train()
        kif.add_to_memory(_Examples(toy_examples(f"t{j}", 16, j)[:4]))
    assert {r["stage"] for r in kif.diagnostics()["rounds"]} == {1}
    assert kif.memory.examples() == toy_examples("t0", 16, 0)[:4] + toy_examples("t1", 16, 1)[:4]


def test_bad_use_is_refused_before_training(tmp_path):
    toy = ToyBackbone(seed=0)
    with pytest.raises(ValueError, match="memory item 1: expected a collated batch"):
        rkif.RecurrentKIFCallback([toy.collate(toy_examples("a", 2, 0)), "text"], batched=True)
    with pytest.raises(ValueError, match="takes neither outer_batch_size"):
        rkif.RecurrentKIFCallback(batched=True, outer_batch_size=4)
    with pytest.raises(ValueError, match="not Recurrent-KIF"):
        rkif.RecurrentKIFCallback(preset="replay")
    with pytest.raises(ValueError, match="unknown option"):
        rkif.RecurrentKIFCallback(inner_step=3)
    unattached = _trainer(toy, toy_examples("a", 8, 0), tmp_path, epochs=1)
    unattached.add_callback(rkif.RecurrentKIFCallback())
    with pytest.raises(RuntimeError, match="attach"):
        unattached.train()
    kif = rkif.RecurrentKIFCallback([{"not": "an example"}])
    trainer = _trainer(toy, toy_examples("a", 8, 0), tmp_path, epochs=1)
    kif.attach(trainer)
    with pytest.raises(ValueError, match="memory item 0: the collate function cannot collate it"):
        trainer.train()
    assert trainer.state.global_step == 0


def readme_example() -> str:
    """The first python block of the README section on the callback."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Recurrent-KIF in your own Trainer", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 21
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)                # noqa: S102 (our own README)
    rounds = scope["kif"].diagnostics()["rounds"]
    assert rounds and {r["stage"] for r in rounds} == {1}           # the second task fused, the first did not


@pytest.mark.parametrize("argv, settings", [
    ([], {}),
    (["--model", "smollm2"], {"model": "smollm2"}),
    (["--model", "smollm2", "--epochs", "3", "--output", "x"], {"model": "smollm2", "epochs": 3, "output": "x"}),
    (["--benchmark", "superni", "--model", "smollm2"], {"benchmark": "superni", "model": "smollm2"}),
    (["--method", "rkif-die", "-O", "inner_steps=4", "--tasks", "a,b", "--max-steps", "5", "--lora-targets",
      "q,v", "--no-group-by-length", "--resume", "--seed", "3", "--data", "d"],
     {"method": "rkif-die", "method_options": {"inner_steps": "4"}, "tasks": ["a", "b"], "max_steps": 5,
      "lora_targets": "q,v", "group_by_length": False, "resume": True, "seed": 3, "data": "d"}),
])
def test_python_entry_point_runs_what_the_command_runs(monkeypatch, argv, settings):
    class Started(Exception):
        pass

    def start(config):
        raise Started(config)

    monkeypatch.setattr(cli, "run_and_report", start)
    with pytest.raises(Started) as command:
        cli.main(["run", *argv])
    with pytest.raises(Started) as python:
        rkif.run(**settings)
    assert python.value.args[0] == command.value.args[0]


def test_every_run_option_is_a_setting_of_the_python_entry_point():
    run_parser = cli.build_parser().get_default("run_parser")
    dests = {a.dest for a in run_parser._actions} - {"help", "option", "debug", "verbose"}  # -O: method_options
    config = cli.settings_config()
    assert dests <= set(config.__dataclass_fields__) | set(config.backbone.__dataclass_fields__)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['max_step'\]"):
        rkif.run(max_step=3)
