"""TaSL: task skill localization and consolidation of one LoRA adapter across tasks.

Feng et al., "TaSL: Continual Dialog State Tracking via Task Skill Localization and Consolidation",
ACL 2024 (default variant); options reproduce the journal extension "TasLoRA" (arXiv 2408.05200).

1. Skill localization, online while task k trains (``on_optimizer_step``: post-step weights and the
   clipped gradients, as the official code): s = |theta * g| per element (``score="first_order"``;
   TasLoRA's ``"param_mix"``: |theta g - (theta g)^2 / 2|), Ibar <- b1 Ibar + (1 - b1) s,
   Ubar <- b2 Ubar + (1 - b2) |s - Ibar| (with the Ibar just updated), element score Ibar * Ubar,
   b1 = b2 = 0.85. Skill units (``units``): every LoRA matrix (``"matrix"``, ACL'24) or every rank-1
   component, row j of A with column j of B (``"rank1"``, TasLoRA); a unit's score is the mean of
   its element scores (rank-1: mean(score_B[:, j]) * mean(score_A[j, :]), the mean of their outer product).
2. Skill consolidation (``after_task``, before evaluation; the result is written into the model):
   the current unit scores I_k and the accumulated Ihat_{<k} are min-max normalised separately and
   each is thresholded at its 80th percentile (important = strictly above, as ``np.percentile`` and
   ``>`` in the official code). ``rule="hard"`` (ACL'24), per unit, theta_k = just trained,
   thetahat_{k-1} = the previous consolidated weights: both important -> 0.3 theta_k + 0.7 thetahat;
   previous only -> thetahat; current only -> theta_k; neither -> 0.5 / 0.5. ``rule="soft"``
   (TasLoRA): w = exp(I_k / tau) / (exp(I_k / tau) + exp(Ihat / tau)), tau = 0.25, theta = w theta_k
   + (1 - w) thetahat. Then Ihat_{<=k} = minmax(0.3 I_k + 0.7 Ihat_{<k}). Task 1: weights kept, Ihat = I_1.
   Task k starts from the consolidated weights (forward transfer), with a fresh optimizer.

Hooks: ``on_train_begin`` (snapshot thetahat_{k-1}, reset the trackers), ``on_optimizer_step``
(importance), ``extra_loss`` (only with ``orth_reg`` > 0), ``after_task`` (consolidation).
The TasLoRA variant (rank-1 units, soft rule, second-order score, AdaLoRA orthogonality term 0.1)
is the preset ``tasl-taslora``.

Deviations from the official code: every optimizer step of the task is tracked (the release guards
its update with ``global_step < total_step``, which can leave out the last step); min-max of a
constant score set gives zeros instead of NaN; only the trainable (LoRA) parameters are units; with
``units="rank1"`` a parameter that is not one of a lora_A/lora_B pair is a unit of its own (whole
matrix). No replay (the journal's optional one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from rkif.checks import EMA_WEIGHT, NON_NEGATIVE, POSITIVE, UNIT, Rule
from rkif.data import Example, Task
from rkif.methods.base import Method, MethodConfig, check_choices
from rkif.methods.registry import register, register_preset

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass
class TaSLConfig(MethodConfig):
    beta1: float = 0.85              # EMA of the sensitivity Ibar (weight of the OLD value)
    beta2: float = 0.85              # EMA of the uncertainty Ubar (weight of the OLD value)
    score: str = "first_order"       # first_order |theta g| (ACL'24) | param_mix |theta g - (theta g)^2/2| (TasLoRA)
    units: str = "matrix"            # matrix: each LoRA matrix (ACL'24) | rank1: row j of A + column j of B (TasLoRA)
    rule: str = "hard"               # hard: four-case rule (ACL'24) | soft: softmax weights (TasLoRA)
    top_percent: float = 20.0        # a unit is important above the (100 - top_percent)th percentile
    both_weight: float = 0.3         # weight of theta_k when the unit is important for both
    neither_weight: float = 0.5      # weight of theta_k when it is important for neither
    accumulate_weight: float = 0.3   # Ihat_{<=k} = minmax(a I_k + (1 - a) Ihat_{<k})
    tau: float = 0.25                # temperature of the soft rule
    orth_reg: float = 0.0            # TasLoRA's orthogonality term weight (0.1 there; 0 = ACL'24)

    method: ClassVar[str] = "tasl"

    def check(self) -> None:
        super().check()
        check_choices(self.method, self, {"score": ("first_order", "param_mix"), "units": ("matrix", "rank1"),
                                          "rule": ("hard", "soft")})
        self.check_ranges({"beta1": EMA_WEIGHT, "beta2": EMA_WEIGHT,
                           "top_percent": Rule(lambda v: 0 < v <= 100, "expected a percentage in (0, 100]"),
                           "both_weight": UNIT, "neither_weight": UNIT, "accumulate_weight": UNIT, "tau": POSITIVE,
                           "orth_reg": NON_NEGATIVE})
        hard = (self.rule == "hard", "with rule=hard")
        self.check_unused({"top_percent": hard, "both_weight": hard, "neither_weight": hard,
                           "tau": (self.rule == "soft", "with rule=soft")})


# -- equations ---------------------------------------------------------------------------------------
def element_scores(theta: torch.Tensor, grad: torch.Tensor | None, kind: str) -> torch.Tensor:
    """s = |theta g| (ACL'24, first order) or |theta g - (theta g)^2 / 2| (TasLoRA ``param_mix``); no grad -> 0."""
    if grad is None:
        return torch.zeros_like(theta, dtype=torch.float32)
    tg = theta.detach().float() * grad.detach().float()
    if kind == "first_order":
        return tg.abs()
    if kind == "param_mix":
        return (tg - 0.5 * tg.pow(2)).abs()
    raise ValueError(f"unknown TaSL score {kind!r}: first_order or param_mix")


def update_sensitivity(ibar: torch.Tensor, ubar: torch.Tensor, s: torch.Tensor, b1: float, b2: float) -> None:
    """In place: Ibar <- b1 Ibar + (1 - b1) s; Ubar <- b2 Ubar + (1 - b2) |s - Ibar| (TaSL Eq. 2-4, AdaLoRA)."""
    ibar.mul_(b1).add_(s, alpha=1 - b1)
    ubar.mul_(b2).add_((s - ibar).abs(), alpha=1 - b2)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over all units; a constant vector maps to zeros."""
    span = x.max() - x.min()
    return torch.zeros_like(x) if span <= 0 else (x - x.min()) / span


def important(x: torch.Tensor, top_percent: float) -> torch.Tensor:
    """Units strictly above the (100 - top_percent)th percentile (linear interpolation, as np.percentile)."""
    return x > torch.quantile(x.double(), 1 - top_percent / 100).to(x.dtype)


def hard_weights(cur: torch.Tensor, prev: torch.Tensor, top_percent: float = 20.0,
                 both: float = 0.3, neither: float = 0.5) -> torch.Tensor:
    """Weight of theta_k per unit, ACL'24 rule: both -> 0.3, previous only -> 0, current only -> 1, neither -> 0.5.

    ``cur`` and ``prev`` are the min-max normalised unit scores I_k and Ihat_{<k}.
    """
    c, p = important(cur, top_percent), important(prev, top_percent)
    w = torch.full_like(cur, neither)
    w[c & p] = both
    w[p & ~c] = 0.0
    w[c & ~p] = 1.0
    return w


def soft_weights(cur: torch.Tensor, prev: torch.Tensor, tau: float = 0.25) -> torch.Tensor:
    """TasLoRA: w = exp(I_k / tau) / (exp(I_k / tau) + exp(Ihat_{<k} / tau)) = sigmoid((I_k - Ihat) / tau)."""
    return torch.sigmoid((cur - prev) / tau)


def accumulate(cur: torch.Tensor, prev: torch.Tensor, weight: float = 0.3) -> torch.Tensor:
    """Ihat_{<=k} = minmax(0.3 minmax(I_k) + 0.7 minmax(Ihat_{<k})) (official code; paper beta = 0.7)."""
    return minmax(weight * minmax(cur) + (1 - weight) * minmax(prev))


# -- skill units -------------------------------------------------------------------------------------
class SkillUnits:
    """The skill units of a set of LoRA parameters, in a fixed order: one score per unit.

    ``matrix``: every parameter tensor is one unit. ``rank1``: for each lora_A (r x d_in) with its
    lora_B (d_out x r), unit j = row j of A and column j of B; other parameters are one unit each.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], kind: str = "matrix"):
        if kind not in ("matrix", "rank1"):
            raise ValueError(f"unknown TaSL units {kind!r}: matrix or rank1")
        self.groups: list[tuple[str, str | None, int]] = []      # (name or A name, B name, units)
        paired = set()
        for name in sorted(shapes):
            partner = name.replace("lora_A", "lora_B")
            if kind == "rank1" and "lora_A" in name and partner in shapes and len(shapes[name]) == 2:
                rank = shapes[name][0]
                if tuple(shapes[partner])[1:] != (rank,):
                    raise ValueError(f"{partner} {tuple(shapes[partner])} does not pair with {name} {shapes[name]}")
                self.groups.append((name, partner, rank))
                paired.add(partner)
        grouped = paired | {a for a, _, _ in self.groups}
        self.groups += [(name, None, 1) for name in sorted(shapes) if name not in grouped]
        self.groups.sort()
        self.keys = [f"{a}|{j}" if b else a for a, b, r in self.groups for j in range(r)]

    def __len__(self) -> int:
        return len(self.keys)

    def scores(self, elem: Tensors) -> torch.Tensor:
        """Unit scores from element scores: the mean over each unit's elements."""
        out = []
        for a, b, _ in self.groups:
            if b is None:
                out.append(elem[a].float().mean().reshape(1).cpu())
            else:
                out.append((elem[b].float().mean(0) * elem[a].float().mean(1)).cpu())
        return torch.cat(out)

    def expand(self, w: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> Tensors:
        """Per-parameter weight tensors (broadcastable to the parameter) from one weight per unit."""
        out, start = {}, 0
        for a, b, r in self.groups:
            part = w[start:start + r]
            start += r
            if b is None:
                out[a] = part.reshape([1] * len(shapes[a]))
            else:
                out[a], out[b] = part.reshape(r, 1), part.reshape(1, r)
        return out


def orthogonality(params: Tensors) -> torch.Tensor:
    """Mean over LoRA matrices of ||A A^T - I||_F (lora_A) and ||B^T B - I||_F (lora_B), AdaLoRA's term."""
    terms = []
    for name, p in params.items():
        if "lora_A" in name or "lora_B" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device, dtype=p.dtype)))
    if not terms:
        raise ValueError("TaSL orth_reg needs lora_A / lora_B parameters; the model has none")
    return torch.stack(terms).mean()


@register
class TaSL(Method):
    name = "tasl"
    config_class = TaSLConfig

    def __init__(self, config: TaSLConfig, backbone, run):
        super().__init__(config, backbone, run)
        self.params = backbone.trainable_parameters()
        self.units = SkillUnits(self._shapes(), config.units)
        self.accumulated: torch.Tensor | None = None       # Ihat_{<k}, one value per unit
        self.previous: Tensors | None = None                # thetahat_{k-1}, snapshot at train begin
        self.ibar: Tensors = {}
        self.ubar: Tensors = {}
        self.log: list[dict] = []

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.params.items()}

    # -- training: importance of the current task ----------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        self.params = self.backbone.trainable_parameters()
        self.units = SkillUnits(self._shapes(), self.config.units)
        self.previous = {n: p.detach().clone() for n, p in self.params.items()}
        self.ibar = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.ubar = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}

    def on_optimizer_step(self, trainer) -> None:
        cfg = self.config
        with torch.no_grad():
            for n, p in self.params.items():
                s = element_scores(p, p.grad, cfg.score)
                update_sensitivity(self.ibar[n], self.ubar[n], s, cfg.beta1, cfg.beta2)

    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        if self.config.orth_reg <= 0:
            return {}
        return {"orth_reg": self.config.orth_reg * orthogonality(self.params)}

    def current_scores(self) -> torch.Tensor:
        """I_k: one score per skill unit from the element scores Ibar * Ubar of this task."""
        return self.units.scores({n: self.ibar[n] * self.ubar[n] for n in self.ibar})

    # -- after the task: consolidation ---------------------------------------------------------------
    def consolidation_weights(self, cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Weight of the just-trained weights per unit (the rest goes to the previous consolidated ones)."""
        cfg = self.config
        cur_n, prev_n = minmax(cur), minmax(prev)
        if cfg.rule == "hard":
            return hard_weights(cur_n, prev_n, cfg.top_percent, cfg.both_weight, cfg.neither_weight)
        return soft_weights(cur_n, prev_n, cfg.tau)

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        if not self.ibar:
            raise RuntimeError("TaSL: after_task without training (on_train_begin was not called)")
        cur = self.current_scores()
        record = {"stage": stage, "units": len(cur), "zero_score_units": int((cur == 0).sum())}
        if self.accumulated is None:                               # task 1: copy theta_1, Ihat = I_1
            self.accumulated = minmax(cur)
        else:
            w = self.consolidation_weights(cur, self.accumulated)
            per_param = self.units.expand(w, self._shapes())
            with torch.no_grad():
                for n, p in self.params.items():
                    wn = per_param[n].to(p.device, p.dtype)
                    p.copy_(wn * p + (1 - wn) * self.previous[n])
            self.accumulated = accumulate(cur, self.accumulated, self.config.accumulate_weight)
            record.update(mean_weight_current=float(w.mean()),
                          **{k: int((w == v).sum()) for k, v in (("kept_previous", 0.0), ("took_current", 1.0))})
        self.log.append(record)
        logger.info("TaSL after stage %d: %s", stage, record)

    # -- state ----------------------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        return {"consolidation": list(self.log)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        meta = {"diagnostics": self.diagnostics(), "unit_keys": self.units.keys}
        if self.accumulated is None:
            return {}, meta
        return {"accumulated_importance": self.accumulated.detach().cpu().contiguous()}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.log = list(meta.get("diagnostics", {}).get("consolidation", []))
        if meta.get("unit_keys", self.units.keys) != self.units.keys:
            raise ValueError("TaSL state: the saved skill units differ from this model's")
        self.accumulated = tensors.get("accumulated_importance")


register_preset("tasl-taslora", "tasl", {"units": "rank1", "rule": "soft", "score": "param_mix", "orth_reg": 0.1})
