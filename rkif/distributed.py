"""Sharded evaluation under ``torch.distributed`` (the process group the Trainer/accelerate set up).

Each of the W ranks answers every W-th example; the answers travel as one fixed-shape integer tensor
per rank through ``all_gather`` (gloo and nccl alike; nothing is pickled), so every rank returns the
whole list in the caller's order and evaluation takes 1/W of the time. Every rank makes the same two
collectives per call, whatever its share (even none), so the ranks cannot fall out of step.

``leave_process_group`` ends a distributed run: ``destroy_process_group`` alone leaves gloo's threads
running, because the Trainer's reference cycles keep the group's C++ object alive until the interpreter
shuts down, and a collective's thread still alive at shutdown is a known way for a rank to abort
("terminate called without an active exception").
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist

from rkif.backbones import Backbone
from rkif.data import Example

_PAD = -1          # index column of a padding row (a rank with one example fewer than the others)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def predict_sharded(backbone: Backbone, examples: list[Example], desc: str = "eval") -> list[str]:
    """``backbone.predict(examples)``, with rank r answering ``examples[r::W]`` and the answers gathered.

    Without an initialised process group (or with one process) it is ``backbone.predict`` itself, and so
    under FSDP: there every forward gathers the parameters, a collective, so every rank must run the same
    forwards (the same examples, hence the same generation steps). Every rank must call it with the same
    ``examples`` (it is a collective).
    """
    rank, world = rank_and_world()
    if world == 1 or backbone.sharded:
        return backbone.predict(examples, desc=desc)
    mine = list(range(rank, len(examples), world))
    answers = backbone.predict([examples[i] for i in mine], desc=desc)
    return gather_answers(mine, answers, len(examples), backbone.device)


def gather_answers(indices: list[int], answers: list[str], n: int, device: torch.device) -> list[str]:
    """The ``n`` answers of all ranks in example order, from this rank's ``answers`` to examples ``indices``.

    Each rank sends a [ceil(n / W), 2 + B] int32 tensor, one row per example: its index (-1: padding),
    the answer's UTF-8 length, then its bytes padded to B, the longest answer on any rank (all-reduced).
    """
    _, world = rank_and_world()
    rows = -(-n // world)
    if len(indices) != len(answers) or len(indices) > rows:
        raise ValueError(f"gather_answers: {len(answers)} answers for {len(indices)} indices, at most {rows} a rank")
    if n == 0:                  # the same on every rank; gloo cannot gather empty tensors
        return []
    encoded = [a.encode("utf-8") for a in answers]
    width = torch.tensor([max(map(len, encoded), default=0)], dtype=torch.int32, device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    b = int(width.item())
    table = [[i, len(data), *data, *[0] * (b - len(data))] for i, data in zip(indices, encoded)]
    table += [[_PAD, 0, *[0] * b] for _ in range(rows - len(table))]
    local = torch.tensor(table, dtype=torch.int32, device=device)               # [rows, 2 + b]
    shares = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shares, local)
    out: list[str | None] = [None] * n
    for share in shares:
        for i, length, *data in share.cpu().tolist():
            if i != _PAD:
                out[i] = bytes(data[:length]).decode("utf-8")
    missing = [i for i, a in enumerate(out) if a is None]
    if missing:
        raise RuntimeError(f"gather_answers: no rank answered examples {missing[:5]} of {n}")
    return out


def leave_process_group(wait: bool = True) -> None:
    """Wait for every rank (unless ``wait`` is False: after an error the others may never come), destroy the
    process group (if any) and free it now: the collection reaches the DDP wrapper that the Trainer's
    reference cycles hold, so gloo's threads are joined before interpreter exit."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()
