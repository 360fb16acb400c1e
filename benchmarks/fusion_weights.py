"""How much of each round's update do R-KIF's fusions keep? Means of the per-round diagnostics.

    for m in rkif rkif-gm rkif-adaptive rkif-release; do
      rkif run --method $m --tasks dbpedia,amazon,yahoo --train-size 300 --test-size 30 --output runs/fw/$m
    done
    python benchmarks/fusion_weights.py runs/fw/* --out benchmarks/results/fusion_weights

Reads each run's ``diagnostics.rounds`` (``w_in_mean``, ``w_out_mean``, ``update_kept`` = the L2
norm of the fused update over that of tau_in + tau_out, the mask regions) and writes the per-run
means and ranges as JSON and a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rkif import io
from rkif.report import load_results

KEYS = ("w_in_mean", "w_out_mean", "update_kept", "neither")


def summarise(result: dict) -> dict:
    """Mean, min and max over the fusion rounds of each diagnostic in KEYS."""
    if not result.get("complete"):
        raise ValueError(f"{result['method']}: the run is not finished")
    rounds = [r for r in (result.get("diagnostics") or {}).get("rounds", []) if all(k in r for k in KEYS)]
    if not rounds:
        raise ValueError(f"{result['method']}: no fusion round records {KEYS} (a run from before they were logged?)")
    out = {"method": result["method"], "rounds": len(rounds), "op": result["op"], "config": result["config"]}
    for k in KEYS:
        values = [r[k] for r in rounds]
        out[k] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="finished R-KIF run folders")
    p.add_argument("--out", default="benchmarks/results/fusion_weights")
    a = p.parse_args()
    rows = [summarise(r) for r in load_results([Path(d) for d in a.runs])]
    lines = ["| variant | rounds | mean weight of tau_in / tau_out | norm of fused / unfused update (mean, range) "
             "| scalars in neither mask |", "|---|---|---|---|---|"]
    for r in rows:
        w_in, w_out, kept = r["w_in_mean"]["mean"], r["w_out_mean"]["mean"], r["update_kept"]
        lines.append(f"| {r['method']} | {r['rounds']} | {w_in:.3f} / {w_out:.3f} | {kept['mean']:.3f} "
                     f"({kept['min']:.3f}-{kept['max']:.3f}) | {100 * r['neither']['mean']:.0f}% |")
    md = "\n".join(lines)
    command = "python benchmarks/fusion_weights.py " + " ".join(a.runs)
    io.write_json(Path(a.out + ".json"), {"runs": rows, "command": command})
    Path(a.out + ".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
