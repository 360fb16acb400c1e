"""O-LoRA: IncLoRA plus a penalty keeping each new task's LoRA subspace orthogonal to the earlier ones.

Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", Findings of
EMNLP 2023 (official code ``cmnfriend/O-LoRA``). The adapters are IncLoRA's (subclassed: a fresh
adapter per task, older ones frozen and summed, no task id at inference). For stage t > 0 the loss is

    CE + lambda1 * sum_modules orth(A_bank, A_t) + lambda2 * sum_(new A, B) ||M||_F

where, per LoRA module, A_bank stacks the ``lora_A`` weights (r x d_in rows) of every earlier adapter
(r_sum x d_in) and A_t is the new adapter's. ``orth_form`` picks orth:

- ``"abs"`` (default, the official code): sum_jk |(A_bank A_t^T)_jk|;
- ``"sq"`` (the paper's Eq. 7-8, columns-as-bases written with row matrices): ||A_bank A_t^T||_F^2.

The L2 term uses unsquared Frobenius norms of the new adapter's A and B, as the official code does.
Defaults lambda1 = 0.5, lambda2 = 0 are the official Standard-benchmark scripts' (orders 1-3, every
task); the released Long script (order 6) uses per-task values 0.5 / 5 and 0 - 0.3, which a run can
set per sequence through the options. Stage 0 has no bank, so no orthogonality term (as in the code).

Hooks: IncLoRA's, plus ``extra_loss`` (returns ``olora_orth`` and, when lambda2 > 0, ``olora_l2``;
both are logged by the Trainer) and ``on_train_begin`` (the bank is rebuilt on the training device).

Deviations: the Trainer divides the whole loss, regularisers included, by the gradient-accumulation
steps, so lambda weighs the regulariser once per optimizer step; the official code adds it to every
micro-batch undivided (g times the weight under g accumulation steps; the official Standard scripts
use g = 1, where both agree). ``scale_with_grad_accum=True`` restores the official weighting. The
old adapters stay separate peft adapters (see IncLoRA) instead of one concatenated ``lora_A``; the
bank is the same concatenation, built from them. Note that the ``"abs"`` penalty is an L1 term: its
gradient near orthogonality is sign(P)^T A_bank, which does not shrink as the products P approach 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from rkif.checks import NON_NEGATIVE
from rkif.methods.base import check_choices
from rkif.methods.inclora import IncLoRA, IncLoRAConfig
from rkif.methods.registry import register

logger = logging.getLogger(__name__)

ORTH_FORMS = ("abs", "sq")


@dataclass
class OLoRAConfig(IncLoRAConfig):
    lambda1: float = 0.5                  # weight of the orthogonality term (official Standard scripts)
    lambda2: float = 0.0                  # weight of the L2 term on the new A and B (official Standard: 0)
    orth_form: str = "abs"                # abs: sum |A_bank A_t^T| (official code) | sq: ||A_bank A_t^T||_F^2 (paper)
    scale_with_grad_accum: bool = False   # multiply the terms by grad_accum, as the official code's undivided sum

    method: ClassVar[str] = "olora"

    def check(self) -> None:
        super().check()
        check_choices(self.method, self, {"orth_form": ORTH_FORMS})
        self.check_ranges({"lambda1": NON_NEGATIVE, "lambda2": NON_NEGATIVE})


def orth_penalty(a_bank: torch.Tensor, a_new: torch.Tensor, form: str = "abs") -> torch.Tensor:
    """Overlap of the new LoRA A rows with the bank's rows for one module.

    ``a_bank`` is r_sum x d_in (earlier adapters' ``lora_A`` weights stacked), ``a_new`` is r x d_in.
    ``"abs"``: sum_jk |(a_bank a_new^T)_jk| (O-LoRA code, ``UIETrainer.training_step``);
    ``"sq"``: ||a_bank a_new^T||_F^2 = sum_i ||A_i^T A_t||_F^2 (O-LoRA paper, Eq. 7-8, A as d x r columns).
    """
    products = a_bank @ a_new.T
    if form == "abs":
        return products.abs().sum()
    if form == "sq":
        return products.pow(2).sum()
    raise ValueError(f"orth_form must be one of {ORTH_FORMS}, got {form!r}")


def l2_penalty(matrices: list[torch.Tensor]) -> torch.Tensor:
    """sum_M ||M||_F over the new adapter's A and B matrices (O-LoRA code; unsquared norms)."""
    return torch.stack([m.norm() for m in matrices]).sum()


@register
class OLoRA(IncLoRA):
    name = "olora"
    config_class = OLoRAConfig

    def __init__(self, config: OLoRAConfig, backbone, run):
        super().__init__(config, backbone, run)
        self._bank: dict[str, torch.Tensor] | None = None

    def activate(self) -> None:
        super().activate()
        self._bank = None                  # the set of old adapters changed

    def a_bank(self) -> dict[str, torch.Tensor]:
        """Per LoRA module: the earlier adapters' A weights stacked (r_sum x d_in), detached, fp32."""
        bank = {}
        for module_name, layer in self.lora_layers():
            old = [layer.lora_A[a].weight for a in self.adapters[:-1] if a in layer.lora_A]
            if old and self.current in layer.lora_A:
                bank[module_name] = torch.cat(old, dim=0).detach().float()
        return bank

    def _current_bank(self) -> dict[str, torch.Tensor]:
        """The cached bank, rebuilt when the adapters changed or the model moved to another device."""
        if self._bank is not None:
            ref = next(iter(self._bank.values()), None)
            if ref is not None and ref.device != self.backbone.device:
                self._bank = None
        if self._bank is None:
            self._bank = self.a_bank()
        return self._bank

    def on_train_begin(self, trainer) -> None:
        self._bank = None                  # rebuilt on the device the Trainer placed the model on
        bank = self._current_bank() if len(self.adapters) > 1 else {}
        rows = sorted({a.shape[0] for a in bank.values()})
        logger.info("%s: training adapter %s; A bank over %d modules, rows %s", self.name, self.current,
                    len(bank), rows)

    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        """lambda1 * sum of per-module orth terms and (lambda2 > 0) lambda2 * the L2 term on the new adapter."""
        cfg = self.config
        scale = self.run.grad_accum if cfg.scale_with_grad_accum else 1
        terms: dict[str, torch.Tensor] = {}
        layers = dict(self.lora_layers())
        bank = self._current_bank() if cfg.lambda1 and len(self.adapters) > 1 else {}
        if bank:
            orth = [orth_penalty(a_bank, layers[n].lora_A[self.current].weight.float(), cfg.orth_form)
                    for n, a_bank in bank.items()]
            terms["olora_orth"] = scale * cfg.lambda1 * torch.stack(orth).sum()
        if cfg.lambda2:
            new = [m for layer in layers.values() if self.current in layer.lora_A
                   for m in (layer.lora_A[self.current].weight.float(), layer.lora_B[self.current].weight.float())]
            terms["olora_l2"] = scale * cfg.lambda2 * l2_penalty(new)
        return terms
