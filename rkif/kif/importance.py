"""Parameter importance (knowledge identification), Eq. 3, 4, 6 and 7 of Recurrent-KIF.

Importance maps are ``{parameter name: tensor}`` dicts with the shapes of the trainable parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rkif.sharding import local

Scores = dict[str, torch.Tensor]


def step_scores(params: Mapping[str, torch.nn.Parameter], kind: str = "weight_grad") -> Scores:
    """Importance of one optimizer step from the gradients now in ``p.grad``.

    ``weight_grad``: Ibar(w) = |w * dL/dw| (Eq. 3); ``grad``: |dL/dw| (the paper's Table 10 ablation).
    Parameters without a gradient score zero. A sharded parameter (FSDP2) is scored on this process's
    slice: the scores are plain tensors shaped like ``rkif.sharding.local(p)``.
    """
    out = {}
    for name, param in params.items():
        p, g = local(param), None if param.grad is None else local(param.grad)
        if g is None:
            out[name] = torch.zeros_like(p, dtype=torch.float32)
        elif kind == "weight_grad":
            out[name] = (p.detach().float() * g.float()).abs()
        elif kind == "grad":
            out[name] = g.detach().float().abs()
        else:
            raise ValueError(f"unknown importance score {kind!r}: weight_grad or grad")
    return out


class EMAImportance:
    """I <- alpha * I + (1 - alpha) * Ibar, starting from zero (Eq. 4; alpha = a1 = 0.55).

    ``alpha = 0`` keeps only the latest step (the paper's "no EMA" ablation).
    """

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.value: Scores | None = None

    def update(self, scores: Scores) -> None:
        if self.value is None:
            self.value = {n: (1 - self.alpha) * s for n, s in scores.items()}
            return
        for n, s in scores.items():
            self.value[n].mul_(self.alpha).add_(s, alpha=1 - self.alpha)

    def reset(self) -> None:
        self.value = None


class MeanImportance:
    """Plain mean of the step scores since the last reset (Ibar_out over the M outer steps, Eq. 6)."""

    def __init__(self):
        self.value: Scores | None = None
        self.count = 0

    def update(self, scores: Scores) -> None:
        self.count += 1
        if self.value is None:
            self.value = {n: s.clone() for n, s in scores.items()}
        else:
            for n, s in scores.items():
                self.value[n].add_(s - self.value[n], alpha=1 / self.count)

    def reset(self) -> None:
        self.value, self.count = None, 0


class SensitivityUncertainty:
    """The release's score (AdaLoRA's): S <- b S + (1-b) s; U <- b U + (1-b) |s - S|; I = S * U.

    ``s = |w g|``, b = 0.85 weights the old value, U uses the S just updated, both start at zero.
    """

    def __init__(self, beta: float = 0.85):
        self.beta = beta
        self.sensitivity: Scores | None = None
        self.uncertainty: Scores | None = None

    def update(self, scores: Scores) -> None:
        if self.sensitivity is None:
            self.sensitivity = {n: torch.zeros_like(s) for n, s in scores.items()}
            self.uncertainty = {n: torch.zeros_like(s) for n, s in scores.items()}
        for n, s in scores.items():
            self.sensitivity[n].mul_(self.beta).add_(s, alpha=1 - self.beta)
            self.uncertainty[n].mul_(self.beta).add_((s - self.sensitivity[n]).abs(), alpha=1 - self.beta)

    @property
    def value(self) -> Scores | None:
        if self.sensitivity is None:
            return None
        return {n: self.sensitivity[n] * self.uncertainty[n] for n in self.sensitivity}

    def reset(self) -> None:
        self.sensitivity = self.uncertainty = None


def outer_ema(previous: Scores | None, current: Scores, alpha: float) -> Scores:
    """I_out_b = a2 * Ibar_out_b + (1 - a2) * I_out_{b-1} (Eq. 7; a2 weights the NEW value).

    The first round of a task has no previous value and takes ``current`` as it is.
    """
    if previous is None:
        return {n: s.clone() for n, s in current.items()}
    return {n: alpha * current[n] + (1 - alpha) * previous[n] for n in current}


def make_tracker(smoothing: str, alpha: float, beta: float):
    """A step-importance tracker: ``ema`` (Eq. 4), ``none`` (last step only) or ``su`` (release)."""
    if smoothing == "ema":
        return EMAImportance(alpha)
    if smoothing == "none":
        return EMAImportance(0.0)
    if smoothing == "su":
        return SensitivityUncertainty(beta)
    raise ValueError(f"unknown importance smoothing {smoothing!r}: ema, none or su")
