"""Markdown tables and PNG plots from ``results.json`` files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rkif import io  # noqa: E402


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
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(r["stages"])), ["+".join(s) for s in r["stages"]], rotation=45, ha="right")
    ax.set_yticks(range(len(r["tasks"])), r["tasks"])
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
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
    """Recurrent-KIF diagnostics per fusion round: mask regions and stability of I_out."""
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
    for key in ("mask_out_overlap", "i_out_rank_corr"):
        a2.plot(x, [rec.get(key, float("nan")) for rec in rounds], label=key)
    a2.set_xlabel("fusion round")
    a2.set_ylim(0, 1)
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
