"""Worker for the sharded-threshold test: each rank holds a shard of the same scores, thresholds with
one all-reduce per pass (gloo) and writes what it found, with the all-reduce calls counted, to OUT/rank<r>.json.

Run as ``torchrun --nproc_per_node 2 tests/threshold_worker.py OUT``.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rkif.kif.masks import all_reduce_sum, binary_masks, kth_largest, linear_quantile, top_fraction_threshold  # noqa: E402


def scores() -> dict[str, torch.Tensor]:
    """The full scores, the same in every process: ties, negatives, signed zeros, three sizes."""
    g = torch.Generator().manual_seed(7)
    return {"a": torch.randn(30_001, generator=g),
            "b": (torch.randint(-40, 40, (257, 64), generator=g) / 8).float(),
            "c": torch.cat([torch.zeros(500), -torch.zeros(500), torch.rand(999, generator=g)])}


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's slice of the flattened tensor, uneven: rank 0 holds 60%."""
    flat = t.reshape(-1)
    cut = int(0.6 * flat.numel()) if world == 2 else flat.numel()
    return flat[:cut] if rank == 0 else flat[cut:]


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    calls = []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    local = {n: shard(t, rank, world) for n, t in scores().items()}
    reduce = all_reduce_sum()
    found, counts = {}, {}
    for name, fn in {"top_0.2": lambda: top_fraction_threshold(local.values(), 0.2, reduce=reduce),
                     "top_0.5": lambda: top_fraction_threshold(local.values(), 0.5, reduce=reduce),
                     "k_1": lambda: kth_largest(local.values(), 1, reduce=reduce),
                     "k_last": lambda: kth_largest(local.values(), sum(t.numel() for t in scores().values()),
                                                   reduce=reduce),
                     "quantile_0.8": lambda: linear_quantile(local.values(), 0.8, reduce=reduce)}.items():
        calls.clear()
        found[name] = fn()
        counts[name] = len(calls)
    masks = binary_masks(local, 0.2, reduce=reduce)
    selected = torch.tensor([int(m.sum()) for m in masks.values()])
    dist.all_reduce = all_reduce
    dist.all_reduce(selected)
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"values": found, "all_reduce_calls": counts, "selected": selected.tolist()}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
