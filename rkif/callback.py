"""Recurrent-KIF in your own ``transformers.Trainer``, with your own (peft) model::

    kif = RecurrentKIFCallback(memory=earlier_examples, inner_steps=8, outer_steps=4)
    for task in tasks:                          # one Trainer and one train() per task, as `rkif run`
        trainer = Trainer(model=peft_model, args=args, train_dataset=task, data_collator=collate)
        kif.attach(trainer)                     # the task begins with train() and ends when it returns
        trainer.train()
        kif.add_to_memory(sample_of(task))      # the finished task joins the memory

The callback is the runner's ``MethodCallback`` around the runner's own ``RecurrentKIF`` object (no
second implementation): it supplies what the runner would, namely the trainable parameters of the
Trainer's model, the memory and how to collate it, and the task's index (the runner's stage,
which seeds the memory draws).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from transformers import Trainer

from rkif.backbones.base import named_trainable
from rkif.config import RunConfig
from rkif.methods import parse_options, resolve
from rkif.methods.rkif import RecurrentKIF
from rkif.training import MethodCallback


class _TrainerModel:
    """What ``RecurrentKIF`` reads from a backbone, here from the Trainer's model: its trainable
    parameters and the collate function of the memory."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.collate_fn: Callable[[list], Mapping[str, torch.Tensor]] | None = None

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(named_trainable(self.model))

    def collate(self, items: list) -> Mapping[str, torch.Tensor]:
        return self.collate_fn(items)


def _one_batch(items: list[Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
    """A memory of collated batches: each process takes one whole batch per outer step."""
    (batch,) = items
    return batch


class _Memory:
    """The memory as ``RecurrentKIF`` reads it (``examples()``, ``len``): examples or collated batches."""

    def __init__(self, batched: bool):
        self.batched = batched
        self.items: list = []

    def add(self, items: Iterable) -> None:
        if isinstance(items, Mapping):
            raise ValueError("add_to_memory: expected a sequence of examples or batches, got one dict")
        items = [items[i] for i in range(len(items))] if hasattr(items, "__getitem__") else list(items)
        for i, item in enumerate(items):
            if self.batched and not (isinstance(item, Mapping) and item
                                     and all(isinstance(v, torch.Tensor) for v in item.values())):
                raise ValueError(f"memory item {i}: expected a collated batch (a dict of tensors), got "
                                 f"{type(item).__name__}; for examples, build the callback with batched=False")
        self.items.extend(items)

    def examples(self) -> list:
        return self.items

    def __len__(self) -> int:
        return len(self.items)


class RecurrentKIFCallback(MethodCallback):
    """Recurrent-KIF (``rkif/methods/rkif.py``) as a callback of a stock ``transformers.Trainer``.

    Args:
        memory: examples of earlier tasks, of what ``collate_fn`` takes: a list, a torch ``Dataset``
            (anything with ``len`` and ``[i]``) or an iterable; with ``batched=True``, collated
            batches (dicts of tensors).
        collate_fn: turns a list of memory examples into a batch; default: the Trainer's ``data_collator``.
        batched: the memory holds collated batches; each process draws one per outer step (so
            ``outer_batch_size`` does not apply).
        seed: seeds the memory draws (as ``rkif run --seed``: the same seed and data give the same run).
        preset: ``"rkif"`` or one of its presets (``rkif methods``), e.g. ``"rkif-release"``.
        **options: ``RKIFConfig`` fields, e.g. ``inner_steps=8, outer_steps=4, top_fraction=0.2``.

    Task boundaries: each ``trainer.train()`` is one task (anchor, importance and outer optimizer
    start afresh in ``on_train_begin``; the last partial round is fused in ``on_train_end``). A task
    trained while the memory is empty trains plainly. Call ``add_to_memory`` after a task, with the
    examples of it to keep. The outer loop runs on the Trainer's model, accelerator and device, so
    gradient accumulation, mixed precision and DDP work as in ``rkif run``. ``trainer.log`` receives
    each round's diagnostics; ``diagnostics()`` returns them all.
    """

    def __init__(self, memory: Iterable = (), *, collate_fn: Callable | None = None, batched: bool = False,
                 seed: int = 42, preset: str = "rkif", **options: Any):
        cls, opts = resolve(preset, options)
        if cls is not RecurrentKIF:
            raise ValueError(f"preset {preset!r} is not Recurrent-KIF; choose rkif or one of its presets")
        if batched and ("outer_batch_size" in options or collate_fn is not None):
            raise ValueError("a memory of collated batches (batched=True) takes neither outer_batch_size "
                             "nor collate_fn: each process draws one whole batch per outer step")
        self.collate_fn = collate_fn
        self.model_view = _TrainerModel()
        self.memory = _Memory(batched)
        self.task = 0                                   # index of the next task (the runner's stage)
        super().__init__(cls(parse_options(cls.config_class, opts), self.model_view, RunConfig(seed=seed)))
        self.method.memory = self.memory                # the method draws from examples() and len()
        self.add_to_memory(memory)

    def attach(self, trainer: Trainer) -> Trainer:
        """Follow ``trainer`` (the next task's Trainer): add this callback to it and train its model."""
        self.model_view.model = trainer.model
        self.model_view.collate_fn = _one_batch if self.memory.batched else self.collate_fn or trainer.data_collator
        if self.memory.batched:
            self.method.config.outer_batch_size = trainer.args.world_size    # one batch per process
        return super().attach(trainer)

    def add_to_memory(self, examples: Iterable) -> None:
        """Add examples (or, ``batched=True``, collated batches) of a finished task to the memory."""
        if self.method.active:
            raise RuntimeError("add_to_memory while a task trains: call it after trainer.train() returns")
        self.memory.add(examples)

    def diagnostics(self) -> dict:
        """Every fusion round so far (stage = task index, step, mask regions, weights) and the seconds spent."""
        return self.method.diagnostics()

    def on_train_begin(self, args, state, control, **kw):
        self.check_attached(state)
        self.method.before_task(self.task, [], [])      # the task index seeds this task's memory draws
        if len(self.memory) and not self.memory.batched:
            try:
                self.model_view.collate(self.memory.examples()[:1])
            except Exception as err:                     # before any training step, not at the first round
                raise ValueError(f"memory item 0: the collate function cannot collate it ({err})") from err
        super().on_train_begin(args, state, control, **kw)

    def on_train_end(self, args, state, control, **kw):
        super().on_train_end(args, state, control, **kw)
        self.task += 1
