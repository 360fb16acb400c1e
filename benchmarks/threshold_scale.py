"""Exact Eq. 8 threshold on a 50-million-score model (LLaMA-7B with LoRA r=8 on all linear layers).

``torch.quantile`` (the authors' code) refuses more than 2^24 scores; ``rkif.kif.masks`` does not.

    python benchmarks/threshold_scale.py --scalars 50000000
"""

import argparse
import json
import time

import torch

from rkif.kif.masks import binary_masks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scalars", type=int, default=50_000_000)
    p.add_argument("--fraction", type=float, default=0.2)
    a = p.parse_args()
    torch.manual_seed(0)
    width = 8 * 4096 * 4                                  # one LoRA factor of a 4096 x 16384 layer
    scores = {f"t{i}": torch.rand(width) for i in range(-(-a.scalars // width))}
    n = sum(t.numel() for t in scores.values())
    t0 = time.perf_counter()
    masks = binary_masks(scores, a.fraction)
    seconds = time.perf_counter() - t0
    selected = sum(int(m.sum()) for m in masks.values())
    try:
        torch.quantile(torch.cat(list(scores.values())), 1 - a.fraction)
        quantile = "ok"
    except RuntimeError as err:
        quantile = str(err)
    print(json.dumps({"scalars": n, "selected": selected, "target": round(a.fraction * n),
                      "seconds": round(seconds, 3), "torch.quantile": quantile}, indent=2))


if __name__ == "__main__":
    main()
