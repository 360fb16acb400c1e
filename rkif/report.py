"""Markdown tables and PNG plots from ``results.json`` files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rkif import io  # noqa: E402
from rkif.metrics import plasticity  # noqa: E402


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def load_results(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        f = p / "results.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"no results.json in {p}")
        out.append(io.read_json(f))
    return out


def summary_table(results: list[dict]) -> str:
    """One row per run: method, order, OP, BWT, FWT (percent), minutes."""
    lines = ["| method | order | OP | BWT | FWT | minutes |", "|---|---|---|---|---|---|"]
    for r in results:
        done = "" if r["complete"] else f" ({r['finished_stages']}/{len(r['stages'])} stages)"
        lines.append(f"| {r['method']}{done} | {r['order']} | {_pct(r['op'])} | {_pct(r['bwt'])} | "
                     f"{_pct(r['fwt'])} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def matrix_table(r: dict) -> str:
    """The accuracy matrix of one run (rows: task, columns: after stage j), with OP/BWT/FWT."""
    stages = ["+".join(s) for s in r["stages"]]
    lines = [f"### {r['method']} ({r['model']}, order {r['order']})", "",
             "| task | untrained | " + " | ".join(f"after {s}" for s in stages) + " |",
             "|---|---|" + "---|" * len(stages)]
    for task, init, row in zip(r["tasks"], r["initial_accuracy"], r["accuracy"]):
        lines.append(f"| {task} | {_pct(init)} | " + " | ".join(_pct(a) for a in row) + " |")
    lines += ["", f"OP {_pct(r['op'])}  BWT {_pct(r['bwt'])}  FWT {_pct(r['fwt'])}"]
    return "\n".join(lines)


def plot_matrix(r: dict, path: Path) -> None:
    """Heatmap of the accuracy matrix."""
    acc = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(acc[0]), 1 + 0.5 * len(acc)))
    cells = [[float("nan") if a is None else a for a in row] for row in acc]   # not evaluated: blank
    im = ax.imshow(cells, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(r["stages"])), ["+".join(s) for s in r["stages"]], rotation=45, ha="right")
    ax.set_yticks(range(len(r["tasks"])), r["tasks"])
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            if a is None:
                continue
            ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", color="w" if a < 0.6 else "k", fontsize=8)
    ax.set_xlabel("after training stage")
    ax.set_ylabel("evaluated task")
    ax.set_title(f"{r['method']}: accuracy (%)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_final_accuracy(results: list[dict], path: Path) -> None:
    """Final per-task accuracy of every run, grouped bars (the paper's Figure 4)."""
    tasks = results[0]["tasks"]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(tasks), 4))
    for k, r in enumerate(results):
        final = {t: row[-1] for t, row in zip(r["tasks"], r["accuracy"])}
        ax.bar([i + k * width for i in range(len(tasks))], [100 * final.get(t, 0) for t in tasks],
               width, label=f"{r['method']} (OP {_pct(r['op'])})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("final accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rounds(r: dict, path: Path) -> bool:
    """Recurrent-KIF diagnostics per fusion round: mask regions, stability of I_out, share of the update kept."""
    rounds = (r.get("diagnostics") or {}).get("rounds") or []
    if not rounds:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
    x = range(len(rounds))
    for key in ("in_only", "out_only", "shared", "neither"):
        a1.plot(x, [rec[key] for rec in rounds], label=key)
    a1.set_xlabel("fusion round")
    a1.set_ylabel("fraction of scalars")
    a1.legend(fontsize=8)
    for key in ("mask_out_overlap", "i_out_rank_corr", "update_kept"):
        a2.plot(x, [rec.get(key, float("nan")) for rec in rounds], label=key)
    a2.set_xlabel("fusion round")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=8)
    fig.suptitle(f"{r['method']}: knowledge identification per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(paths: list[Path], out: Path | None = None) -> str:
    """Write heatmaps, the final-accuracy plot and table.md; return the markdown table."""
    results = load_results(paths)
    out = out or (paths[0] if paths[0].is_dir() else paths[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        tag = f"{r['method']}_order{r['order']}"
        plot_matrix(r, out / f"matrix_{tag}.png")
        plot_rounds(r, out / f"rounds_{tag}.png")
    plot_final_accuracy(results, out / "final_accuracy.png")
    table = summary_table(results)
    (out / "table.md").write_text(table + "\n")
    return table


# The paper's numbers (Recurrent-KIF, ACL 2025, T5-large): Table 1 means over three orders, as
# (OP, BWT); None where the paper gives none. Ablations (Tables 2 and 10) are Long order 4 only.
PAPER_TABLE1 = {
    "standard": {"seqlora": (43.7, -50.4), "inclora": (66.4, -20.0), "replay": (68.8, -11.7), "ewc": (50.3, None),
                 "olora": (75.8, -3.8), "tasl": (76.3, -4.0), "vrmcl": (76.0, -3.7), "migu": (76.6, None),
                 "rkif": (78.4, -2.8), "mtl": (80.3, None)},
    "long": {"seqlora": (11.6, -73.4), "inclora": (61.2, -26.7), "replay": (70.9, -15.4), "ewc": (45.1, None),
             "olora": (69.6, -4.1), "tasl": (74.4, -5.3), "vrmcl": (74.8, -4.9), "migu": (76.5, None),
             "rkif": (77.8, -3.6), "mtl": (81.8, None)},
    "long_order4_ablations": {"rkif": (77.9, -3.4), "rkif-die": (74.8, -4.8), "rkif-ki": (52.3, -21.5),
                              "rkif-gm": (72.1, -11.2), "rkif-adaptive": (76.1, -4.1), "rkif-share": (75.8, -4.3),
                              "rkif-grad": (74.5, -5.2), "rkif-noema": (75.9, -4.7)},
}


def _mean_std(values: list[float | None]) -> str:
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.1f}"
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{mean:.1f} ± {std:.1f}"


def _paper(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def just_trained(r: dict) -> float | None:
    """Plasticity of one run: mean accuracy on each task right after its stage (None if not recorded)."""
    if not r.get("complete") or "accuracy" not in r:
        return None
    stage_of = {t: j for j, stage in enumerate(r["stages"]) for t in stage}
    return plasticity(r["accuracy"], [stage_of[t] for t in r["tasks"]])


def grid_table(results: list[dict], benchmark: str) -> str:
    """Per method: mean ± sample std over orders and seeds of OP, BWT, plasticity (accuracy right after
    training), FWT; mean training and total (training + evaluation) minutes per run; the paper's columns."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    paper = PAPER_TABLE1.get(benchmark, {})
    ablation = PAPER_TABLE1["long_order4_ablations"]
    lines = ["| method | runs (orders) | OP | BWT | just trained | FWT | train / total min per run | paper OP | "
             "paper BWT | paper ablation OP / BWT (Long O4) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        orders = ",".join(str(o) for o in sorted({r["order"] for r in rs}))
        op, bwt = paper.get(m, (None, None))
        ab = ablation.get(m)
        minutes = sum(r["seconds"] for r in rs) / len(rs) / 60          # training + evaluation
        train = sum(s.get("train_seconds") or 0.0 for r in rs for s in r.get("stage_log", [])) / len(rs) / 60
        lines.append(f"| {m} | {len(rs)} ({orders}) | {_mean_std([r['op'] for r in rs])} | "
                     f"{_mean_std([r['bwt'] for r in rs])} | {_mean_std([just_trained(r) for r in rs])} | "
                     f"{_mean_std([r['fwt'] for r in rs])} | "
                     f"{train:.1f} / {minutes:.1f} | "
                     f"{_paper(op)} | {_paper(bwt)} | {f'{_paper(ab[0])} / {_paper(ab[1])}' if ab else '-'} |")
    return "\n".join(lines)


# Two-sided 95 % quantiles of Student's t, df = 1..30; above, the Cornish-Fisher expansion (error < 1e-4).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.306, 2.2622, 2.2281, 2.201, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.093, 2.086, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (half-width factor of a 95 % interval)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def paired_difference(values: list[float], reference: list[float]) -> tuple[float, float | None]:
    """Mean of the paired differences and the half-width of its 95 % t interval (None for one pair)."""
    diffs = [v - r for v, r in zip(values, reference, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    return mean, t_quantile_975(n - 1) * sd / n**0.5


def paired_table(results: list[dict], reference: str) -> str:
    """Each entry minus ``reference`` on the same (order, seed): mean difference of OP, BWT and
    plasticity in points with its 95 % t interval over the pairs both have finished."""
    metrics = (("OP", lambda r: r["op"]), ("BWT", lambda r: r["bwt"]), ("just trained", just_trained))
    by_key = {(r["method"], r["order"], r["config"]["seed"]): r for r in results}
    ref_keys = {k[1:] for k in by_key if k[0] == reference}
    lines = [f"Paired differences to {reference} (points; mean [95 % t interval] over the (order, seed) pairs both "
             "finished):", "",
             "| method | pairs | " + " | ".join(f"Δ {name}" for name, _ in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for m in dict.fromkeys(r["method"] for r in results):
        if m == reference:
            continue
        keys = sorted(k[1:] for k in by_key if k[0] == m and k[1:] in ref_keys)
        cells = []
        for _, get in metrics:
            pairs = [(get(by_key[(m, *k)]), get(by_key[(reference, *k)])) for k in keys]
            pairs = [(100 * a, 100 * b) for a, b in pairs if a is not None and b is not None]
            if not pairs:
                cells.append("-")
                continue
            mean, half = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
            cells.append(f"{mean:+.1f}" if half is None else f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]")
        lines.append(f"| {m} | {len(keys)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_report(out: Path, runs: list, benchmark: str, labels: list[str] | None = None,
                reference: str | None = None) -> str:
    """table.md, per-run heatmaps and per-order final-accuracy plots of a grid's finished runs.

    ``labels``: each run's name in the grid (a variant's name; default the method's). With
    ``reference``, table.md adds the paired differences of every entry to that one.
    """
    results = [io.read_json(r.output_dir / "results.json") for r in runs]
    if labels is not None:
        for r, label in zip(results, labels, strict=True):
            r["method"] = label
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for r in results:
        plot_matrix(r, plots / f"matrix_{r['method']}_order{r['order']}_seed{r['config']['seed']}.png")
        plot_rounds(r, plots / f"rounds_{r['method']}_order{r['order']}_seed{r['config']['seed']}.png")
    for order in sorted({r["order"] for r in results}):
        plot_final_accuracy([r for r in results if r["order"] == order], plots / f"final_accuracy_order{order}.png")
    table = grid_table(results, benchmark) if results else "(no finished runs yet)"
    if reference and results:
        table += "\n\n" + paired_table(results, reference)
    (out / "table.md").write_text(table + "\n")
    return table
