"""Recurrent-KIF (Feng et al., ACL 2025): recurrent knowledge identification and fusion.

While task k > 1 trains, every Q optimizer steps close one round b (Algorithm 1):

1. inner loop: the Trainer's own Q steps on the new task from the anchor theta_b; after each step
   the importance Ibar = |w g| (Eq. 3) is smoothed into I_in (Eq. 4); tau_in = theta_b(Q) - theta_b (Eq. 2);
2. outer loop (``_outer_loop``): M steps on batches drawn from the memory of all earlier tasks,
   their importance Ibar_out (Eq. 6, the mean of the M steps' |w g|) smoothed across rounds into
   I_out (Eq. 7); tau_out = theta_b(M) - theta_b(Q) (Eq. 5);
3. masks: the top ``top_fraction`` of I_in and of I_out (Eq. 8);
4. fusion: theta_{b+1} = theta_b + m_in * tau_in + m_out * tau_out (Eq. 9), written into the model.

Task 1 (any task that starts with an empty memory) trains plainly. Hooks used: ``on_train_begin``
(anchor, trackers, outer optimizer), ``on_pre_optimizer_step`` / ``on_optimizer_step`` (inner
importance, pre- or post-step weights), ``on_step_end`` (close a round every Q steps),
``on_train_end`` (fuse the partial last round), ``after_task`` (memory). Rounds count optimizer
steps across epoch boundaries ("multi-round fusion"); ``rounds="single"`` fuses once per task
(single-step fusion).

Deviations and choices, each a switch: importance uses the weights at which the gradient was
taken (``importance_weights="pre_step"``; the release uses post-step weights); with M > 1,
Ibar_out averages the M outer steps; the steps left after the last full round are fused as a
shorter round (``partial_round="fuse"``; the release leaves them unfused: ``"keep"``); the outer
loop has its own AdamW, fresh each task, at ``outer_lr`` (default: the Trainer's lr, since the paper
uses one lr for both loops; the release steps the inner optimizer: ``outer_optimizer="shared"``);
one outer step is one global batch of ``outer_batch_size`` memory examples, split over DDP ranks.
Under FSDP2 (parameters sharded over processes, ``rkif.sharding``) every step above acts on this
process's shard of each parameter, in place; the Eq. 8 thresholds are the exact global ones (one
all-reduce of a 256-bin histogram per radix pass, 4 per threshold) and the round's totals (norms,
means, region fractions) are summed over the shards, so a round equals the unsharded one.
Defaults: Q = 8, M = 4 (the paper's reported full-model setting, Table 8: 8/4), a1 = a2 = 0.55,
top 20 %, global threshold. The release variant is the
preset ``rkif-release``; every ablation of Tables 2 and 10 is a preset below.

Controls (not in the paper; each a switch, default off): ``mask_source="random"`` replaces each
importance mask by a random one with the same number of ones per threshold group, drawn anew each
round from a generator seeded by (run seed, task, round), apart from the memory draws;
``masks_on="in"`` masks tau_in only (m_out = 1), ``"out"`` tau_out only (m_in = 1);
``outer_lr_schedule="trainer"`` scales the outer lr each round by the factor the Trainer's scheduler
holds when the round closes (the lr of the next inner step, which the release's shared optimizer
uses; after a task's last step a linear decay gives 0), against ``"constant"`` (the default).
``threshold_scope="per_tensor"`` takes Eq. 8's threshold in each tensor. Importance and masks in the
space of the LoRA product BA are not offered: ``rkif/kif/fusion.py`` says why.

``rkif run`` drives this class through ``ContinualTrainer``; ``rkif.RecurrentKIFCallback``
(``rkif/callback.py``) drives the same class in a user's own Trainer, giving it the Trainer's model
for a backbone (trainable parameters, ``collate``) and the user's memory (``examples()``, ``len``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from rkif.checks import AT_LEAST_ONE, EMA_WEIGHT, POSITIVE, Rule, fail
from rkif.config import process_count
from rkif.data import Example, Task
from rkif.kif import fusion
from rkif.kif.importance import MeanImportance, make_tracker, outer_ema, step_scores
from rkif.kif.masks import binary_masks, random_masks_like
from rkif.methods.base import MemoryMethod, MethodConfig, check_choices
from rkif.methods.registry import register, register_preset
from rkif.sharding import WHOLE, Sharding, local, sharding_of


@dataclass
class RKIFConfig(MethodConfig):
    inner_steps: int = 8                 # Q, optimizer steps per round
    outer_steps: int = 4                 # M, memory steps per round
    outer_batch_size: int = 8            # global batch of one outer step
    outer_optimizer: str = "adamw"       # adamw | sgd | shared (the Trainer's optimizer, as the release)
    outer_lr: float | None = None        # None: the Trainer's (inner) lr, one lr for both loops as in the paper
    alpha_in: float = 0.55               # a1 of Eq. 4 (weight of the OLD value)
    alpha_out: float = 0.55              # a2 of Eq. 7 (weight of the NEW value)
    top_fraction: float = 0.2            # Eq. 8
    score: str = "weight_grad"           # weight_grad = |w g| (Eq. 3) | grad = |g|
    smoothing: str = "ema"               # inner: ema (Eq. 4) | none (last step) | su (release S*U)
    outer_smoothing: str = "eq7"         # eq7 (Eq. 6-7) | none (this round only) | running (release)
    su_beta: float = 0.85                # release S/U smoothing (weight of the OLD value)
    importance_weights: str = "pre_step" # pre_step | post_step (release)
    dynamic_outer: bool = True           # False = "-DIE": I_out of the task's first round, frozen
    fusion: str = "mask"                 # mask (Eq. 9) | sum (-KI) | global (+GM) | adaptive | release
    share: bool = True                   # False = "-Share": m_in = 0 where m_out = 1 too
    threshold: str = "top"               # top (exact, >=) | quantile (linear, strict >, release)
    threshold_scope: str = "global"      # global | per_tensor
    adaptive_temperature: float = 1.0
    rounds: str = "multi"                # multi | single (one fusion at the end of each task)
    partial_round: str = "fuse"          # fuse | keep: steps left after the last full round
    mask_source: str = "importance"      # importance (Eq. 8) | random (same count per threshold group; control)
    masks_on: str = "both"               # both | in (m_out = 1) | out (m_in = 1) (controls)
    outer_lr_schedule: str = "constant"  # constant | trainer (times the Trainer's current lr factor, each round)

    method: ClassVar[str] = "rkif"

    def check(self) -> None:
        super().check()
        check_choices(self.method, self, {
            "outer_optimizer": ("adamw", "sgd", "shared"), "score": ("weight_grad", "grad"),
            "smoothing": ("ema", "none", "su"), "outer_smoothing": ("eq7", "none", "running"),
            "importance_weights": ("pre_step", "post_step"),
            "fusion": ("mask", "sum", "global", "adaptive", "release"), "threshold": ("top", "quantile"),
            "threshold_scope": ("global", "per_tensor"), "rounds": ("multi", "single"),
            "partial_round": ("fuse", "keep"), "mask_source": ("importance", "random"),
            "masks_on": ("both", "in", "out"), "outer_lr_schedule": ("constant", "trainer")})
        self.check_ranges({
            "inner_steps": AT_LEAST_ONE, "outer_steps": AT_LEAST_ONE, "outer_batch_size": AT_LEAST_ONE,
            "outer_lr": POSITIVE, "alpha_in": EMA_WEIGHT, "su_beta": EMA_WEIGHT,
            "alpha_out": Rule(lambda v: 0 <= v <= 1, "expected a number in [0, 1] (the weight of the new value)"),
            "top_fraction": Rule(lambda v: 0 < v <= 1, "expected a fraction in (0, 1] of the scalars kept"),
            "adaptive_temperature": POSITIVE})
        self.check_unused({      # (inner_steps and outer_lr stay free: shared settings of every variant in a grid)
            "alpha_in": (self.smoothing == "ema", "with smoothing=ema"),
            "su_beta": (self.smoothing == "su", "with smoothing=su"),
            "alpha_out": (self.outer_smoothing == "eq7", "with outer_smoothing=eq7"),
            "adaptive_temperature": (self.fusion == "adaptive", "with fusion=adaptive"),
            "partial_round": (self.rounds == "multi", "with rounds=multi")})
        _check_controls(self)

    def check_run(self, run) -> None:
        """One outer batch is split over the processes (``_memory_batch``): before the model loads."""
        self.check_processes(process_count())

    def check_processes(self, processes: int) -> None:
        """Refuse an outer batch that the processes cannot share evenly."""
        if self.outer_batch_size % processes:
            raise fail(self.label("outer_batch_size"), self.outer_batch_size,
                       f"expected a multiple of the number of processes ({processes})")


@register
class RecurrentKIF(MemoryMethod):
    name = "rkif"
    config_class = RKIFConfig
    parameter_access = "shards"           # FSDP2: everything on local shards, totals and thresholds over all

    def __init__(self, config: RKIFConfig, backbone, run):
        super().__init__(config, backbone, run)
        self.rounds_log: list[dict] = []
        self.shards = WHOLE
        self.active = False
        self.stage = 0
        self.timing = {"bookkeeping": 0.0, "outer": 0.0}

    # -- task boundaries --------------------------------------------------------------------------
    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        self.stage = stage
        return train

    def on_train_begin(self, trainer) -> None:
        cfg = self.config
        self.active = len(self.memory) > 0          # task 1: no memory, plain training
        if not self.active:
            return
        cfg.check_processes(trainer.args.world_size)    # again: a Trainer built outside rkif (RecurrentKIFCallback)
        self.params = self.backbone.trainable_parameters()
        self.shards = sharding_of(trainer.model_wrapped)
        if self.shards.sharded and self.config.mask_source == "random":   # counts and draws would be per shard
            raise ValueError("rkif option mask_source=random does not run on sharded parameters (FSDP): its draws "
                             "would follow each shard's importance count; use it under DDP or one process")
        self.anchor = self._snapshot()
        self.inner = make_tracker(cfg.smoothing, cfg.alpha_in, cfg.su_beta)
        running = cfg.outer_smoothing == "running"
        self.outer_step_scores = make_tracker(cfg.smoothing, cfg.alpha_in, cfg.su_beta) if running else MeanImportance()
        self.i_out: dict[str, torch.Tensor] | None = None
        self.prev_mask_out = None
        self.steps_in_round = 0
        self.round = 0
        self.outer_opt = self._make_outer_optimizer(trainer)
        self.rng = torch.Generator().manual_seed(self.run.seed * 1000 + self.stage)

    def _make_outer_optimizer(self, trainer):
        params = list(self.params.values())
        if self.config.outer_optimizer == "shared":
            return trainer.optimizer
        lr = trainer.args.learning_rate if self.config.outer_lr is None else self.config.outer_lr
        self.outer_base_lr = lr
        if self.config.outer_optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    # -- inner loop: importance after every optimizer step (Eq. 3-4) -------------------------------
    def _track_inner(self, trainer, when: str) -> None:
        if self.active and self.config.importance_weights == when:
            t0 = time.perf_counter()
            self.inner.update(step_scores(self.params, self.config.score))
            self.timing["bookkeeping"] += time.perf_counter() - t0

    def on_pre_optimizer_step(self, trainer) -> None:
        self._track_inner(trainer, "pre_step")

    def on_optimizer_step(self, trainer) -> None:
        self._track_inner(trainer, "post_step")

    def on_step_end(self, trainer) -> None:
        if not self.active:
            return
        self.steps_in_round += 1
        if self.config.rounds == "multi" and self.steps_in_round == self.config.inner_steps:
            self._close_round(trainer)

    def on_train_end(self, trainer) -> None:
        if self.active and self.steps_in_round > 0 and (
                self.config.rounds == "single" or self.config.partial_round == "fuse"):
            self._close_round(trainer)
        self.active = False

    # -- one round: outer loop, masks, fusion ------------------------------------------------------
    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: local(p).detach().clone() for n, p in self.params.items()}

    def _memory_batch(self, trainer) -> dict[str, torch.Tensor]:
        """This rank's share of a global outer batch drawn uniformly from the pooled memory."""
        pool = self.memory.examples()
        idx = torch.randint(len(pool), (self.config.outer_batch_size,), generator=self.rng).tolist()
        rank, world = trainer.args.process_index, trainer.args.world_size
        batch = self.backbone.collate([pool[i] for i in idx[rank::world]])
        return {k: v.to(trainer.args.device) for k, v in batch.items()}

    def _outer_loop(self, trainer) -> dict[str, torch.Tensor]:
        """M optimizer steps on memory batches from theta_b(Q); returns Ibar_out of this round (Eq. 6)."""
        cfg, model, acc = self.config, trainer.model_wrapped, trainer.accelerator
        if cfg.outer_smoothing != "running":
            self.outer_step_scores.reset()
        if cfg.outer_lr_schedule == "trainer":
            for group in self.outer_opt.param_groups:
                group["lr"] = self.outer_base_lr * lr_factor(trainer.optimizer)
        model.train()
        for _ in range(cfg.outer_steps):
            loss = model(**self._memory_batch(trainer))["loss"]
            acc.backward(loss)
            if acc.scaler is not None:                 # fp16: importance from unscaled gradients
                inv = 1.0 / acc.scaler.get_scale()
                for p in self.params.values():
                    if p.grad is not None:
                        p.grad.mul_(inv)
            if trainer.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), trainer.args.max_grad_norm)
            if cfg.importance_weights == "pre_step":
                self.outer_step_scores.update(step_scores(self.params, cfg.score))
            self._outer_opt_step()
            if cfg.importance_weights == "post_step":
                self.outer_step_scores.update(step_scores(self.params, cfg.score))
            model.zero_grad(set_to_none=True)
        return self.outer_step_scores.value

    def _outer_opt_step(self) -> None:
        opt = self.outer_opt
        # the Trainer's AcceleratedOptimizer would apply its GradScaler again: step the inner torch one
        getattr(opt, "optimizer", opt).step()

    def _close_round(self, trainer) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        theta_q = self._snapshot()
        tau_in = fusion.task_vector(theta_q, self.anchor)                          # Eq. 2
        i_in = self.inner.value
        t1 = time.perf_counter()
        ibar_out = self._outer_loop(trainer)
        t2 = time.perf_counter()
        tau_out = fusion.task_vector(self._snapshot(), theta_q)                    # Eq. 5
        if self.i_out is None or cfg.dynamic_outer:
            if cfg.outer_smoothing == "eq7":
                self.i_out = outer_ema(self.i_out, ibar_out, cfg.alpha_out)        # Eq. 7
            else:
                self.i_out = {n: s.clone() for n, s in ibar_out.items()}
        generator = self._mask_generator() if cfg.mask_source == "random" else None
        m_in = self._masks(i_in, "in", generator)                                  # Eq. 8
        m_out = self._masks(self.i_out, "out", generator)
        if not cfg.share:
            m_in = fusion.drop_shared(m_in, m_out)
        fused, weights = self._fuse(tau_in, tau_out, i_in, m_in, m_out)
        # ||fused update|| / ||tau_in + tau_out|| (the unfused -KI update); above 1 if tau_in and tau_out partly cancel
        plain, kept = _norms([{n: tau_in[n] + tau_out[n] for n in tau_in}, fusion.task_vector(fused, self.anchor)],
                             self.shards)
        weights["update_kept"] = kept / plain if plain > 0 else 1.0
        with torch.no_grad():
            for n, p in self.params.items():
                local(p).copy_(fused[n])
        self._log_round(trainer, m_in, m_out, weights)
        self.anchor = {n: t.clone() for n, t in fused.items()}
        self.inner.reset()
        self.steps_in_round = 0
        self.round += 1
        self.timing["outer"] += t2 - t1
        self.timing["bookkeeping"] += (t1 - t0) + (time.perf_counter() - t2)

    def _masks(self, scores, which: str, generator) -> dict[str, torch.Tensor]:
        """Eq. 8's masks of one task vector; all ones where ``masks_on`` leaves it whole; random if asked."""
        cfg = self.config
        if cfg.masks_on not in ("both", which):
            return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        masks = binary_masks(scores, cfg.top_fraction, cfg.threshold, cfg.threshold_scope,
                             reduce=self.shards.reduce)        # sharded: thresholds over every process's shard
        if generator is not None:
            masks = random_masks_like(masks, generator, cfg.threshold_scope)
        return masks

    def _mask_generator(self) -> torch.Generator:
        """The random masks' generator of this round: seeded by (run seed, task, round), not the memory's."""
        seed = random.Random(f"{self.run.seed}:{self.stage}:{self.round}").getrandbits(63)
        return torch.Generator().manual_seed(seed)

    def _fuse(self, tau_in, tau_out, i_in, m_in, m_out) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The fused parameters and the mean weight each task vector got (for the round's log)."""
        cfg, anchor = self.config, self.anchor
        if cfg.fusion == "mask":
            fused = fusion.masked_fusion(anchor, tau_in, tau_out, m_in, m_out)    # Eq. 9
            return fused, _means(m_in, m_out, self.shards)
        if cfg.fusion == "sum":
            return fusion.sum_fusion(anchor, tau_in, tau_out), {"w_in_mean": 1.0, "w_out_mean": 1.0}
        if cfg.fusion == "global":
            w_in, w_out = fusion.global_weights(i_in, self.i_out, self.shards)
            fused = {n: anchor[n] + w_in * tau_in[n] + w_out * tau_out[n] for n in anchor}
            return fused, {"w_in_mean": w_in, "w_out_mean": w_out}
        if cfg.fusion == "adaptive":
            w_in, w_out = fusion.adaptive_weights(i_in, self.i_out, cfg.adaptive_temperature, self.shards)
        else:
            w_in, w_out = fusion.release_weights(m_in, m_out)
        fused = fusion.weighted_fusion(anchor, tau_in, tau_out, w_in, w_out)
        return fused, _means(w_in, w_out, self.shards)

    # -- diagnostics (Figure 5b / 8 analysis) -------------------------------------------------------
    def _log_round(self, trainer, m_in, m_out, weights: dict[str, float]) -> None:
        record = {"stage": self.stage, "round": self.round, "step": trainer.state.global_step,
                  **fusion.region_fractions(m_in, m_out, self.shards), **weights,
                  "outer_lr": self.outer_opt.param_groups[0]["lr"]}
        if self.prev_mask_out is not None:
            inter, selected = self.shards.sum([sum(int((m_out[n] & self.prev_mask_out[n]).sum()) for n in m_out),
                                               sum(int(m.sum()) for m in m_out.values())])
            record["mask_out_overlap"] = inter / max(1, selected)
            record["i_out_rank_corr"] = _rank_correlation(self.shards.gather_maps(self.prev_i_out),
                                                          self.shards.gather_maps(self.i_out), self.run.seed)
        self.prev_mask_out = m_out
        self.prev_i_out = {n: t.clone() for n, t in self.i_out.items()}
        self.rounds_log.append(record)
        trainer.log({**{f"rkif/{k}": v for k, v in record.items() if k not in ("stage", "round", "step")},
                     "rkif/round": record["round"] + 1})                  # rounds closed so far in this task

    def diagnostics(self) -> dict:
        return {"rounds": self.rounds_log, "seconds": dict(self.timing)}

    def state_dict(self):
        tensors, meta = super().state_dict()
        meta["diagnostics"] = self.diagnostics()
        return tensors, meta

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        self.rounds_log = meta["diagnostics"]["rounds"]
        self.timing = meta["diagnostics"]["seconds"]


def _check_controls(cfg: RKIFConfig) -> None:
    """Refuse a control that would do nothing, or drop a whole task vector, with these options."""
    if (cfg.mask_source != "importance" or cfg.masks_on != "both") and cfg.fusion not in ("mask", "release"):
        raise ValueError(f"rkif options mask_source={cfg.mask_source!r}, masks_on={cfg.masks_on!r} act on binary "
                         f"masks; fusion={cfg.fusion!r} uses none (choose fusion 'mask' or 'release')")
    if cfg.masks_on == "in" and not cfg.share:
        raise ValueError("rkif options masks_on='in' with share=False would drop all of tau_in (m_out = 1 everywhere)")
    if cfg.outer_lr_schedule == "trainer" and cfg.outer_optimizer == "shared":
        raise ValueError("rkif option outer_lr_schedule='trainer' is for outer_optimizer 'adamw' or 'sgd'; "
                         "'shared' steps the Trainer's optimizer, which follows its schedule already")


def lr_factor(optimizer) -> float:
    """The current lr of the first parameter group over its initial lr (set by torch's LR schedulers); 1 without one."""
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr")
    return 1.0 if not initial else group["lr"] / initial


def _means(w_in: dict[str, torch.Tensor], w_out: dict[str, torch.Tensor], shards: Sharding = WHOLE) -> dict:
    """Mean over every scalar (of every shard) of each {name: tensor} map; masks count as 0/1."""
    s_in, s_out, n = shards.sum([sum(float(t.float().sum()) for t in w_in.values()),
                                 sum(float(t.float().sum()) for t in w_out.values()),
                                 sum(t.numel() for t in w_in.values())])
    return {"w_in_mean": s_in / n, "w_out_mean": s_out / n}


def _norms(maps: list[dict[str, torch.Tensor]], shards: Sharding = WHOLE) -> list[float]:
    """L2 norm of each {name: tensor} map taken as one vector (over every shard)."""
    squares = shards.sum([sum(float(t.float().pow(2).sum()) for t in m.values()) for m in maps])
    return [s ** 0.5 for s in squares]


def _rank_correlation(a: dict, b: dict, seed: int, limit: int = 100_000) -> float:
    """Spearman correlation of two importance maps (on a fixed random sample of at most ``limit``).

    Sharded maps are gathered whole first (``Sharding.gather_maps``), so every process gets the same value.
    """
    x = torch.cat([a[n].flatten() for n in a])
    y = torch.cat([b[n].flatten() for n in a])
    if x.numel() > limit:
        idx = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:limit]
        x, y = x[idx], y[idx]
    rx = x.argsort().argsort().float()
    ry = y.argsort().argsort().float()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp(min=1e-12))


# The ablations of the paper's Table 2 and Table 10, and the authors' release, as named methods.
register_preset("rkif-die", "rkif", {"dynamic_outer": False})
register_preset("rkif-ki", "rkif", {"fusion": "sum"})
register_preset("rkif-gm", "rkif", {"fusion": "global"})
register_preset("rkif-adaptive", "rkif", {"fusion": "adaptive"})
register_preset("rkif-share", "rkif", {"share": False})
register_preset("rkif-grad", "rkif", {"score": "grad"})
register_preset("rkif-noema", "rkif", {"smoothing": "none", "outer_smoothing": "none"})
register_preset("rkif-single", "rkif", {"rounds": "single"})
register_preset("rkif-release", "rkif", {
    "smoothing": "su", "outer_smoothing": "running", "importance_weights": "post_step",
    "threshold": "quantile", "fusion": "release", "outer_optimizer": "shared", "partial_round": "keep"})
