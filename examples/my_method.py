"""Replay with an L2 pull: LoRAReplay, and the trainable weights pulled towards where the task began.

An example of a method of your own, kept outside the package and loaded with ``--user-module``::

    rkif run --user-module examples/my_method.py --method replay-l2 -O l2_weight=0.1

Hooks (the table is in ``rkif/methods/base.py``): ``before_task`` keeps a copy theta_0 of the trainable
weights, then mixes the replay memory in (as ``replay``); ``extra_loss`` adds
``l2_weight * sum (theta - theta_0)^2`` to the task loss (logged as ``l2_pull`` in
``<output>/trainer/log.jsonl``). ``after_task`` (store a sample of the task) and ``state_dict`` (the
memory, for ``--resume``) are LoRAReplay's; theta_0 needs no saving, ``before_task`` takes it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rkif.checks import NON_NEGATIVE
from rkif.data import Example, Task
from rkif.methods import MethodConfig, register
from rkif.methods.replay import Replay


@dataclass
class ReplayL2Config(MethodConfig):
    """The method's options (``-O l2_weight=0.5``), checked before a model loads."""

    l2_weight: float = 0.1          # weight of the pull towards the weights at the start of the task

    method: ClassVar[str] = "replay-l2"      # how error messages name the option

    def check(self) -> None:
        super().check()                                       # the type of every field
        self.check_ranges({"l2_weight": NON_NEGATIVE})         # its range: one line naming it if not


@register
class ReplayL2(Replay):
    name = "replay-l2"
    config_class = ReplayL2Config
    parameter_access = "whole"      # reads whole parameters, so not under FSDP (rkif.sharding)

    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        self.start = {n: p.detach().clone() for n, p in self.backbone.trainable_parameters().items()}
        return super().before_task(stage, tasks, train)       # the task's examples and the memory

    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        params = self.backbone.trainable_parameters()
        pull = sum(((p - self.start[n]) ** 2).sum() for n, p in params.items())
        return {"l2_pull": self.config.l2_weight * pull}
