"""IncLoRA: a fresh LoRA adapter per task; earlier adapters stay frozen and active, their outputs summed.

The "incremental LoRA" baseline of O-LoRA (Wang et al., "Orthogonal Subspace Learning for Language
Model Continual Learning", Findings of EMNLP 2023), equal to the official O-LoRA code with
lambda1 = lambda2 = 0 (BASELINES.md section 2). Task 0 trains the backbone's ``default`` adapter;
before every later stage k a new adapter ``task_k`` with the same LoRA config (r, alpha, dropout,
targets; A Kaiming-uniform, B = 0) is added. Every adapter is active in the forward pass,
h = W0 x + sum_i (alpha / r) B_i A_i dropout_i(x), and only the newest one has requires_grad, so the
Trainer's per-task optimizer holds only it. No task id is used at inference: all adapters are summed.

Hooks: ``before_task`` (add and activate the stage's adapter, freeze the older ones), ``state_dict`` /
``load_state_dict`` (the adapter names in order; on resume the adapters are recreated before the
runner loads their weights), ``diagnostics`` (the adapter names).

Deviations from the official code: the old adapters are kept as separate peft adapters rather than
concatenated into one wide (r_sum) LoRA pair; the sum is the same, but peft gives every adapter its
own dropout module, so in training the old branches see independent dropout masks where the official
code feeds them the new branch's dropped-out input (identical in eval mode, where dropout is off).
Each adapter keeps the scaling alpha / r of its config, which equals the official common scaling.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft.tuners.lora import LoraLayer

from rkif.data import Example, Task
from rkif.methods.base import Method, MethodConfig
from rkif.methods.registry import register

logger = logging.getLogger(__name__)

BASE_ADAPTER = "default"     # the adapter the backbone is built with (trained on task 0)


@dataclass
class IncLoRAConfig(MethodConfig):
    """IncLoRA has no options: the adapters copy the backbone's LoRA config."""

    method: ClassVar[str] = "inclora"


def adapter_name(stage: int) -> str:
    """The adapter trained in ``stage``: the backbone's own for stage 0, ``task_<stage>`` after."""
    return BASE_ADAPTER if stage == 0 else f"task_{stage}"


@register
class IncLoRA(Method):
    name = "inclora"
    config_class = IncLoRAConfig

    def __init__(self, config: IncLoRAConfig, backbone, run):
        super().__init__(config, backbone, run)
        if BASE_ADAPTER not in getattr(backbone.model, "peft_config", {}):
            raise ValueError(f"{self.name} needs a peft backbone with a {BASE_ADAPTER!r} LoRA adapter")
        self.adapters: list[str] = [BASE_ADAPTER]      # in creation order; the last one is trained

    # -- adapters -------------------------------------------------------------------------------
    @property
    def current(self) -> str:
        """The adapter being trained (the newest)."""
        return self.adapters[-1]

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """Every peft LoRA layer of the backbone, with its module name."""
        for name, module in self.backbone.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def add_adapter(self, name: str) -> None:
        """Add a fresh adapter with the default adapter's config and make it the only trainable one."""
        model = self.backbone.model
        if name in model.peft_config:
            raise ValueError(f"adapter {name!r} already exists")
        # peft places the new weights on the device of each base layer
        model.add_adapter(name, copy.deepcopy(model.peft_config[BASE_ADAPTER]))
        self.adapters.append(name)
        self.activate()
        logger.info("%s: added adapter %s (%d adapters active)", self.name, name, len(self.adapters))

    def activate(self) -> None:
        """All adapters in the forward pass; gradients only on the newest."""
        model = self.backbone.model
        model.base_model.set_adapter(list(self.adapters))          # marks every active adapter trainable
        if len(self.adapters) > 1:
            model.base_model.set_requires_grad(self.adapters[:-1], requires_grad=False)
        marker = f".{self.current}."
        wrong = [n for n, p in self.backbone.named_parameters() if p.requires_grad != (marker in n)]
        if wrong:
            raise RuntimeError(f"{self.name}: trainable set is not exactly adapter {self.current!r}: {wrong[:3]}")

    # -- runner hooks ---------------------------------------------------------------------------
    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        name = adapter_name(stage)
        if name not in self.adapters:
            if len(self.adapters) != stage:
                raise RuntimeError(f"stage {stage} expects {stage} adapters before it, found {self.adapters}")
            self.add_adapter(name)
        return train

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Only the adapter names: their weights are in the runner's adapter checkpoint."""
        return {}, {"adapters": list(self.adapters)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Recreate the saved adapters in order (the runner then loads their weights)."""
        saved = list(meta["adapters"])
        if saved[:len(self.adapters)] != self.adapters:
            raise ValueError(f"saved adapters {saved} do not extend the current ones {self.adapters}")
        for name in saved[len(self.adapters):]:
            self.add_adapter(name)

    def diagnostics(self) -> dict:
        return {"adapters": list(self.adapters)}
