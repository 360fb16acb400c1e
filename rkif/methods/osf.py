"""OSF: orthogonal-subspace fine-tuning, peft's continual-learning tuner, wrapped (not rewritten).

Paper: Nayak, Killamsetty, Han, Bhandwaldar, Chanda, Xu, Wang, Pareja, Silkin, Eyceoz, Srivastava,
"Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning" (arXiv 2504.07097,
2025). peft's ``OSFConfig``/``OSFModel`` (``peft.tuners.osf``) implements it: each target weight is split
by SVD into W = U_high S_high V_high + U_low S_low V_low; the top ``effective_rank`` directions (the
"high" subspace) are frozen and the low factors are trained, with tensor hooks on U_low and V_low that
project their gradients off the high subspace. Between tasks peft's documentation says to recompute
the SVD on the updated weights and grow the preserved rank, by re-wrapping the merged model.

What this method does (hooks):

* ``peft_config`` (class): an ``OSFConfig`` on the paper's LoRA targets (``lora_targets`` when set,
  else encoder ``query,value``, seq2seq ``q,v``, causal ``q_proj,v_proj``) preserving the first
  stage's fraction of each target's min(out, in) singular directions.
* ``stages``: records the number of stages K (the default one-task-per-stage split).
* ``before_task`` (stage j > 0, ``recompute=True``): peft's ``merge_and_unload`` folds the trained
  subspace into the weights, then ``get_peft_model`` re-decomposes them with the stage's preserved
  fraction; the new factors replace ``backbone.model`` (same parameter names, so checkpoints fit).
* ``on_train_begin``: runs the stage at the method's ``lr`` (rescales the optimizer and its schedule).
* ``state_dict``/``load_state_dict``: the preserved rank and, once a merge happened, the merged weights
  of the targets (frozen base weights that ``Backbone.adapter_state`` does not save); loading re-wraps
  the model with them so that the adapter state (U_low, S_low, V_low) loads into the right shapes.

Defaults: ``schedule="progressive"`` with ``first_fraction=0``, the capacity budget that peft's
documentation gives for a known sequence of n tasks (task t freezes (t-1)/n): stage j (0-based) of K
preserves j/K of each target's directions, so stage 1 trains all but one direction (peft needs at
least one preserved direction) and the pretrained directions are not protected during it;
``recompute=True``; ``lr=1e-4`` whatever the run's lr (``lr=0`` keeps the run's): the upper end of
the 1e-5 to 1e-4 that peft's documentation advises for OSF, which trains full-rank updates of q and
v rather than a rank-8 LoRA. ``benchmarks/heldout_select.py`` confirmed it on data held out from
the training split, never dev/test (Standard order 1, MiniLM, 400 train / 100 held out per task, 1
epoch; ``benchmarks/results/heldout/osf_lr.json``): held-out OP 45.0 / 48.5 / 52.8 / 49.8 / 47.5 for
lr = 1e-5 / 3e-5 / 1e-4 / 3e-4 / 1e-3.

Deviations and simplifications: the paper (read through secondary summaries) picks each layer's
preserved rank adaptively from its input-output cosine similarity (between a minimum and a target
retention ratio); peft has no such selection, so one fraction holds for every target in a stage. The
paper adapts every weight matrix (constrained full fine-tuning); here only the LoRA baselines' q and v
targets are adapted, so the comparison isolates the update rule. The projection is peft's, on
gradients: AdamW's per-coordinate scaling (and weight decay) then moves U_low/V_low slightly out of
the projected space, as in peft. On resume the frozen SVD buffers are recomputed from the saved
weights (deterministic up to floating-point rounding, and invariant to the SVD's sign ambiguity).
Checkpoints are matrix-sized, not LoRA-sized: the trainable factors of every target
(``Backbone.adapter_state``: U_low, S_low, V_low; about twice the targets' size in stage 1) and, after
the first merge, the targets' weights (this method's state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft import OSFConfig, get_peft_model
from peft.tuners.osf import OSFLayer

from rkif.checks import Rule
from rkif.data import Example, Task
from rkif.methods.base import Method, MethodConfig, check_choices
from rkif.methods.registry import register

logger = logging.getLogger(__name__)

FAMILY_TARGETS = {"encoder": ["query", "value"], "seq2seq": ["q", "v"], "causal": ["q_proj", "v_proj"]}
SCHEDULES = ("progressive", "fixed")


@dataclass
class OSFMethodConfig(MethodConfig):
    schedule: str = "progressive"     # progressive: preserved fraction grows f0 -> 1 over the stages | fixed: f0
    first_fraction: float = 0.0       # f0: preserved fraction of min(out, in) in stage 1 (0 = one direction)
    recompute: bool = True            # merge and re-run the SVD between tasks (False: one decomposition)
    lr: float = 1e-4                  # learning rate of the OSF factors (peft: 1e-5 to 1e-4); 0 = the run's lr

    method: ClassVar[str] = "osf"

    def check(self) -> None:
        super().check()
        check_choices(self.method, self, {"schedule": tuple(SCHEDULES)})
        self.check_ranges({"first_fraction": Rule(lambda v: 0 <= v < 1, "expected 0 <= f0 < 1"),
                           "lr": Rule(lambda v: v >= 0, "expected a learning rate >= 0 (0 = the run's)")})

    def check_run(self, run) -> None:
        osf_targets(run.backbone)            # a family without default targets needs --lora-targets


def osf_targets(backbone_cfg) -> list[str]:
    """The modules OSF adapts: the backbone's LoRA targets, else q and v of the family."""
    if backbone_cfg.lora_targets:
        return list(backbone_cfg.lora_targets)
    if backbone_cfg.family not in FAMILY_TARGETS:
        raise ValueError(f"osf: no default targets for family {backbone_cfg.family!r}; set lora_targets")
    return list(FAMILY_TARGETS[backbone_cfg.family])


def preserved_fraction(stage: int, n_stages: int, first: float, schedule: str) -> float:
    """Fraction of each target's singular directions frozen in ``stage`` (0-based) of ``n_stages``.

    progressive: f_j = f0 + (1 - f0) j / K, peft's budget allocation for a known sequence of K tasks
    (with f0 = 0, task j+1 freezes j/K of the capacity); fixed: f_j = f0.
    """
    if schedule == "fixed":
        return first
    return first + (1.0 - first) * stage / n_stages


def peft_effective_rank(fraction: float) -> int | float:
    """``OSFConfig.effective_rank`` for a preserved fraction.

    peft reads a float in (0, 1] per target as ``int(fraction * min(out, in))``; a fraction of 0 becomes
    the integer 1, the smallest preserved rank peft accepts.
    """
    return float(fraction) if fraction > 0 else 1


def make_osf_config(targets: list[str], effective_rank: int | float, task_type: str | None = None) -> OSFConfig:
    return OSFConfig(target_modules=list(targets), effective_rank=effective_rank, task_type=task_type)


@register
class OSF(Method):
    name = "osf"
    config_class = OSFMethodConfig

    def __init__(self, config: OSFMethodConfig, backbone, run):
        super().__init__(config, backbone, run)
        self.targets = osf_targets(backbone.config)
        self.n_stages: int | None = None
        self.effective_rank = peft_effective_rank(preserved_fraction(0, 1, config.first_fraction, config.schedule))
        self.merges = 0
        self.ranks: list[int | float] = []          # effective_rank of each trained stage
        self.trainable: list[int] = []              # trainable scalars of each trained stage

    @classmethod
    def peft_config(cls, config: OSFMethodConfig, backbone) -> OSFConfig:
        rank = peft_effective_rank(preserved_fraction(0, 1, config.first_fraction, config.schedule))
        return make_osf_config(osf_targets(backbone), rank)

    # -- peft's between-task procedure ----------------------------------------------------------
    def osf_layers(self) -> dict[str, OSFLayer]:
        """The OSF-wrapped modules, by their path in the underlying transformers model."""
        base = self.backbone.model.get_base_model()
        return {n: m for n, m in base.named_modules() if isinstance(m, OSFLayer)}

    def target_weights(self) -> dict[str, torch.Tensor]:
        """The (possibly merged) base weights of every target, as plain CPU tensors."""
        return {f"{n}.weight": m.get_base_layer().weight.detach().cpu().contiguous().clone()
                for n, m in self.osf_layers().items()}

    def rewrap(self, effective_rank: int | float, merge: bool, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Unwrap the model (merging the trained subspace or not), set ``weights``, wrap it with a new SVD."""
        old = self.backbone.model
        task_type = next(iter(old.peft_config.values())).task_type
        base = old.merge_and_unload() if merge else old.unload()
        if weights:
            params = dict(base.named_parameters())
            missing = sorted(set(weights) - set(params))
            if missing:
                raise KeyError(f"osf state has weights this model lacks: {missing[:3]}")
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        self.backbone.model = get_peft_model(base, make_osf_config(self.targets, effective_rank, task_type))
        self.effective_rank = effective_rank

    # -- hooks ----------------------------------------------------------------------------------
    def stages(self, tasks: list[Task]) -> list[list[Task]]:
        self.n_stages = len(tasks)
        return super().stages(tasks)

    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        if stage > 0 and self.config.recompute:
            if self.n_stages is None:
                raise RuntimeError("osf: stages() must be called before the tasks are trained")
            fraction = preserved_fraction(stage, self.n_stages, self.config.first_fraction, self.config.schedule)
            self.rewrap(peft_effective_rank(fraction), merge=True)
            self.merges += 1
        self.ranks.append(self.effective_rank)
        self.trainable.append(sum(p.numel() for p in self.backbone.trainable_parameters().values()))
        logger.info("osf stage %d: effective_rank %s, %d trainable scalars", stage + 1, self.effective_rank,
                    self.trainable[-1])
        return train

    def on_train_begin(self, trainer) -> None:
        """Run the stage at ``config.lr``: scale the optimizer's groups and the schedule's base rates."""
        if not self.config.lr or trainer.args.learning_rate == self.config.lr:
            return
        ratio = self.config.lr / trainer.args.learning_rate
        for group in trainer.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        scheduler = trainer.lr_scheduler
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = self.target_weights() if self.merges else {}
        meta = {"effective_rank": self.effective_rank, "merges": self.merges, "ranks": list(self.ranks),
                "trainable": list(self.trainable)}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Re-wrap with the saved weights and rank, so the adapter state that follows fits the layers."""
        self.merges, self.ranks, self.trainable = meta["merges"], list(meta["ranks"]), list(meta["trainable"])
        if tensors or meta["effective_rank"] != self.effective_rank:
            self.rewrap(meta["effective_rank"], merge=False, weights=tensors)

    def diagnostics(self) -> dict:
        return {"effective_rank": list(self.ranks), "trainable_parameters": list(self.trainable),
                "merges": self.merges, "lr": self.config.lr or self.run.lr}
