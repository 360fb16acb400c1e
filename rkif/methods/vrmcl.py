"""VR-MCL on LoRA: first-order meta-continual learning with a STORM variance-reduced meta-gradient.

Wu et al., "Meta Continual Learning Revisited: Implicitly Enhancing Online Hessian Approximation via
Variance Reduction", ICLR 2024. OUR ADAPTATION to LoRA language models (the paper and its code are
online vision CL; no LLM implementation exists, R-KIF's T5 version is unreleased): theta = the LoRA
parameters; a 2% class-balanced replay memory of every finished task (``MemoryMethod``, as
LoRAReplay). At every optimizer step b of task k > 1, with the current batch B_b (every micro-batch
of the step) and a replay batch R_b drawn uniformly from the memory, eps_b = B_b U R_b:

1. inner loop from theta_b(0) = theta_b: K SGD steps theta_b(q) = theta_b(q-1) - alpha grad L(theta_b(q-1); B_b);
   the first inner gradient is the one the Trainer accumulated (clipped to ``max_grad_norm``); the
   later ones (and all of them at theta_{b-1}) are recomputed on B_b and clipped the same way;
2. first-order meta-gradient (``first_order_meta_gradient``): g(theta_b; eps_b) = mean_q grad L(theta_b(q); eps_b)
   (``meta_loss="mean"``, the paper's meta-loss averaged over the inner steps; ``"last"``: q = K only),
   with theta_b(q) treated as theta_b + const (no second derivatives);
3. STORM (``storm``): ghat_b = g(theta_b; eps_b) + r (ghat_{b-1} - g(theta_{b-1}; eps_b)), where
   g(theta_{b-1}; eps_b) reruns steps 1-2 on the SAME batches from a detached copy of the previous
   iterate; ghat_b is written into ``p.grad`` (``on_pre_optimizer_step``) and the Trainer's optimizer applies it.

The two evaluations of step b share their dropout masks (each forward runs under a seed fixed by
(run seed, step, role), in a forked RNG, so the training RNG stream is untouched). Task 1 (empty
memory) trains plainly. ghat_{b-1} and theta_{b-1} are kept across tasks (``keep_momentum``, as the
official code never resets its momentum). Hooks: ``extra_loss`` (records each micro-batch's inputs
and adds nothing), ``on_train_begin``, ``on_pre_optimizer_step``, ``after_task`` (memory).

Defaults: K = 1, alpha = the run's lr, r = 0.25 (reported for the paper, secondary source; the README's
``--s_momentum`` is 0.15), replay batch = as many examples as the current batch (official: 32 + 32).
Deviations from the official code: a fixed scalar inner lr instead of the learnable per-parameter
alpha; first order instead of ``--second_order``; the outer step is the Trainer's optimizer (AdamW
with its schedule) instead of SGD at ``s_lr``; replayed samples weigh as much as current ones
(official 0.5); inner gradients are norm-clipped like the Trainer's (official: elementwise clamp);
ghat is clipped to ``max_grad_norm`` when written (``clip_update``; the momentum keeps the unclipped
value); the buffer is the class-balanced 2% memory, not a reservoir. Cost per step of task k > 1:
the Trainer's forward/backward plus K - 1 inner and K (or 1) meta forward/backwards on eps_b, twice
that again for theta_{b-1} when r > 0. Distributed: the extra forwards run on the unwrapped
backbone (``torch.func.functional_call``) and every extra gradient is all-reduced (mean) by hand.
Mixed precision: the extra forwards run under the accelerator's autocast; under fp16 their gradients
are taken without loss scaling (prefer bf16). The Trainer's logged grad_norm is that of the raw
gradient, not of ghat.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.func import functional_call

from rkif.checks import AT_LEAST_ONE, NON_NEGATIVE_INT, POSITIVE, Rule
from rkif.data import Example, Task
from rkif.methods.base import MemoryMethod, MethodConfig, check_choices
from rkif.methods.registry import register

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
# grad_fn(theta, batches, clip, seed) -> mean gradient of the batches' losses at theta
GradFn = Callable[[Tensors, list, bool, int], Tensors]


@dataclass
class VRMCLConfig(MethodConfig):
    inner_steps: int = 1                 # K: inner SGD steps on the current batch
    inner_lr: float | None = None        # alpha; None = the run's lr
    r: float = 0.25                      # STORM ratio (paper r; official --s_momentum)
    meta_loss: str = "mean"              # mean over the K adapted iterates (paper) | last (q = K only)
    replay_batch_size: int = 0           # replay examples per process and step; 0 = batch_size * grad_accum
    keep_momentum: bool = True           # carry ghat and theta_{b-1} across tasks (official)
    clip_update: bool = True             # clip the ghat written into .grad to max_grad_norm

    method: ClassVar[str] = "vrmcl"

    def check(self) -> None:
        super().check()
        check_choices(self.method, self, {"meta_loss": ("mean", "last")})
        self.check_ranges({"inner_steps": AT_LEAST_ONE, "inner_lr": POSITIVE, "replay_batch_size": NON_NEGATIVE_INT,
                           "r": Rule(lambda v: 0 <= v < 1, "expected 0 <= r < 1")})


# -- equations ---------------------------------------------------------------------------------------
def first_order_meta_gradient(grad_fn: GradFn, theta: Tensors, current: list, eps: list, inner_lr: float,
                              inner_steps: int = 1, average: bool = True, first_inner_grad: Tensors | None = None,
                              seed: int = 0) -> Tensors:
    """First-order g(theta; eps): K inner SGD steps on ``current`` from theta, then the gradient of the loss
    on ``eps`` at the adapted iterates, averaged over q = 1..K (``average``) or at q = K (VR-MCL's
    meta-loss, first order). ``first_inner_grad`` replaces the first inner gradient (the Trainer's, at theta)."""
    fast = {n: t.detach() for n, t in theta.items()}
    metas = []
    for q in range(inner_steps):
        reuse = q == 0 and first_inner_grad is not None
        g_in = first_inner_grad if reuse else grad_fn(fast, current, True, seed + 2 * q)
        fast = {n: fast[n] - inner_lr * g_in[n] for n in fast}
        if average or q == inner_steps - 1:
            metas.append(grad_fn(fast, eps, False, seed + 2 * q + 1))
    return {n: sum(m[n] for m in metas) / len(metas) for n in fast}


def storm(g_cur: Tensors, g_prev: Tensors | None, ghat_prev: Tensors | None, r: float) -> Tensors:
    """STORM estimate ghat_b = g(theta_b; eps_b) + r (ghat_{b-1} - g(theta_{b-1}; eps_b)) (VR-MCL's update);
    plain g(theta_b; eps_b) when r = 0 or there is no previous estimate."""
    if r == 0 or g_prev is None or ghat_prev is None:
        return {n: g.clone() for n, g in g_cur.items()}
    return {n: g_cur[n] + r * (ghat_prev[n] - g_prev[n]) for n in g_cur}


def _clip_(grads: Tensors, max_norm: float) -> None:
    """In place: scale the tensors so their joint L2 norm is at most ``max_norm`` (as clip_grad_norm_)."""
    if max_norm > 0:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(scale.to(g.dtype))


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Run a block under a fixed RNG seed without disturbing the surrounding RNG stream."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@register
class VRMCL(MemoryMethod):
    name = "vrmcl"
    config_class = VRMCLConfig

    def __init__(self, config: VRMCLConfig, backbone, run):
        super().__init__(config, backbone, run)
        self.stage = 0
        self.active = False
        self.current: list[dict] = []
        self.ghat: Tensors | None = None          # ghat_{b-1}
        self.prev: Tensors | None = None          # theta_{b-1}, detached copy
        self.log: list[dict] = []

    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        self.stage = stage
        return train

    def on_train_begin(self, trainer) -> None:
        self.trainer = trainer
        self.params = self.backbone.trainable_parameters()
        self.current = []
        if not self.config.keep_momentum or (self.ghat is not None and set(self.ghat) != set(self.params)):
            self.ghat = self.prev = None
        if self.ghat is not None:                                  # e.g. loaded on CPU
            self.ghat = {n: t.to(self.params[n].device) for n, t in self.ghat.items()}
            self.prev = {n: t.to(self.params[n].device, self.params[n].dtype) for n, t in self.prev.items()}
        self.active = len(self.memory) > 0                        # task 1: no memory, plain training
        self.pool = self.memory.examples()
        self.rng = torch.Generator().manual_seed(self.run.seed * 1000 + self.stage)
        self.record = {"stage": self.stage, "meta_steps": 0, "storm_steps": 0}

    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        if self.active and torch.is_grad_enabled():
            self.current.append(dict(inputs))                      # this step's micro-batches (no copy)
        return {}

    # -- gradients on the unwrapped backbone ---------------------------------------------------------
    def _grad(self, theta: Tensors, batches: list[dict], clip: bool, seed: int) -> Tensors:
        """Mean over ``batches`` of grad L at theta (all-reduced over processes; clipped if ``clip``)."""
        leaves = {n: t.detach().requires_grad_() for n, t in theta.items()}
        total = {n: torch.zeros_like(t) for n, t in leaves.items()}
        device = next(iter(leaves.values())).device
        with _seeded(seed, device), self.trainer.accelerator.autocast():
            for batch in batches:
                loss = functional_call(self.backbone, leaves, args=(), kwargs=batch)["loss"] / len(batches)
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                for n, g in zip(leaves, grads):
                    if g is not None:
                        total[n] += g.to(total[n].dtype)
        world = self.trainer.args.world_size
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = torch.cat([t.flatten() for t in total.values()])
            torch.distributed.all_reduce(flat)
            flat /= world
            total = dict(zip(total, flat.split([t.numel() for t in total.values()])))
            total = {n: t.view_as(theta[n]) for n, t in total.items()}
        if clip:
            _clip_(total, self.trainer.args.max_grad_norm)
        return total

    def _replay(self, trainer) -> list[dict]:
        """This process's share of a replay batch drawn uniformly from the pooled memory, as micro-batches."""
        cfg, run = self.config, self.run
        per_rank = cfg.replay_batch_size or run.batch_size * run.grad_accum
        world, rank = trainer.args.world_size, trainer.args.process_index
        idx = torch.randint(len(self.pool), (per_rank * world,), generator=self.rng).tolist()[rank::world]
        mine = [self.pool[i] for i in idx]
        device = trainer.args.device
        return [{k: v.to(device) for k, v in self.backbone.collate(mine[i:i + run.batch_size]).items()}
                for i in range(0, len(mine), run.batch_size)]

    # -- one optimizer step ------------------------------------------------------------------------
    def on_pre_optimizer_step(self, trainer) -> None:
        if not self.active:
            return
        cfg = self.config
        current, self.current = self.current, []
        if not current:
            raise RuntimeError("vrmcl: no micro-batch was recorded for this step (extra_loss not called?)")
        eps = current + self._replay(trainer)
        inner_lr = self.run.lr if cfg.inner_lr is None else cfg.inner_lr
        theta = {n: p.detach().clone() for n, p in self.params.items()}
        first = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in self.params.items()}
        # one seed per (run, stage, step): both evaluations of this step draw the same dropout masks
        seed = ((self.run.seed * 1000 + self.stage) * 1_000_000 + trainer.state.global_step) * 2 * cfg.inner_steps
        kw = dict(inner_steps=cfg.inner_steps, average=cfg.meta_loss == "mean", seed=seed)
        g = first_order_meta_gradient(self._grad, theta, current, eps, inner_lr, first_inner_grad=first, **kw)
        g_prev = None
        if cfg.r > 0 and self.prev is not None and self.ghat is not None:
            g_prev = first_order_meta_gradient(self._grad, self.prev, current, eps, inner_lr, **kw)
            self.record["storm_steps"] += 1
        self.ghat = storm(g, g_prev, self.ghat, cfg.r)
        self.prev = theta
        update = {n: t.clone() for n, t in self.ghat.items()}
        if cfg.clip_update:
            _clip_(update, trainer.args.max_grad_norm)
        for n, p in self.params.items():
            if p.grad is None:
                p.grad = update[n].to(p.dtype)
            else:
                p.grad.copy_(update[n])
        self.record["meta_steps"] += 1

    def on_train_end(self, trainer) -> None:
        if self.active:
            self.log.append(dict(self.record))
        self.active, self.current, self.trainer = False, [], None

    # -- state -------------------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        return {"meta": list(self.log)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state_dict()
        if self.ghat is not None:
            for key, bank in (("ghat", self.ghat), ("prev", self.prev)):
                tensors.update({f"{key}/{n}": t.detach().cpu().contiguous() for n, t in bank.items()})
        meta.update(diagnostics=self.diagnostics(), stage=self.stage)
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state_dict(tensors, meta)
        self.log = list(meta.get("diagnostics", {}).get("meta", []))
        self.stage = int(meta.get("stage", 0))
        banks = {key: {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith(key + "/")}
                 for key in ("ghat", "prev")}
        self.ghat, self.prev = (banks["ghat"], banks["prev"]) if banks["ghat"] else (None, None)
