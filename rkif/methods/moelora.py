"""MoELoRA: E LoRA experts per target layer, mixed by an input-conditioned router; no task id anywhere.

Luo et al., "MoELoRA: Contrastive Learning Guided Mixture of Experts on Parameter-Efficient Fine-Tuning
for Large Language Models", 2024; canonical peft-based code ``liuqidong07/MOELoRA-peft``
(``src/MLoRA/peft/tuners/mmoelora.py``). BASELINES.md section 10. Every target linear layer computes

    h = W x + sum_e g_e(x) * (alpha / r) * B_e A_e dropout_e(x),     r = E * r_e,
    g(x) = softmax(W_g q(x))                                          (one W_g: d -> E per layer, no bias)

with E experts of rank r_e (official: r 16 split over 8 experts, alpha 32, dropout 0.1; here E defaults
to the number of tasks K, R-KIF's "a vanilla MoE with LoRA number equal to the task number"). Experts and
routers train together through the whole sequence: no replay, no task id in training or at test.

The router input q(x) is the mean of the frozen input-token embeddings over the prompt's tokens (the
hidden state entering the first layer; the same vector for every layer, each with its own W_g). It comes
from ``Backbone.add_input_hook``, once per sequence, so a generated answer uses the gate of its prompt.

Implementation: peft LoRA adapters, one per expert (``default`` = expert 0, ``expert_1`` ...), all active
and trainable. Each adapter has rank r_e and scaling alpha / (E r_e) = alpha / r (``LoraLayer.set_scale``).
The gate multiplies each expert's ``lora_B`` output (a forward hook); the router ``moe_router`` is a
submodule of its LoRA layer, so it is saved with the adapters and restored on resume. With E = 1 the gate
is exactly 1 and the layer is plain LoRA.

Hooks: ``families`` (generative only), ``peft_config`` (the expert LoRA), ``on_train_begin`` / ``after_task``
(the mean gate of the stage's training batches, in ``diagnostics``), ``state_dict`` (the expert names).

Deviations from the official code: the official gate is a task-id embedding (task-aware), replaced by
the input-conditioned router BASELINES.md specifies; the router reads the embedding-layer hidden state
pooled over the prompt, not a layer's own input (decoding steps see one token, and a training sequence
holds its answer); experts are initialised as peft LoRA (A Kaiming-uniform, B = 0) where the official
code draws A from N(0, 0.01^2); targets are the backbone's LoRA targets (q and v by default) where the
official script adapts every linear layer of ChatGLM.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from rkif.backbones.base import masked_mean
from rkif.checks import AT_LEAST_ONE, NON_NEGATIVE_INT, Rule
from rkif.data import Example, Task
from rkif.methods.base import GENERATIVE_FAMILIES, Method, MethodConfig, scale_rows, task_count
from rkif.methods.registry import register

logger = logging.getLogger(__name__)

BASE_ADAPTER = "default"


@dataclass
class MoELoRAConfig(MethodConfig):
    experts: int = 0        # E; 0: one per task of the run (R-KIF: E = K)
    expert_r: int = 2       # rank of each expert (official: r 16 over 8 experts)
    alpha: int = 32         # LoRA alpha; scaling alpha / (E * expert_r) = alpha / r (official)
    dropout: float = 0.1    # LoRA dropout of every expert (official)

    method: ClassVar[str] = "moelora"

    def check(self) -> None:
        super().check()
        self.check_ranges({"experts": NON_NEGATIVE_INT, "expert_r": AT_LEAST_ONE, "alpha": AT_LEAST_ONE,
                           "dropout": Rule(lambda v: 0 <= v < 1, "expected a probability in [0, 1)")})


def gate_weights(router: nn.Linear, query: torch.Tensor) -> torch.Tensor:
    """g = softmax(W_g q): [B, d] -> [B, E], each row summing to 1."""
    return torch.softmax(router(query.to(router.weight.dtype)), dim=-1)


def expert_names(n: int) -> list[str]:
    """The peft adapter of each expert: the backbone's own for expert 0, ``expert_<e>`` after."""
    return [BASE_ADAPTER] + [f"expert_{e}" for e in range(1, n)]


@register
class MoELoRA(Method):
    name = "moelora"
    config_class = MoELoRAConfig
    families = GENERATIVE_FAMILIES

    @classmethod
    def peft_config(cls, config: MoELoRAConfig, backbone) -> LoraConfig:
        return LoraConfig(r=config.expert_r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=backbone.lora_targets)

    def __init__(self, config: MoELoRAConfig, backbone, run):
        super().__init__(config, backbone, run)
        self.experts = expert_names(config.experts or task_count(run))
        model = backbone.model
        for name in self.experts[1:]:
            model.add_adapter(name, copy.deepcopy(model.peft_config[BASE_ADAPTER]))
        model.base_model.set_adapter(list(self.experts))               # every expert active and trainable
        dim = model.get_base_model().get_input_embeddings().embedding_dim
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        for layer in self.layers.values():
            for name in self.experts:
                layer.set_scale(name, 1 / len(self.experts))           # alpha / r_e / E = alpha / r
            weight = layer.get_base_layer().weight
            layer.moe_router = nn.Linear(dim, len(self.experts), bias=False).to(weight.device)
            layer.register_forward_pre_hook(self._route)
            for e, name in enumerate(self.experts):
                layer.lora_B[name].register_forward_hook(partial(self._gate, layer, e))
        backbone.add_input_hook(self._read_prompt)
        self.query: torch.Tensor | None = None                         # [B, d] of the current sequences
        self.gates: dict[nn.Module, torch.Tensor] = {}                 # layer -> [B, E] for the current pass
        self._gate_sum: torch.Tensor | None = None
        self._gate_count = 0
        self.gate_log: list[dict] = []
        logger.info("%s: %d experts of rank %d on %d layers", self.name, len(self.experts), config.expert_r,
                    len(self.layers))

    # -- routing --------------------------------------------------------------------------------
    def _read_prompt(self, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Input hook: q = the mean prompt-token embedding of each new sequence [B, d]."""
        self.query = masked_mean(embeds.detach(), prompt_mask)
        self.gates.clear()

    def _route(self, layer: LoraLayer, args) -> None:
        """Pre-hook of a LoRA layer: its gate for each prompt of the batch [B, E]."""
        if self.query is None:
            raise RuntimeError(f"{self.name}: a LoRA layer ran before the input hook saw a prompt")
        gates = gate_weights(layer.moe_router, self.query)
        self.gates[layer] = gates
        if layer.training and torch.is_grad_enabled():
            batch_mean = gates.detach().float().mean(0).cpu()
            self._gate_sum = batch_mean if self._gate_sum is None else self._gate_sum + batch_mean
            self._gate_count += 1

    def _gate(self, layer: LoraLayer, expert: int, module, args, out: torch.Tensor) -> torch.Tensor:
        """Forward hook of expert e's ``lora_B``: its output times g_e(x) (rank mode repeats a prompt's rows)."""
        return scale_rows(out, self.gates[layer][:, expert], self.name)

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        self._gate_sum, self._gate_count = None, 0

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        if self._gate_count:
            mean = (self._gate_sum / self._gate_count).tolist()
            self.gate_log.append({"stage": stage, "mean_gate": [round(v, 4) for v in mean]})
            logger.info("%s after stage %d: mean gate %s", self.name, stage, self.gate_log[-1]["mean_gate"])

    # -- state ----------------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        return {"experts": list(self.experts), "gates": list(self.gate_log)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Expert and router weights are adapter tensors (the runner saves them); here, their layout."""
        return {}, {"experts": list(self.experts), "gates": list(self.gate_log)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["experts"] != self.experts:
            raise ValueError(f"{self.name} state: saved experts {meta['experts']} differ from {self.experts}")
        self.gate_log = list(meta.get("gates", []))
