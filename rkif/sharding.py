"""Trainable parameters sharded over processes, as a method sees them, and where each method may run.

Under FSDP2 (torch's ``fully_shard``: what the Trainer and accelerate use for FSDP, ``fsdp_config``
version 2 being the default) every parameter is a ``DTensor`` sharded on dim 0 over a process group:
each process holds one slice, possibly empty. A method that reads or writes parameters element by
element (importance, snapshots, task vectors, fusion) works on ``local(p)``, the slice itself, in
place; a quantity over all elements (a threshold, a sum, a norm) is reduced over ``Sharding.group``.

``sharding_of(model)`` answers "am I sharded, over which group" from the parameters themselves, so
any wrapper that shards into DTensors is covered; it refuses what rkif cannot handle: a mix of
sharded and whole trainable parameters, several sharded mesh dimensions, FSDP1's flat parameters and
DeepSpeed ZeRO-3's partitioned ones. ``check_distribution`` refuses a method that cannot run on the
Trainer's setup (``Method.parameter_access``), before the first training step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from rkif.kif.masks import Reduce, all_reduce_sum

if TYPE_CHECKING:
    from transformers import Trainer

    from rkif.methods import Method


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor (a view: writing into it writes the parameter), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every process when sharded (a collective: call it on every process)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def as_forward(module: torch.nn.Module, method: str) -> None:
    """Let ``module.<method>`` gather and free sharded parameters as ``forward`` does (FSDP2's
    ``register_fsdp_forward_method``, once per module); nothing when ``module`` is not sharded."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(module, FSDPModule) and method not in vars(module):
        register_fsdp_forward_method(module, method)


def prepare_again(trainer: Trainer) -> None:
    """Let accelerate prepare a model that an earlier Trainer sharded already (rkif: one Trainer per stage).

    Accelerate 1.15 resolves the layer classes of its wrap policy by name before it sees that the model is
    sharded, and ``fully_shard`` renamed them (``FSDP<Name>``): "Could not find the transformer layer class".
    The model keeps the wrapping it has, so no policy is needed.
    """
    from torch.distributed.fsdp import FSDPModule

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None and isinstance(trainer.model, FSDPModule):
        plugin.auto_wrap_policy = None


@dataclass(frozen=True)
class Sharding:
    """How trainable parameters are split over processes: ``group`` None means whole on every process."""

    group: Any = None
    size: int = 1

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @property
    def reduce(self) -> Reduce | None:
        """The ``reduce`` of ``rkif.kif.masks``: histograms summed over the shards (None: whole parameters)."""
        return all_reduce_sum(self.group) if self.sharded else None

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the shards, in one collective (float64); as they are when not sharded."""
        return self._all_reduce(values, "SUM")

    def max(self, values: Sequence[float]) -> list[float]:
        """Each value's maximum over the shards, in one collective; as they are when not sharded."""
        return self._all_reduce(values, "MAX")

    def _all_reduce(self, values: Sequence[float], op: str) -> list[float]:
        if not self.sharded:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=self.group)
        return t.tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The 1-D ``t`` of every process, concatenated in rank order (sizes may differ); ``t`` when not sharded."""
        if not self.sharded:
            return t
        device = self._device()
        n = torch.tensor([t.numel()], device=device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s) for s in sizes]
        padded = torch.zeros(max(sizes), dtype=t.dtype, device=device)
        padded[:t.numel()] = t.to(device)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)

    def gather_maps(self, maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each map flattened and whole: its shards concatenated in rank order, which for dim-0 shards is
        the whole tensor flattened (collectives: call on every process). Flattened as they are when not sharded."""
        if not self.sharded:
            return {n: t.reshape(-1) for n, t in maps.items()}
        sizes = torch.tensor([t.numel() for t in maps.values()], device=self._device())
        per_rank = [torch.empty_like(sizes) for _ in range(self.size)]
        dist.all_gather(per_rank, sizes, group=self.group)
        data = self.gather(torch.cat([t.reshape(-1) for t in maps.values()]))
        shards = [part.split(s.tolist()) for part, s in zip(data.split([int(s.sum()) for s in per_rank]), per_rank)]
        return {n: torch.cat([rank[i] for rank in shards]) for i, n in enumerate(maps)}

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


WHOLE = Sharding()


def _fsdp1_modules(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def sharding_of(model: torch.nn.Module) -> Sharding:
    """How ``model``'s trainable parameters are split over processes (see the module docstring)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in params):
        raise ValueError("DeepSpeed ZeRO-3 partitions the parameters (each process holds an empty "
                         "placeholder): rkif does not support it; use FSDP2, DDP, or ZeRO-1/2 with "
                         f"{_methods_with('loss')}")
    if _fsdp1_modules(model):
        raise ValueError("FSDP1 (FullyShardedDataParallel) flattens parameters into flat shards that rkif "
                         "does not handle: use FSDP2 (fsdp_config version 2, the Trainer's default; "
                         "accelerate launch --fsdp_version 2)")
    groups = {}
    whole = []
    for name, p in params:
        dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()] if isinstance(p, DTensor) else []
        if len(dims) > 1:
            raise ValueError(f"parameter {name} is sharded over {len(dims)} mesh dimensions "
                             f"({p.placements}): rkif handles one")
        if not dims:
            whole.append(name)
            continue
        group = p.device_mesh.get_group(dims[0])
        groups[id(group)] = (group, p.device_mesh.size(dims[0]), name)
    if not groups:
        return WHOLE
    if len(groups) > 1:
        raise ValueError("trainable parameters are sharded over different process groups: rkif handles one")
    (group, size, name), = groups.values()
    if size == 1:
        return WHOLE
    if whole:
        raise ValueError(f"trainable parameter {whole[0]} is whole on every process while {name} is sharded: "
                         "rkif needs all of them sharded alike (do not pass trainable parameters to "
                         "FSDP's ignored_params)")
    return Sharding(group, size)


PARAMETER_ACCESS = ("loss", "shards", "whole")


def _methods_with(*access: str) -> str:
    from rkif.methods.registry import METHODS

    return ", ".join(sorted(name for name, cls in METHODS.items() if cls.parameter_access in access))


def check_distribution(method: Method, trainer: Trainer) -> Sharding:
    """Refuse ``method`` on the Trainer's setup if it cannot run there; else how its parameters are split.

    ``method.parameter_access``: ``"loss"`` (it only changes the data or the loss: runs wherever the
    Trainer runs, DeepSpeed ZeRO-1/2 included), ``"shards"`` (it reads and writes parameters and
    gradients element-wise on local shards, with collectives for totals: DDP and FSDP2) or
    ``"whole"`` (it needs whole parameters and gradients on every process: DDP only).
    """
    access = method.parameter_access
    if access not in PARAMETER_ACCESS:
        raise ValueError(f"{type(method).__name__}.parameter_access={access!r}: choose from {PARAMETER_ACCESS}")
    model = trainer.model_wrapped
    if getattr(trainer, "is_deepspeed_enabled", False) and access != "loss":
        raise ValueError(f"{method.name} does not run under DeepSpeed: it reads and writes parameters and "
                         "gradients, which ZeRO partitions or keeps in its own buffers; use DDP or FSDP2")
    shards = sharding_of(model)
    if shards.sharded and access == "whole":
        raise ValueError(f"{method.name} does not run under FSDP (parameters sharded over {shards.size} "
                         "processes): it needs whole parameters and gradients on every process; run it under "
                         f"DDP, or use {_methods_with('loss', 'shards')}")
    return shards
