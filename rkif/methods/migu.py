"""MIGU on LoRA: update only the LoRA output units whose output activations have large magnitude.

Du et al., "Unlocking Continual Learning Abilities in Language Models" (MIGU, magnItude-based
GradIent Updating), EMNLP Findings 2024 (arXiv 2406.17245). The score of an output unit is the
magnitude of its OUTPUT ACTIVATION (not of its gradient): for each linear map h = x W, n_i = |h_i|
averaged over the tokens of the batch; units below the T-quantile of their layer are frozen for the
step by zeroing their gradient row (paper Sec. 3.2). LoRA variant (Sec. 3.3): the rows of lora_A
(r x d_in) are ranked by the r-dim output x A^T of lora_A itself; the rows of lora_B (d_out x r) by
the layer's combined output x W^T + (alpha / r) x A^T B^T (not by x A^T B^T alone).

Hooks: ``on_train_begin`` registers forward hooks on every peft ``LoraLayer`` (combined output) and
on each of its trainable ``lora_A[adapter]`` (r-dim output); they add sum_tokens |out| per unit and
the token count over the micro-batches of one optimizer step. ``on_pre_optimizer_step`` turns the
sums into means, all-reduces them (AVG) across processes as the official code, thresholds each
layer at ``torch.quantile(stat, T)``, keeps the units with stat >= threshold and multiplies the
gradient rows of lora_A.weight / lora_B.weight by the mask, then clears the statistics.
``on_train_end`` removes the hooks. Task 1 trains plainly (``skip_first_task``, as the code's
``is_first_task``): no hooks are registered then.

Defaults: T = 0.7 (the paper's LoRA+MIGU value, App. A.1; its Fig. 4 optimum): with r = 8 three of
the eight rank rows of A stay trainable. ``pad_mask=False`` counts padding positions, as the
official code does; ``pad_mask=True`` averages over real tokens only (the attention mask of the
call; on encoder-decoder models only encoder-side layers are masked, decoder positions all count).

Deviations: the Trainer clips the gradient norm BEFORE ``on_pre_optimizer_step``, so the norm is
taken over the unmasked gradient (the official code masks first, then DeepSpeed clips). The paper's
L1 normalisation over units and the code's token sum instead of mean do not change the ranking
(one token count per layer and step). Only the LoRA layers are scored (the paper's LoRA+MIGU); the
official full-tuning code also masks every other linear layer, and its LoRA path is not runnable
as released. Under AdamW a row whose gradient is zeroed still moves (momentum, weight decay), as in
the official code; only plain SGD confines the update to the kept rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rkif.checks import Rule
from rkif.data import Example, Task
from rkif.methods.base import Method, MethodConfig
from rkif.methods.registry import register

logger = logging.getLogger(__name__)


@dataclass
class MIGUConfig(MethodConfig):
    threshold: float = 0.7           # T: quantile of the unit magnitudes below which a unit is frozen (paper A.1)
    skip_first_task: bool = True     # task 1 trains plainly (official ``is_first_task``)
    pad_mask: bool = False           # average over non-padding tokens only (official code: all positions)

    method: ClassVar[str] = "migu"

    def check(self) -> None:
        super().check()
        self.check_ranges({"threshold": Rule(lambda v: 0 <= v <= 1, "expected a quantile in [0, 1]")})


# -- equations ---------------------------------------------------------------------------------------
def unit_mask(stat: torch.Tensor, threshold: float) -> torch.Tensor:
    """MIGU's mask M_i = 1 if n_i >= quantile_T(n) else 0 (paper Sec. 3.2; ``torch.quantile``, linear)."""
    q = torch.quantile(stat.double(), threshold)
    return stat.double() >= q


def mask_rows_(grad: torch.Tensor, mask: torch.Tensor) -> None:
    """In place: grad <- M (.) grad with M broadcast over the input dimension (a whole output row)."""
    grad.mul_(mask.to(grad.dtype).reshape(-1, *([1] * (grad.dim() - 1))))


class _UnitStat:
    """sum_tokens |out| per output unit and the token count, accumulated over one optimizer step."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def add(self, out: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        mag = out.detach().float().abs()
        if token_mask is not None and tuple(token_mask.shape) == tuple(mag.shape[:-1]):
            w = token_mask.to(mag.device, mag.dtype)
            total, count = (mag * w.unsqueeze(-1)).reshape(-1, mag.shape[-1]).sum(0), w.sum()
        else:
            total = mag.reshape(-1, mag.shape[-1]).sum(0)
            count = torch.tensor(float(mag.numel() // mag.shape[-1]), device=mag.device)
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count

    def mean(self) -> torch.Tensor | None:
        """Mean |out| per unit over the tokens seen (None if the layer was not called)."""
        return None if self.total is None else self.total / self.count.clamp(min=1.0)

    def clear(self) -> None:
        self.total = self.count = None


@register
class MIGU(Method):
    name = "migu"
    config_class = MIGUConfig

    def __init__(self, config: MIGUConfig, backbone, run):
        super().__init__(config, backbone, run)
        self.stage = 0
        self.handles: list = []
        self.layers: list[tuple[str, nn.Module, str]] = []     # (module name, LoraLayer, adapter)
        self.stats: dict[str, _UnitStat] = {}
        self.token_mask: torch.Tensor | None = None
        self.kept = {"lora_A": [0.0, 0], "lora_B": [0.0, 0]}    # sum of kept fractions, masks applied
        self.steps = 0
        self.log: list[dict] = []

    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        self.stage = stage
        return train

    @property
    def active(self) -> bool:
        return bool(self.handles)

    # -- the forward hooks -------------------------------------------------------------------------
    def lora_layers(self) -> list[tuple[str, nn.Module, str]]:
        """Every (name, peft LoraLayer, adapter) whose lora_A / lora_B weights are trainable."""
        from peft.tuners.lora import LoraLayer
        found = []
        for name, module in self.backbone.named_modules():
            if isinstance(module, LoraLayer) and isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
                for adapter in module.lora_A:
                    if adapter in module.lora_B and module.lora_A[adapter].weight.requires_grad:
                        found.append((name, module, adapter))
        return found

    def on_train_begin(self, trainer) -> None:
        self._remove_hooks()
        if self.config.skip_first_task and self.stage == 0:
            return
        self.layers = self.lora_layers()
        if not self.layers:
            raise RuntimeError("migu: the model has no trainable peft LoRA layer")
        encoder_decoder = bool(getattr(getattr(self.backbone.model, "config", None), "is_encoder_decoder", False))
        self.stats = {}
        seen = set()
        for name, module, adapter in self.layers:
            use_mask = self.config.pad_mask and not (encoder_decoder and "decoder." in name)
            self.stats[f"{name}|{adapter}|A"] = stat_a = _UnitStat()
            self.handles.append(module.lora_A[adapter].register_forward_hook(self._hook(stat_a, use_mask)))
            if name not in seen:                                  # one combined-output stat per layer
                seen.add(name)
                self.stats[f"{name}|out"] = stat_out = _UnitStat()
                self.handles.append(module.register_forward_hook(self._hook(stat_out, use_mask)))
        if self.config.pad_mask:
            self.handles.append(self.backbone.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))

    def _capture_mask(self, module, args, kwargs) -> None:
        self.token_mask = kwargs.get("attention_mask")

    def _hook(self, stat: _UnitStat, use_mask: bool):
        def hook(module, args, output):
            if torch.is_grad_enabled():                            # training forwards only
                out = output[0] if isinstance(output, tuple) else output
                stat.add(out, self.token_mask if use_mask else None)
        return hook

    def _remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def on_train_end(self, trainer) -> None:
        if self.active:
            self.log.append({"stage": self.stage, "steps": self.steps,
                             **{f"kept_{k}": float(total) / max(1, n) for k, (total, n) in self.kept.items()}})
        self._remove_hooks()
        self.stats, self.layers, self.token_mask = {}, [], None
        self.kept = {"lora_A": [0.0, 0], "lora_B": [0.0, 0]}
        self.steps = 0

    # -- the mask ----------------------------------------------------------------------------------
    def masks(self, world_size: int = 1) -> dict[str, torch.Tensor]:
        """Per stat key, the boolean unit mask of this step (stats averaged over processes)."""
        out = {}
        for key, stat in self.stats.items():
            mean = stat.mean()
            if mean is None:
                continue
            if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(mean)
                mean = mean / world_size
            out[key] = unit_mask(mean, self.config.threshold)
        return out

    def on_pre_optimizer_step(self, trainer) -> None:
        if not self.active:
            return
        masks = self.masks(trainer.args.world_size)
        with torch.no_grad():
            for name, module, adapter in self.layers:
                for kind, key in (("lora_A", f"{name}|{adapter}|A"), ("lora_B", f"{name}|out")):
                    if key not in masks:
                        continue
                    lin = getattr(module, kind)[adapter]
                    for p in (lin.weight, getattr(lin, "bias", None)):
                        if p is not None and p.grad is not None:
                            mask_rows_(p.grad, masks[key].to(p.grad.device))
                    self.kept[kind][0] += masks[key].float().mean()     # a tensor: no device sync
                    self.kept[kind][1] += 1
        self.steps += 1
        for stat in self.stats.values():
            stat.clear()

    # -- state -------------------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        return {"masking": list(self.log)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {"diagnostics": self.diagnostics(), "stage": self.stage}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.log = list(meta.get("diagnostics", {}).get("masking", []))
        self.stage = int(meta.get("stage", 0))
