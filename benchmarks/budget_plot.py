"""At which training budget do R-KIF's masks pay? (issue 13, item 3): OP, BWT and "just trained" against
the epochs per task, one line per method, from the finished runs of one or more grid folders.

    python benchmarks/budget_plot.py benchmarks/results/budget benchmarks/results/epochs3 \\
        benchmarks/results/standard --orders 1 --methods rkif,rkif-ki,replay,vrmcl --reference rkif \\
        --out benchmarks/results/budget

Runs are grouped by (entry, epochs per task) over the orders and seeds found, an entry being the method and
its options (``rkif mask_source=random``) (mean, and min to max where
there are several); a (method, epochs) pair found with other settings in another folder is refused, except
for ``eval_scope``: "seen+next" evaluates fewer cells and leaves OP, BWT and "just trained" as they are
(tests/test_runner.py), so a grid that evaluated every cell counts the same. An (order, seed) found for one
point in several folders counts once, from the first folder given; a pair may so join runs of two grids
(a rerun of the same settings moves a metric by a few tenths of a point). Writes ``budget.png`` and
``budget.md`` (one row per method and budget: runs, their seeds, optimizer steps and R-KIF fusion rounds per
task, OP, BWT, "just trained", each the mean over whichever (order, seed) runs that point has, so two rows
compare like with like only where their seeds match; with ``--reference``, each entry minus the reference at
the same budget on the same (order, seed), with a 95 % t interval over the pairs) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from rkif import io
from rkif.metrics import points as format_points
from rkif.report import PAIRED_METRICS, difference_text, just_trained, method_colours, paired_differences, plt
from rkif.runner import with_defaults

# settings that may differ between runs of one (method, epochs) point
FREE = {"output", "resume", "order", "seed", "epochs", "method", "method_options", "eval_scope"}


def entry(r: dict) -> str:
    """A run's method and its options given (not the defaults), e.g. ``rkif mask_source=random``."""
    options = r["config"].get("method_options") or {}
    return " ".join([r["method"], *(f"{k}={v}" for k, v in sorted(options.items()))])


def entry_name(text: str) -> str:
    """An entry as ``--methods`` spells it, with its options in ``entry``'s order (by name): ``rkif b=2 a=1`` ->
    ``rkif a=1 b=2``."""
    method, *options = text.split()
    return " ".join([method, *sorted(options, key=lambda option: option.partition("=")[0])])


def load_points(folders: list[Path], methods: list[str] | None = None,
                orders: list[int] | None = None) -> dict[tuple[str, float], list[dict]]:
    """``{(entry, epochs): [results of finished runs]}`` from ``<folder>/runs/*/*/results.json``: the runs of
    entries ``methods`` (a method name alone is that method at its defaults, ``rkif masks_on=out`` a variant;
    default: every entry with a BWT, so not multi-task training) on ``orders`` (default: all). A
    folder with no run yet is skipped, with a line saying so; a point's (order, seed) already read from an
    earlier folder is skipped."""
    points: dict[tuple[str, float], list[dict]] = defaultdict(list)
    settings: dict[tuple[str, float], tuple[dict, Path]] = {}
    seen: set[tuple[str, float, int, int]] = set()
    for folder in folders:
        found = sorted(folder.glob("runs/*/*/results.json"))
        if not found:
            print(f"{folder}: no runs/*/*/results.json yet, skipped", file=sys.stderr)
        for path in found:
            r = io.read_json(path)
            if (not r.get("complete") or r.get("bwt") is None or (methods and entry(r) not in methods)
                    or (orders and r["order"] not in orders)):
                continue
            config = with_defaults(r["config"])
            key = (entry(r), float(config["epochs"]))
            shared = {k: v for k, v in config.items() if k not in FREE}
            if key in settings and settings[key][0] != shared:
                diff = sorted(k for k in shared if shared[k] != settings[key][0].get(k))
                raise ValueError(f"{path}: {key[0]} at {key[1]:g} epochs differs from {settings[key][1]} in {diff}")
            settings.setdefault(key, (shared, path))
            run_key = (*key, r["order"], config["seed"])
            if run_key not in seen:
                seen.add(run_key)
                points[key].append(r)
    return dict(points)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summary(runs: list[dict]) -> dict:
    """One point: its run count, mean optimizer steps and fusion rounds per task, and each run's OP, BWT and
    "just trained" (in %)."""
    steps = [s["steps"] for r in runs for s in r["stage_log"]]
    rounds = [len(r["diagnostics"]["rounds"]) / max(len(r["stage_log"]) - 1, 1) for r in runs
              if r.get("diagnostics", {}).get("rounds")]             # stage 0 has no memory, so no round
    return {"runs": len(runs), "steps": _mean(steps), "rounds": _mean(rounds) if rounds else None,
            "op": [100 * r["op"] for r in runs], "bwt": [100 * r["bwt"] for r in runs],
            "just_trained": [100 * just_trained(r) for r in runs]}


def table(points: dict[tuple[str, float], list[dict]]) -> str:
    """budget.md: a row per entry and budget, with the means over its runs."""
    lines = ["| method | epochs per task | runs | seeds | steps per task | fusion rounds per task | OP | BWT | "
             "just trained |", "|---|---|---|---|---|---|---|---|---|"]
    for (method, epochs), runs in sorted(points.items()):
        s = summary(runs)
        rounds = "-" if s["rounds"] is None else f"{s['rounds']:.0f}"
        seeds = ",".join(str(seed) for seed in sorted({r["config"]["seed"] for r in runs}))
        means = " | ".join(format_points(_mean(s[k])) for k in ("op", "bwt", "just_trained"))
        lines.append(f"| {method} | {epochs:g} | {s['runs']} | {seeds} | {s['steps']:.0f} | {rounds} | {means} |")
    return "\n".join(lines)


def paired_table(points: dict[tuple[str, float], list[dict]], reference: str) -> str:
    """Each entry minus ``reference`` at the same budget on the same (order, seed): mean [95 % t interval] in
    points over the pairs (``rkif.report.paired_differences``); budgets without the reference are left out."""
    lines = [f"Paired differences to {reference} at the same budget (points; mean [95 % t interval] over the "
             "(order, seed) pairs both finished):", "",
             "| method | epochs per task | pairs | " + " | ".join(f"Δ {name}" for name, _ in PAIRED_METRICS) + " |",
             "|---|---|---|" + "---|" * len(PAIRED_METRICS)]
    for epochs in sorted({e for _, e in points}):
        if (reference, epochs) not in points:
            continue
        runs = [{**r, "method": m} for (m, e), rs in sorted(points.items()) if e == epochs for r in rs]
        for m, (n, cells) in paired_differences(runs, reference).items():
            if not n:
                continue
            lines.append(f"| {m} | {epochs:g} | {n} | " + " | ".join(map(difference_text, cells)) + " |")
    return "\n".join(lines)


def plot(points: dict[tuple[str, float], list[dict]], path: Path) -> None:
    """OP, BWT and "just trained" against epochs per task (log axis), one line per method."""
    methods = list(dict.fromkeys(m for m, _ in sorted(points)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for colour, method in zip(method_colours(len(methods)), methods):
        budgets = sorted(e for m, e in points if m == method)
        stats = [summary(points[(method, e)]) for e in budgets]
        for ax, key in zip(axes, ("op", "bwt", "just_trained")):
            means = [_mean(s[key]) for s in stats]
            low = [m - min(s[key]) for m, s in zip(means, stats)]
            high = [max(s[key]) - m for m, s in zip(means, stats)]
            ax.errorbar(budgets, means, yerr=[low, high], marker="o", capsize=2, color=colour, label=method)
    budgets = sorted({e for _, e in points})
    for ax, title in zip(axes, ("OP (%)", "BWT (%)  (higher: less forgetting)", "just trained (%)")):
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{e:g}" for e in budgets])
        ax.minorticks_off()
        ax.set_xlabel("epochs per task")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.text(0.01, 0.01, "dot: mean over the point's runs (seeds in budget.md); bar: min to max", fontsize=8,
             color="0.35")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Read the folders, write budget.png and budget.md, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="grid folders (each with runs/<name>/<order-seed>/)")
    p.add_argument("--out", type=Path, required=True, help="where budget.png and budget.md go")
    p.add_argument("--methods", help="comma-separated entries: a method at its defaults (rkif) or with options "
                                     "('rkif masks_on=out', options in any order); default: every one with a BWT")
    p.add_argument("--orders", help="comma-separated task orders (default: every one found)")
    p.add_argument("--reference", help="an entry (e.g. rkif): add each entry's paired difference to it per budget")
    a = p.parse_args(argv)
    points = load_points(a.folders, [entry_name(m) for m in a.methods.split(",")] if a.methods else None,
                         [int(o) for o in a.orders.split(",")] if a.orders else None)
    if not points:
        raise SystemExit(f"{', '.join(map(str, a.folders))}: no finished run")
    a.out.mkdir(parents=True, exist_ok=True)
    plot(points, a.out / "budget.png")
    text = table(points)
    if a.reference:
        entries = sorted({m for m, _ in points})
        if a.reference not in entries:
            raise SystemExit(f"--reference {a.reference}: no finished run of it among {entries}")
        text += "\n\n" + paired_table(points, a.reference)
    io.write_text(a.out / "budget.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
