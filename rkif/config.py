"""RunConfig: every setting of one continual-learning run, recorded beside its results."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from rkif.backbones import BackboneConfig
from rkif.checks import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    NOT_EMPTY,
    POSITIVE,
    Rule,
    check_choice,
    check_rules,
    check_types,
    fail,
    flag,
)
from rkif.data import LONG_ORDERS, SPLITS, STANDARD_ORDERS, default_data_root
from rkif.data.superni import ORDERS as SUPERNI_ORDERS

if TYPE_CHECKING:
    from rkif.methods import Method, MethodConfig

EVAL_SCOPES = ("all", "seen+next")
# the orders a benchmark accepts: for "long", 1-3 are read as its 1st-3rd order (4-6)
BENCHMARK_ORDERS = {"standard": STANDARD_ORDERS, "long": STANDARD_ORDERS + LONG_ORDERS,
                    "superni": tuple(SUPERNI_ORDERS)}
# the Trainer's schedules that need no further arguments
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
SEED_LIMIT = 2 ** 31
_EXAMPLES = Rule(lambda v: v >= 1, "expected a number of examples >= 1, or 'all' for every one")
RUN_RULES = {
    "method": NOT_EMPTY, "data": NOT_EMPTY, "output": NOT_EMPTY, "train_size": _EXAMPLES, "test_size": _EXAMPLES,
    "memory_fraction": Rule(lambda v: 0 < v <= 1, "expected a fraction in (0, 1]"),
    "epochs": Rule(lambda v: v > 0, "expected a number of epochs > 0"),
    "max_steps": Rule(lambda v: v >= 1, "expected an integer >= 1 (leave it unset to train for --epochs)"),
    "batch_size": AT_LEAST_ONE, "grad_accum": AT_LEAST_ONE, "lr": POSITIVE, "warmup_steps": NON_NEGATIVE_INT,
    "weight_decay": NON_NEGATIVE, "max_grad_norm": Rule(lambda v: v >= 0, "expected a number >= 0 (0: no clipping)"),
    "seed": Rule(lambda v: 0 <= v < SEED_LIMIT, f"expected an integer in [0, {SEED_LIMIT})"),
}


def process_count() -> int:
    """The number of processes training together (torchrun's ``WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class RunConfig:
    """One experiment: data, backbone, method, optimisation, output."""

    method: str = "rkif"
    method_options: dict = field(default_factory=dict)
    user_modules: list[str] = field(default_factory=list)   # .py files or dotted modules registering methods
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: str = field(default_factory=lambda: str(default_data_root()))
    benchmark: str = "standard"
    order: int = 1
    tasks: list[str] | None = None
    train_size: int | None = 500     # per task, stratified; None = the whole split
    test_size: int | None = 300      # per task, stratified; None = the whole split
    eval_split: str = "test"
    eval_scope: str = "all"          # after each stage: "all" tasks, or "seen+next" (BWT/FWT/OP unchanged)
    memory_fraction: float = 0.02
    epochs: float = 1.0
    max_steps: int | None = None     # optimizer steps per stage; overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3                 # the O-LoRA/MIGU regime (1 epoch, constant-size LoRA lr)
    warmup_steps: int = 0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"          # fp32 | bf16 | fp16 | auto (bf16 where native, else fp32: rkif.precision)
    group_by_length: bool = False    # training batches of similar token length (less padding)
    seed: int = 42
    output: str = "runs/default"
    resume: bool = False
    report_to: str = "none"          # any Trainer integration, e.g. tensorboard

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        d["backbone"] = BackboneConfig(**d.get("backbone", {}))
        return cls(**d)

    def with_settings(self, **settings) -> RunConfig:
        """A copy with flat ``settings``, each a RunConfig or a BackboneConfig field (as MODEL_DEFAULTS names them)."""
        backbone_fields = {f.name for f in fields(BackboneConfig)}
        unknown = set(settings) - backbone_fields - {f.name for f in fields(RunConfig)}
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}")
        backbone = {k: v for k, v in settings.items() if k in backbone_fields}
        run = {k: v for k, v in settings.items() if k not in backbone_fields}
        return replace(self, backbone=replace(self.backbone, **backbone), **run)

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def check(self) -> None:
        """Refuse a setting of the wrong type, out of its range or inconsistent with another, in one line that
        names it (as the command line spells it), its value and what is allowed. Reads no data and loads no
        model: the backbone and the method's config check their own fields (the latter against this run)."""
        from rkif.precision import resolve_precision  # torch: imported here, so `rkif --help` starts without it

        check_types(RunConfig, vars(self), flag, skip={"backbone"})
        if not isinstance(self.backbone, BackboneConfig):
            raise fail("backbone ", self.backbone, "expected a BackboneConfig")
        check_rules(self, RUN_RULES, flag)
        for spec in self.user_modules:
            if not spec.strip():
                raise fail("--user-module ", spec, "expected a .py file or a dotted module name")
        check_choice(flag("benchmark"), self.benchmark, BENCHMARK_ORDERS)
        if self.tasks is None:
            check_choice(flag("order"), self.order, BENCHMARK_ORDERS[self.benchmark])
        elif not self.tasks or not all(t.strip() for t in self.tasks) or len(set(self.tasks)) < len(self.tasks):
            raise fail(flag("tasks"), ",".join(self.tasks),
                       "expected comma-separated task names, none empty or repeated")
        check_choice(flag("eval_split"), self.eval_split, [s for s in SPLITS if s != "train"])
        check_choice(flag("eval_scope"), self.eval_scope, EVAL_SCOPES)
        check_choice(flag("lr_scheduler"), self.lr_scheduler, LR_SCHEDULERS)
        resolve_precision(self.precision)          # refuses an unknown precision, and fp16 without an accelerator
        _check_report_to(self.report_to)
        self.backbone.check()
        method_cls, method_config = self.method_config()
        method_cls.check_family(self.backbone.family)
        method_config.check_run(self)

    def method_config(self) -> tuple[type[Method], MethodConfig]:
        """The method class and its config, parsed and checked from ``method`` and ``method_options``, after
        importing ``user_modules`` (where a user's own methods register)."""
        from rkif.methods import import_user_modules, parse_options, resolve

        import_user_modules(self.user_modules)
        method_cls, options = resolve(self.method, self.method_options)
        return method_cls, parse_options(method_cls.config_class, options)


def _check_report_to(value: str) -> None:
    """An integration the Trainer knows and can load here (its package installed), or none / all."""
    if value in ("none", "all"):
        return
    from transformers.integrations import integration_utils

    check_choice(flag("report_to"), value, ("none", "all", *integration_utils.INTEGRATION_TO_CALLBACK))
    if value not in integration_utils.get_available_reporting_integrations():
        raise fail(flag("report_to"), value, "its package is not installed; install it or use --report-to none")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, and the CPU threads torch used (timings depend on it)."""
    import torch

    out = {"python": platform.python_version()}
    for pkg in ("rkif", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["torch_threads"] = str(torch.get_num_threads())
    return out
