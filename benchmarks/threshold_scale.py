"""Exact Eq. 8 threshold on a 50-million-score model (LLaMA-7B with LoRA r=8 on all linear layers).

Side by side in one run, on the same scores (one tensor per LoRA factor): ``rkif.kif.masks``'s radix
select (4 passes), the bisection over float bit patterns it replaced (32 passes) and
``torch.kthvalue`` on the concatenation. Wall and CPU seconds (process time: what a shared machine
does not inflate) are medians of ``--repeats``; passes are counted (radix: calls of the per-pass
reduce hook, i.e. collectives when sharded; bisection: counting passes).
``torch.quantile`` (the authors' code) refuses more than 2^24 scores.

    OMP_NUM_THREADS=1 python benchmarks/threshold_scale.py --out benchmarks/results/threshold_scale.json
"""

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from rkif.io import write_json
from rkif.kif.masks import binary_masks, top_fraction_threshold

log = logging.getLogger(__name__)


def bisection_threshold(tensors: list[torch.Tensor], fraction: float) -> tuple[float, int]:
    """The previous ``rkif.kif.masks``: largest float32 v with #{x >= v} >= k, by bisection over the
    order-preserving int32 keys; returns (threshold, counting passes)."""
    n = sum(t.numel() for t in tensors)
    k = max(1, min(n, round(fraction * n)))

    def to_float(key: int) -> float:
        bits = key ^ 0x7FFFFFFF if key < 0 else key
        return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()

    lo, hi, passes = -(2**31), 2**31 - 1, 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        passes += 1
        if sum(int((t >= to_float(mid)).sum()) for t in tensors) >= k:
            lo = mid
        else:
            hi = mid - 1
    return to_float(lo), passes


def radix_threshold(tensors: list[torch.Tensor], fraction: float) -> tuple[float, int]:
    calls = []

    def reduce(hist: torch.Tensor) -> torch.Tensor:       # what an all-reduce would get: one call per pass
        calls.append(hist.numel())
        return hist

    return top_fraction_threshold(tensors, fraction, reduce=reduce), len(calls)


def kthvalue_threshold(tensors: list[torch.Tensor], fraction: float) -> tuple[float, int]:
    x = torch.cat([t.reshape(-1) for t in tensors])
    n = x.numel()
    k = max(1, min(n, round(fraction * n)))
    return torch.kthvalue(x, n - k + 1).values.item(), 1


def timed(fn, tensors, fraction, repeats) -> dict:
    seconds, cpu, values = [], [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        value, passes = fn(tensors, fraction)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        values.append(value)
    assert len(set(values)) == 1, values
    return {"threshold": values[0], "passes": passes, "seconds_median": round(statistics.median(seconds), 3),
            "cpu_seconds_median": round(statistics.median(cpu), 3), "seconds": [round(s, 3) for s in seconds]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scalars", type=int, default=50_000_000)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the JSON here (atomic)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    width = 8 * 4096 * 4                                  # one LoRA factor of a 4096 x 16384 layer
    scores = {f"t{i}": torch.rand(width) for i in range(-(-a.scalars // width))}
    tensors = list(scores.values())
    n = sum(t.numel() for t in tensors)
    methods = {"radix_select": radix_threshold, "bisection": bisection_threshold, "torch.kthvalue": kthvalue_threshold}
    results = {}
    for name, fn in methods.items():
        results[name] = timed(fn, tensors, a.fraction, a.repeats)
        log.info("%s: %s", name, results[name])
    masks = binary_masks(scores, a.fraction)
    try:
        torch.quantile(torch.cat(tensors), 1 - a.fraction)
        quantile = "ok"
    except RuntimeError as err:
        quantile = str(err)
    out = {"scalars": n, "tensors": len(tensors), "fraction": a.fraction, "target": round(a.fraction * n),
           "selected": sum(int(m.sum()) for m in masks.values()),
           "all_equal": len({r["threshold"] for r in results.values()}) == 1,
           "methods": results, "torch.quantile": quantile, "repeats": a.repeats,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    print(json.dumps(out, indent=2))
    if a.out:
        write_json(a.out, out)


if __name__ == "__main__":
    main()
