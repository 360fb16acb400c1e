"""The R-KIF variants against full R-KIF on the same orders (the README's ablation table).

    python benchmarks/ablation_deltas.py [benchmarks/results/standard]

Reads every finished ``runs/rkif*/order<o>-seed<s>/results.json`` and prints, per variant, its mean
OP and BWT over the orders it has finished and the difference from ``rkif`` on those same orders
(the mean, and the OP difference order by order: a paired comparison).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from rkif import io


def main(folder: Path) -> str:
    runs: dict[str, dict[tuple[int, int], dict]] = defaultdict(dict)
    for path in sorted(folder.glob("runs/rkif*/order*-seed*/results.json")):
        res = io.read_json(path)
        if res.get("complete"):
            runs[res["method"]][(res["order"], res["config"]["seed"])] = res
    lines = ["| variant | orders | OP | BWT | OP - rkif (same orders) | per order | BWT - rkif |",
             "|---|---|---|---|---|---|---|"]
    for method in sorted(runs):
        keys = sorted(k for k in runs[method] if k in runs["rkif"])
        if not keys:
            continue

        def mean(m: str, metric: str, keys: list = keys) -> float:
            return 100 * sum(runs[m][k][metric] for k in keys) / len(keys)

        op, bwt = mean(method, "op"), mean(method, "bwt")
        per_order = " / ".join(f"{100 * (runs[method][k]['op'] - runs['rkif'][k]['op']):+.1f}" for k in keys)
        lines.append(f"| {method} | {','.join(str(o) for o, _ in keys)} | {op:.1f} | {bwt:+.1f} | "
                     f"{op - mean('rkif', 'op'):+.1f} | {per_order} | {bwt - mean('rkif', 'bwt'):+.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/standard")))
