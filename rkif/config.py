"""RunConfig: every setting of one continual-learning run, recorded beside its results."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import metadata
from pathlib import Path

from rkif.backbones import BackboneConfig
from rkif.data import default_data_root


@dataclass
class RunConfig:
    """One experiment: data, backbone, method, optimisation, output."""

    method: str = "rkif"
    method_options: dict = field(default_factory=dict)
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
