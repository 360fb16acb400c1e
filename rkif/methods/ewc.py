"""EWC on the LoRA parameters: a quadratic pull towards the previous task's weights, weighted by the Fisher.

Elastic weight consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
networks", PNAS 2017) in its online form (Schwarz et al., "Progress & Compress", ICML 2018): one
anchor theta* (the trainable parameters at the end of the previous task) and one diagonal Fisher
accumulated over tasks, F <- gamma * F + F_new (gamma = 1: the "accumulated Fisher" form that
BASELINES.md recommends). For task k > 1 the loss is CE + (lambda / 2) * sum_j F_j (theta_j - theta*_j)^2;
task 1 trains plainly.

Hooks: ``on_train_begin`` (re-read the trainable parameters), ``extra_loss`` (the penalty, logged as
``ewc_penalty``), ``after_task`` (the Fisher of the task just trained and the new anchor).

Fisher: the empirical diagonal Fisher, the mean over ``fisher_samples`` examples (default 200, drawn
deterministically from the task's training data; all of them when fewer) of the squared per-sample
gradient of -log p(gold | x), with the model in eval mode (dropout off). ``fisher_loss="sum"`` takes
the whole label sequence's log-probability (the backbone's per-token mean loss times the number of
label tokens, as BASELINES.md specifies); ``"mean"`` keeps the per-token mean. For the encoder
backbone both are the cross-entropy over the label strings.

Scale of lambda. The Fisher of LoRA parameters is tiny and model-dependent (B starts at zero), so
by default every task's Fisher is divided by its mean over all coordinates before it is accumulated
(``normalize_fisher=True``): after one task F has mean 1, lambda is the curvature the penalty puts on
a coordinate of average Fisher, whatever the model's gradient scale. Each task then counts equally in
the accumulated F (mean k after k tasks with gamma = 1); raw online EWC would weight tasks by their
Fisher magnitude. The default lambda = 1 was selected by ``benchmarks/heldout_select.py`` on data held
out from the training split, never dev/test (Standard order 1, MiniLM, each task's 500-example
sample split 400 train / 100 held out, 1 epoch, lr 1e-3; ``benchmarks/results/ewc_lambda.json``):
held-out OP after the last task was 46.3 / 50.5 / 56.5 / 52.8 / 39.5 / 37.8 for lambda = 0 / 0.1 /
1 / 10 / 100 / 1000. Larger lambdas forget least (BWT -1% at 100) but no longer learn the new tasks.
Another backbone, lr or budget moves the optimum: rerun the selection for it.

Deviations and costs: the Fisher is per sample as specified, one forward/backward per sample (on the
encoder each also embeds every candidate label: 200 samples cost roughly a third of a 500-example
epoch on CPU), computed identically on every DDP rank; the penalty covers every trainable parameter
(the LoRA weights); with several tasks in one stage the Fisher samples are drawn from their union.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from rkif.checks import NON_NEGATIVE, UNIT
from rkif.data import Example, Task
from rkif.methods.base import Method, MethodConfig, check_choices
from rkif.methods.registry import register

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass
class EWCConfig(MethodConfig):
    ewc_lambda: float = 1.0           # lambda of (lambda / 2) sum F (theta - theta*)^2 (selected: module docstring)
    gamma: float = 1.0                # online decay: F <- gamma F + F_new (1 = accumulated Fisher)
    fisher_samples: int = 200         # per-sample gradients per task (<= 0: every training example)
    normalize_fisher: bool = True     # divide each task's Fisher by its mean: lambda becomes scale-free
    fisher_loss: str = "sum"          # sum: -log p(label sequence) | mean: the backbone's per-token mean loss

    method: ClassVar[str] = "ewc"

    def check(self) -> None:
        super().check()
        check_choices(self.method, self, {"fisher_loss": ("sum", "mean")})
        self.check_ranges({"ewc_lambda": NON_NEGATIVE, "gamma": UNIT})


def ewc_penalty(params: Mapping[str, torch.Tensor], anchor: Tensors, fisher: Tensors, lam: float) -> torch.Tensor:
    """(lambda / 2) * sum_j F_j (theta_j - theta*_j)^2 (Kirkpatrick et al. 2017, Eq. 3)."""
    total = None
    for name, p in params.items():
        term = (fisher[name] * (p - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("EWC penalty over an empty parameter set")
    return 0.5 * lam * total


def empirical_fisher(per_sample_loss: Callable[[Example], torch.Tensor], params: Mapping[str, torch.Tensor],
                     examples: list[Example]) -> Tensors:
    """Diagonal empirical Fisher: the mean over ``examples`` of the squared gradient of each one's loss."""
    if not examples:
        raise ValueError("the empirical Fisher needs at least one example")
    names, tensors = list(params), list(params.values())
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for ex in examples:
        grads = torch.autograd.grad(per_sample_loss(ex), tensors, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                fisher[n].add_(g.detach().float().pow(2))
    return {n: f / len(examples) for n, f in fisher.items()}


def normalize_by_mean(fisher: Tensors) -> Tensors:
    """F / mean(F), the mean taken over every coordinate of every tensor (all-zero F is returned as is)."""
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    if total <= 0.0:
        logger.warning("EWC: the Fisher is zero everywhere; nothing will be penalised")
        return fisher
    return {n: f * (count / total) for n, f in fisher.items()}


def online_fisher(previous: Tensors | None, new: Tensors, gamma: float) -> Tensors:
    """Online EWC accumulation F <- gamma * F + F_new (Schwarz et al. 2018); the first task takes F_new."""
    if previous is None:
        return {n: f.clone() for n, f in new.items()}
    return {n: gamma * previous[n] + new[n] for n in new}


def fisher_sample(examples: list[Example], size: int, seed: int) -> list[Example]:
    """A deterministic sample of ``size`` examples (every example when ``size`` <= 0 or >= their number)."""
    if size <= 0 or size >= len(examples):
        return list(examples)
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), size))]


@register
class EWC(Method):
    name = "ewc"
    config_class = EWCConfig

    def __init__(self, config: EWCConfig, backbone, run):
        super().__init__(config, backbone, run)
        self.params = backbone.trainable_parameters()
        self.anchor: Tensors | None = None
        self.fisher: Tensors | None = None
        self.log: list[dict] = []

    # -- training --------------------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        self.params = self.backbone.trainable_parameters()
        if self.anchor is not None:
            missing = sorted(set(self.params) - set(self.anchor))
            if missing:
                raise KeyError(f"EWC: trainable parameters without an anchor: {missing[:3]}")
            device = next(iter(self.params.values())).device
            self.anchor = {n: t.to(device) for n, t in self.anchor.items()}
            self.fisher = {n: t.to(device) for n, t in self.fisher.items()}

    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        if self.anchor is None:              # task 1: nothing to protect
            return {}
        return {"ewc_penalty": ewc_penalty(self.params, self.anchor, self.fisher, self.config.ewc_lambda)}

    # -- after a task: Fisher and anchor -----------------------------------------------------------
    def per_sample_loss(self, example: Example) -> torch.Tensor:
        """-log p(gold | x) of one example (the backbone's loss, summed over label tokens if asked)."""
        batch = {k: v.to(self.backbone.device) for k, v in self.backbone.collate([example]).items()}
        loss = self.backbone(**batch)["loss"].float()
        labels = batch.get("labels")
        if self.config.fisher_loss == "sum" and labels is not None and labels.dim() > 1:
            loss = loss * (labels != -100).sum()
        return loss

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        self.params = self.backbone.trainable_parameters()
        sample = fisher_sample(train, self.config.fisher_samples, self.run.seed * 1000 + stage)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            new = empirical_fisher(self.per_sample_loss, self.params, sample)
        finally:
            self.backbone.train(was_training)
        raw_mean = sum(float(f.sum()) for f in new.values()) / sum(f.numel() for f in new.values())
        if self.config.normalize_fisher:
            new = normalize_by_mean(new)
        self.fisher = online_fisher(self.fisher, new, self.config.gamma)
        self.anchor = {n: p.detach().clone().float() for n, p in self.params.items()}
        record = {"stage": stage, "fisher_samples": len(sample), "raw_fisher_mean": raw_mean,
                  "fisher_max": max(float(f.max()) for f in self.fisher.values())}
        self.log.append(record)
        logger.info("EWC after stage %d: %s", stage, record)

    # -- state ------------------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        return {"fisher": list(self.log)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.anchor is None:
            return {}, {"diagnostics": self.diagnostics()}
        tensors = {f"anchor/{n}": t.detach().cpu().contiguous() for n, t in self.anchor.items()}
        tensors.update({f"fisher/{n}": t.detach().cpu().contiguous() for n, t in self.fisher.items()})
        return tensors, {"diagnostics": self.diagnostics()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.log = list(meta.get("diagnostics", {}).get("fisher", []))
        anchor = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("anchor/")}
        fisher = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("fisher/")}
        if set(anchor) != set(fisher):
            raise KeyError("EWC state: anchor and Fisher cover different parameters")
        self.anchor, self.fisher = (anchor, fisher) if anchor else (None, None)
