"""The method interface: a plain object whose hooks the runner and the Trainer call at named moments.

Every hook is a documented no-op, so a method overrides only the moments it needs:

=========================  =====================================================================
``peft_config`` (class)     the adapter to attach (default: the backbone's LoRA)
``stages(tasks)``           how the sequence is trained: one stage per task (default) or fewer
``before_task``             before a stage trains; returns the training examples (replay mixes here)
``on_train_begin``          Trainer built, optimizer ready (``trainer.optimizer``)
``extra_loss``              added to the task loss in ``ContinualTrainer.compute_loss``
``on_pre_optimizer_step``   gradients accumulated, clipped and unscaled; weights not yet stepped
``on_optimizer_step``       weights stepped, gradients still present
``on_step_end``             after the scheduler step and ``zero_grad``
``on_train_end``            training of the stage is over
``after_task``              after training, before evaluation (memory, Fisher, snapshots)
``state_dict``              what resuming after this stage needs (tensors + JSON meta)
=========================  =====================================================================

``parameter_access`` (class) says where the method can run (checked by ``rkif.sharding`` before the
first step): ``"loss"`` (data and loss only), ``"shards"`` (correct on FSDP2's local shards) or
``"whole"`` (the default: whole parameters on every process, so not under FSDP or DeepSpeed).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from rkif.data import Example, ReplayMemory, Task

if TYPE_CHECKING:
    from transformers import Trainer

    from rkif.backbones import Backbone, BackboneConfig
    from rkif.config import RunConfig


@dataclass
class MethodConfig:
    """Options shared by every method (none); subclasses add their own fields."""


def parse_options(config_cls: type, options: dict[str, Any]) -> Any:
    """Build a method config from ``{field: value}``, converting strings to the field's type."""
    known = {f.name: f for f in fields(config_cls)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {config_cls.__name__}; known: {sorted(known)}")
    values = {}
    for key, value in options.items():
        default = getattr(config_cls(), key)
        if isinstance(value, str) and not isinstance(default, str):
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"option {key}: expected a boolean, got {value!r}")
                value = value.lower() in ("true", "1", "yes")
            else:
                kind = type(default) if default is not None else float
                try:
                    value = kind(value)
                except ValueError as err:
                    raise ValueError(f"option {key}: expected {kind.__name__}, got {value!r}") from err
        values[key] = value
    return config_cls(**values)


def check_choices(method: str, config: Any, choices: dict[str, tuple]) -> None:
    """Refuse a string option outside its allowed values, naming the method and the option."""
    for field_name, allowed in choices.items():
        value = getattr(config, field_name)
        if value not in allowed:
            raise ValueError(f"{method} option {field_name}={value!r}: choose from {tuple(allowed)}")


class Method:
    """Base class of every continual-learning method (see the module docstring for the hooks)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = MethodConfig
    parameter_access: ClassVar[str] = "whole"     # "loss" | "shards" | "whole": rkif.sharding.check_distribution

    def __init__(self, config: MethodConfig, backbone: Backbone, run: RunConfig):
        self.config = config
        self.backbone = backbone
        self.run = run

    @classmethod
    def peft_config(cls, config: MethodConfig, backbone: BackboneConfig):
        """The adapter this method trains: None means the backbone's LoRA (r, alpha, targets)."""
        return None

    # -- runner hooks ---------------------------------------------------------------------------
    def stages(self, tasks: list[Task]) -> list[list[Task]]:
        return [[t] for t in tasks]

    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        return train

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        pass

    # -- trainer hooks --------------------------------------------------------------------------
    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        return {}

    def on_train_begin(self, trainer: Trainer) -> None:
        pass

    def on_pre_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def on_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass

    # -- state and reporting --------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (saved as safetensors) and JSON-able meta needed to resume after a stage."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass

    def diagnostics(self) -> dict:
        """JSON-able per-run diagnostics written into results.json (empty by default)."""
        return {}


class MemoryMethod(Method):
    """A method with a replay memory of every finished task (class-balanced, ``run.memory_fraction``)."""

    def __init__(self, config: MethodConfig, backbone: Backbone, run: RunConfig):
        super().__init__(config, backbone, run)
        self.memory = ReplayMemory(run.memory_fraction, run.seed)

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        for task in tasks:
            self.memory.add(task.name, task.split("train"))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {"memory": self.memory.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.memory.load_state_dict(meta["memory"])
