"""Markdown tables and PNG plots from ``results.json`` files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.path import Path as PlotPath  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from rkif import io  # noqa: E402
from rkif.metrics import SCORER_NAMES, plasticity, points  # noqa: E402


def percent(x: float | None) -> str:
    """A fraction as points with one decimal (``0.6375`` -> ``63.8``), ``-`` for None."""
    return "-" if x is None else points(100 * x)


def score_name(r: dict) -> str:
    """What the matrix of a run holds: "accuracy", "ROUGE-L" (runs saved before per-task metrics: accuracy)."""
    names = dict.fromkeys(SCORER_NAMES.get(m, m) for m in r.get("metrics") or ["exact_match"])
    return " / ".join(names)


def sequence_label(r: dict) -> str:
    """The task sequence of a run: ``order 1``, or ``tasks dbpedia,amazon`` for a run given ``--tasks``."""
    if r.get("order") is not None:
        return f"order {r['order']}"
    return "tasks " + ",".join(r.get("tasks") or [])


def _results_file(path: Path) -> Path:
    return path / "results.json" if path.is_dir() else path


def load_results(paths: list[Path]) -> list[dict]:
    """The results.json of each run folder (or file), each checked to be a whole rkif results file."""
    out = []
    for p in paths:
        f = _results_file(Path(p))
        if not f.is_file():
            raise FileNotFoundError(f"{p}: no results.json (not a run folder, or no task of it has finished yet)")
        out.append(io.read_results(f, fix="leave it out of the report"))
    return out


def run_labels(paths: list[Path]) -> list[str]:
    """A distinct name per run: its folder's name, with parent folders put before it where runs share a name
    (``rkif/order1-seed42`` and ``replay/order1-seed42``)."""
    parts = [_results_file(Path(p)).resolve().parent.parts[1:] for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        grow = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not grow:
            return labels
        for i in grow:
            depth[i] += 1


def _file_name(label: str) -> str:
    return label.replace("/", "_")


def default_report_dir(paths: list[Path]) -> Path:
    """Where ``rkif report`` writes without ``--out``: ``reports/<run names>`` (never a run folder)."""
    labels = [_file_name(label) for label in run_labels(paths)]
    name = "+".join(labels) if len(labels) <= 3 else f"{labels[0]}+{len(labels) - 1}-more"
    return Path("reports") / name


def summary_table(results: list[dict], labels: list[str] | None = None) -> str:
    """One row per run: run (folder name), method, order (or the tasks of a ``--tasks`` run), OP, BWT, FWT
    (percent), minutes."""
    labels = labels or [r["method"] for r in results]
    lines = ["| run | method | order | OP | BWT | FWT | minutes |", "|---|---|---|---|---|---|---|"]
    for label, r in zip(labels, results):
        done = "" if r["complete"] else f" ({r['finished_stages']}/{len(r['stages'])} stages)"
        order = r["order"] if r.get("order") is not None else sequence_label(r)        # "tasks a,b" without one
        lines.append(f"| {label} | {r['method']}{done} | {order} | {percent(r['op'])} | {percent(r['bwt'])} | "
                     f"{percent(r['fwt'])} | {r.get('seconds', 0.0) / 60:.1f} |")
    return "\n".join(lines)


def matrix_table(r: dict) -> str:
    """The score matrix of one run (rows: task, columns: after stage j), with OP/BWT/FWT."""
    stages = ["+".join(s) for s in r["stages"]]
    lines = [f"### {r['method']} ({r['model']}, {sequence_label(r)}, {score_name(r)} %)", "",
             "| task | untrained | " + " | ".join(f"after {s}" for s in stages) + " |",
             "|---|---|" + "---|" * len(stages)]
    for task, init, row in zip(r["tasks"], r["initial_accuracy"], r["accuracy"]):
        lines.append(f"| {task} | {percent(init)} | " + " | ".join(percent(a) for a in row) + " |")
    lines += ["", f"OP {percent(r['op'])}  BWT {percent(r['bwt'])}  FWT {percent(r['fwt'])}"]
    return "\n".join(lines)


def plot_matrix(r: dict, path: Path, title: str | None = None) -> None:
    """Heatmap of the accuracy matrix (blank where a cell was not evaluated)."""
    acc = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(acc[0]), 1 + 0.5 * len(acc)))
    cells = [[float("nan") if a is None else 100 * a for a in row] for row in acc]   # not evaluated: blank
    im = ax.imshow(cells, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(r["stages"])), ["+".join(s) for s in r["stages"]], rotation=45, ha="right")
    ax.set_yticks(range(len(r["tasks"])), r["tasks"])
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            if a is None:
                continue
            ax.text(j, i, points(100 * a, ".0f"), ha="center", va="center", color="w" if a < 0.6 else "k", fontsize=8)
    ax.set_xlabel("after training stage")
    ax.set_ylabel("evaluated task")
    ax.set_title(f"{title or r['method']}: {score_name(r)} (%)")
    fig.colorbar(im, ax=ax, label="%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def method_colours(n: int) -> list:
    """``n`` distinct colours: tab10 up to 10, tab20 up to 20, then evenly spaced hues."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def _final_column(r: dict) -> list[float | None]:
    """Accuracy of every task after the last finished stage (None: not evaluated then)."""
    return [row[-1] if row else None for row in r["accuracy"]]


MAX_BARS = 8          # more runs than this: the final accuracies as a runs x tasks heatmap instead of bars


def _final_heatmap(results: list[dict], path: Path, labels: list[str]) -> None:
    """Final per-task accuracy as a runs x tasks heatmap with an OP column, rows in the given order."""
    tasks = results[0]["tasks"]
    cells = [[float("nan") if a is None else 100 * a for a in _final_column(r)] for r in results]
    fig, ax = plt.subplots(figsize=(3.5 + 0.9 * len(tasks), 1 + 0.32 * len(results)))
    im = ax.imshow(cells, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i, row in enumerate(cells):
        for j, a in enumerate(row):
            if a == a:                                                    # not NaN
                ax.text(j, i, points(a, ".0f"), ha="center", va="center", color="w" if a < 60 else "k", fontsize=7)
    rows = [f"{label}  (OP {percent(r['op'])})" if r["complete"] else f"{label}  ({r['finished_stages']}/"
            f"{len(r['stages'])} stages)" for label, r in zip(labels, results)]
    ax.set_yticks(range(len(results)), rows, fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_title(f"final {score_name(results[0])} (%) per task")
    fig.colorbar(im, ax=ax, label="%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_final_accuracy(results: list[dict], path: Path, labels: list[str] | None = None) -> None:
    """Final per-task accuracy of runs over the same tasks, grouped bars (the paper's Figure 4); a task a run
    has not been evaluated on (half-finished, or ``seen+next``) gets no bar."""
    tasks = results[0]["tasks"]
    if any(r["tasks"] != tasks for r in results):
        raise ValueError("plot_final_accuracy: the runs have different task lists; plot each list apart")
    labels = labels or [r["method"] for r in results]
    if len(results) > MAX_BARS:
        return _final_heatmap(results, path, labels)
    width = 0.8 / len(results)
    colours = method_colours(len(results))
    fig, ax = plt.subplots(figsize=(3.5 + max(1.2, 0.25 * len(results)) * len(tasks), 4))
    for k, (label, r) in enumerate(zip(labels, results)):
        cells = [(i + k * width, 100 * a) for i, a in enumerate(_final_column(r)) if a is not None]
        state = f"OP {percent(r['op'])}" if r["complete"] else f"{r['finished_stages']}/{len(r['stages'])} stages"
        ax.bar([x for x, _ in cells], [h for _, h in cells], width, color=colours[k], label=f"{label} ({state})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel(f"final {score_name(results[0])} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)     # beside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rounds(r: dict, path: Path, title: str | None = None) -> bool:
    """Recurrent-KIF diagnostics per fusion round: mask regions, stability of I_out, share of the update kept."""
    rounds = (r.get("diagnostics") or {}).get("rounds") or []
    if not rounds:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
    x = range(len(rounds))
    stages = [rec.get("stage") for rec in rounds]
    for ax in (a1, a2):                 # a dotted line where a new task starts, named by its stage
        for i in range(1, len(rounds)):
            if stages[i] != stages[i - 1]:
                ax.axvline(i - 0.5, color="grey", linestyle=":", linewidth=1)
        if stages[0] is not None:
            starts = [0] + [i for i in range(1, len(rounds)) if stages[i] != stages[i - 1]]
            for i in starts:
                ax.text(i, 1.0, f"stage {stages[i] + 1}", transform=ax.get_xaxis_transform(), fontsize=7,
                        va="bottom", color="grey")
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
    fig.suptitle(f"{title or r['method']}: knowledge identification per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_tradeoff(results: list[dict], path: Path, labels: list[str] | None = None) -> bool:
    """OP against BWT, one point per label (mean over its finished runs, bars: min to max): the trade-off
    between keeping old tasks and overall accuracy at a glance. False (and no file at ``path``) when no run
    has both OP and BWT."""
    labels = labels or [r["method"] for r in results]
    points: dict[str, list[tuple[float, float]]] = {}
    for label, r in zip(labels, results):
        if r.get("op") is not None and r.get("bwt") is not None:
            points.setdefault(label, []).append((100 * r["bwt"], 100 * r["op"]))
    if not points:
        path.unlink(missing_ok=True)                         # no stale figure from an earlier report
        return False
    colours = method_colours(len(points))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    named, bars = [], []
    for colour, (label, pts) in zip(colours, points.items()):
        bwt, op = [p[0] for p in pts], [p[1] for p in pts]
        x, y = sum(bwt) / len(bwt), sum(op) / len(op)
        ax.errorbar(x, y, xerr=[[x - min(bwt)], [max(bwt) - x]], yerr=[[y - min(op)], [max(op) - y]],
                    fmt="o", color=colour, capsize=2, label=f"{label} ({len(pts)})")
        named.append((label, x, y))
        bars += [((min(bwt), y), (max(bwt), y)), ((x, min(op)), (x, max(op)))]
    ax.margins(x=0.12, y=0.08)          # room for the names of the outermost points
    ax.set_xlabel("BWT (%)  (higher: less forgetting)")
    ax.set_ylabel("OP (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, title="runs")
    fig.tight_layout()                  # before the names: they are placed in the final layout's pixels
    place_names(ax, named, bars=bars)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# where a point's name may go, in points from the point, in order of preference: (dx, dy, ha, va); beyond
# NAME_NEAR a leader line joins name and point
NAME_OFFSETS = [(4, 4, "left", "bottom"), (4, -4, "left", "top"), (-4, 4, "right", "bottom"),
                (-4, -4, "right", "top"), (0, 7, "center", "bottom"), (0, -7, "center", "top"),
                (8, 0, "left", "center"), (-8, 0, "right", "center"), (4, 13, "left", "bottom"),
                (4, -13, "left", "top"), (-4, 13, "right", "bottom"), (-4, -13, "right", "top")]
NAME_NEAR = len(NAME_OFFSETS)
_SIDE_X, _SIDE_Y = {1: "left", 0: "center", -1: "right"}, {1: "bottom", 0: "center", -1: "top"}
NAME_OFFSETS += [(sx * r, sy * r, _SIDE_X[sx], _SIDE_Y[sy]) for r in (18, 28, 40, 56, 72)
                 for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]
NAME_CLEARANCE = 6     # pixels between a name and any other point
LEADER = {"arrowstyle": "-", "color": "0.5", "lw": 0.5, "shrinkA": 0, "shrinkB": 3}


def _crosses(box, segments: list[tuple[tuple[float, float], tuple[float, float]]]) -> bool:
    """Whether the display box meets one of the segments ((x0, y0), (x1, y1)), in display pixels too."""
    return any(PlotPath(segment).intersects_bbox(box) for segment in segments)


def place_names(ax: plt.Axes, named: list[tuple[str, float, float]], fontsize: float = 7,
                bars: list[tuple[tuple[float, float], tuple[float, float]]] = ()) -> list:
    """Write each ``(name, x, y)`` beside its point, at the first of ``NAME_OFFSETS`` where it covers no name
    or leader line written before and no error bar (``bars``: segments in data coordinates), stays inside the
    axes and comes no nearer than ``NAME_CLEARANCE`` to another point (else the first offset): names stay
    legible where points crowd. A name placed beyond the first ``NAME_NEAR`` offsets gets a thin leader line
    to its point, itself clear of the other names. Returns the names' boxes in display pixels."""
    renderer = ax.figure.canvas.get_renderer()
    dots = [ax.transData.transform((x, y)) for _, x, y in named]
    segments = [tuple(ax.transData.transform(end) for end in bar) for bar in bars]
    frame = ax.get_window_extent(renderer)
    taken, leaders = [], []
    for i, (name, x, y) in enumerate(named):
        others = [d for j, d in enumerate(dots) if j != i]
        for k, (dx, dy, ha, va) in enumerate(NAME_OFFSETS + [NAME_OFFSETS[0]]):
            far = NAME_NEAR <= k < len(NAME_OFFSETS)
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                               ha=ha, va=va, arrowprops=LEADER if far else None)
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer)    # the name alone, not its leader line
            near = box.padded(NAME_CLEARANCE)          # a dot just beside a name reads as the name's point
            leader = (dots[i], np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])) if far else None
            blocked = (any(box.overlaps(t) for t in taken) or any(near.contains(*d) for d in others)
                       or _crosses(box, segments + leaders) or not frame.contains(box.x0, box.y0)
                       or not frame.contains(box.x1, box.y1))
            if leader is not None:          # it may cross a crowd of points, never a name
                blocked = blocked or any(_crosses(t, [leader]) for t in taken)
            if not blocked or k == len(NAME_OFFSETS):
                break
            text.remove()
        taken.append(box)
        if leader is not None:
            leaders.append(leader)
    return taken


# captions of the plots in report.html
MATRIX_CAPTION = "score of each task (rows) after each training stage (columns)"
ROUNDS_CAPTION = "Recurrent-KIF: knowledge identification per fusion round"
FINAL_CAPTION = "final score per task"
TRADEOFF_CAPTION = "OP against BWT: mean over each entry's runs, bars from min to max"
PAIRED_CAPTION = "each entry minus the same (order, seed) run of"


def report(paths: list[Path], out: Path | None = None, html: bool = False) -> str:
    """Write heatmaps, final-accuracy plots (one per task list) and table.md into ``out`` (default:
    ``default_report_dir``), each run named by its folder, and with ``html`` the page report.html
    (``rkif.html_report``); return the markdown table."""
    paths = list({_results_file(Path(p)).resolve(): Path(p) for p in paths}.values())    # a run given twice: once
    results, labels = load_results(paths), run_labels(paths)
    out = out or default_report_dir(paths)
    io.check_output_dir(out, "--out")
    runs = []
    for r, label in zip(results, labels):
        plots = [(out / f"matrix_{_file_name(label)}.png", MATRIX_CAPTION),
                 (out / f"rounds_{_file_name(label)}.png", ROUNDS_CAPTION)]
        plot_matrix(r, plots[0][0], label)
        runs.append((label, r, plots if plot_rounds(r, plots[1][0], label) else plots[:1]))
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(results):
        groups.setdefault(tuple(r["tasks"]), []).append(i)
    table = summary_table(results, labels)
    figures = [(out / "op_vs_bwt.png", TRADEOFF_CAPTION)] if plot_tradeoff(results, out / "op_vs_bwt.png",
                                                                            labels) else []
    for k, members in enumerate(groups.values()):
        name = "final_accuracy.png" if len(groups) == 1 else f"final_accuracy_{k + 1}.png"
        plot_final_accuracy([results[i] for i in members], out / name, [labels[i] for i in members])
        figures.insert(k, (out / name, f"{FINAL_CAPTION}, tasks {', '.join(results[members[0]]['tasks'])}"))
        if len(groups) > 1:
            table += (f"\n\n{name}: {', '.join(labels[i] for i in members)} "
                      f"(tasks {', '.join(results[members[0]]['tasks'])})")
    io.write_text(out / "table.md", table + "\n")
    if html:
        from rkif.html_report import write_html
        write_html(out / "report.html", f"rkif report: {', '.join(labels[:3])}"
                   f"{f' and {len(labels) - 3} more' if len(labels) > 3 else ''}", table, figures, runs)
    return table


# The paper's numbers (Recurrent-KIF, ACL 2025, T5-large): Table 1 means over three orders, as
# (OP, BWT); None where the paper gives none. Ablations (Tables 2 and 10) are Long order 4 only.
PAPER_TABLE1 = {
    "standard": {"seqlora": (43.7, -50.4), "inclora": (66.4, -20.0), "replay": (68.8, -11.7), "ewc": (50.3, None),
                 "l2p": (60.7, None), "lfpt5": (72.7, None), "moelora": (54.1, None),
                 "olora": (75.8, -3.8), "tasl": (76.3, -4.0), "vrmcl": (76.0, -3.7), "migu": (76.6, None),
                 "rkif": (78.4, -2.8), "mtl": (80.3, None)},
    "long": {"seqlora": (11.6, -73.4), "inclora": (61.2, -26.7), "replay": (70.9, -15.4), "ewc": (45.1, None),
             "l2p": (56.1, -16.3), "lfpt5": (69.2, -12.8), "moelora": (27.6, None),
             "olora": (69.6, -4.1), "tasl": (74.4, -5.3), "vrmcl": (74.8, -4.9), "migu": (76.5, None),
             "rkif": (77.8, -3.6), "mtl": (81.8, None)},
    # Appendix B.1, Table 3 (SuperNI, 15 tasks, ROUGE-L)
    "superni": {"replay": (35.4, -15.8), "olora": (25.9, -24.6), "tasl": (41.3, -12.7), "vrmcl": (40.5, -10.9),
                "rkif": (43.3, -8.4), "mtl": (50.7, None)},
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
        return points(mean)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{points(mean)} ± {points(std)}"


def _paper(value: float | None) -> str:
    return "-" if value is None else points(value)


def just_trained(r: dict) -> float | None:
    """Plasticity of one run: mean accuracy on each task right after its stage (None if not recorded)."""
    if not r.get("complete") or "accuracy" not in r:
        return None
    stage_of = {t: j for j, stage in enumerate(r["stages"]) for t in stage}
    return plasticity(r["accuracy"], [stage_of[t] for t in r["tasks"]])


def grid_table(results: list[dict], benchmark: str, paper_rows: dict[str, str] | None = None) -> str:
    """Per method: mean ± sample std over orders and seeds of OP, BWT, plasticity (accuracy right after
    training), FWT; mean training and total (training + evaluation) minutes per run; the paper's columns,
    from the row ``paper_rows[method]`` (default: the method's own name; a grid variant has none unless given)."""
    paper_rows = paper_rows or {}
    methods = list(dict.fromkeys(r["method"] for r in results))
    paper = PAPER_TABLE1.get(benchmark, {})
    ablation = PAPER_TABLE1["long_order4_ablations"]
    lines = ["| method | runs (orders) | OP | BWT | just trained | FWT | train / total min per run | paper OP | "
             "paper BWT | paper ablation OP / BWT (Long O4) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        orders = ",".join(str(o) for o in sorted({r["order"] for r in rs}))
        op, bwt = paper.get(paper_rows.get(m, m), (None, None))
        ab = ablation.get(paper_rows.get(m, m))
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


PAIRED_METRICS = (("OP", lambda r: r["op"]), ("BWT", lambda r: r["bwt"]), ("just trained", just_trained))


def paired_differences(results: list[dict], reference: str) -> dict[str, tuple[int, list]]:
    """Each entry minus ``reference`` on the same (order, seed), over the pairs both have finished: per entry,
    the number of pairs and, per ``PAIRED_METRICS``, (mean difference in points, 95 % t half-width or None
    for one pair), or None where no pair has that metric."""
    by_key = {(r["method"], r["order"], r["config"]["seed"]): r for r in results}
    ref_keys = {k[1:] for k in by_key if k[0] == reference}
    out = {}
    for m in dict.fromkeys(r["method"] for r in results):
        if m == reference:
            continue
        keys = sorted(k[1:] for k in by_key if k[0] == m and k[1:] in ref_keys)
        cells = []
        for _, get in PAIRED_METRICS:
            pairs = [(get(by_key[(m, *k)]), get(by_key[(reference, *k)])) for k in keys]
            pairs = [(100 * a, 100 * b) for a, b in pairs if a is not None and b is not None]
            cells.append(paired_difference([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None)
        out[m] = (len(keys), cells)
    return out


def difference_text(cell: tuple[float, float | None] | None) -> str:
    """One ``paired_differences`` cell as text: ``+2.0 [-5.5, +9.5]``, ``+2.0`` for one pair, ``-`` for none."""
    if cell is None:
        return "-"
    mean, half = cell
    if half is None:
        return points(mean, "+.1f")
    return f"{points(mean, '+.1f')} [{points(mean - half, '+.1f')}, {points(mean + half, '+.1f')}]"


def paired_table(results: list[dict], reference: str) -> str:
    """``paired_differences`` as markdown: mean [95 % t interval] in points per entry and metric (entries
    with no pair left out)."""
    lines = [f"Paired differences to {reference} (points; mean [95 % t interval] over the (order, seed) pairs both "
             "finished):", "",
             "| method | pairs | " + " | ".join(f"Δ {name}" for name, _ in PAIRED_METRICS) + " |",
             "|---|---|" + "---|" * len(PAIRED_METRICS)]
    for m, (n, cells) in paired_differences(results, reference).items():
        if not n:                                            # no (order, seed) shared with the reference yet
            continue
        lines.append(f"| {m} | {n} | " + " | ".join(map(difference_text, cells)) + " |")
    return "\n".join(lines)


def plot_paired_differences(results: list[dict], reference: str, path: Path) -> bool:
    """One panel per ``PAIRED_METRICS``: each entry's mean difference to ``reference`` (dot) and its 95 % t
    interval (bar; none for one pair), a line at 0. False (and no file at ``path``) when no entry has a pair."""
    diffs = {m: v for m, v in paired_differences(results, reference).items() if v[0]}
    if not diffs:
        path.unlink(missing_ok=True)                         # no stale figure from an earlier report
        return False
    names = list(diffs)
    y = np.arange(len(names))[::-1]                          # the table's order, top to bottom
    colours = method_colours(len(names))
    fig, axes = plt.subplots(1, len(PAIRED_METRICS), sharey=True, figsize=(3.2 * len(PAIRED_METRICS) + 1.5,
                                                                         0.45 * len(names) + 1.4))
    for k, (ax, (metric, _)) in enumerate(zip(axes, PAIRED_METRICS)):
        ax.axvline(0, color="grey", lw=0.8)
        for yi, name, colour in zip(y, names, colours):
            cell = diffs[name][1][k]
            if cell is not None:
                ax.errorbar(cell[0], yi, xerr=None if cell[1] is None else cell[1], fmt="o", color=colour,
                            capsize=3)
        ax.set_xlabel(f"Δ {metric} (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [f"{n} ({diffs[n][0]})" for n in names])
    axes[0].set_ylim(-0.7, len(names) - 0.3)
    fig.suptitle(f"each entry minus {reference} on the same (order, seed): mean and 95 % t interval; "
                 "(n): pairs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def seeded_labels(results: list[dict]) -> list[str]:
    """Each run's method, with its seed (``rkif s42``) where the runs hold several seeds, so a legend tells
    them apart."""
    several = len({r["config"]["seed"] for r in results}) > 1
    return [f"{r['method']} s{r['config']['seed']}" if several else r["method"] for r in results]


def grid_report(out: Path, runs: list, benchmark: str, labels: list[str] | None = None,
                reference: str | Sequence[str] = (), html: bool = False, title: str | None = None,
                paper_rows: dict[str, str] | None = None) -> str:
    """table.md, per-run heatmaps and per-order final-accuracy plots of a grid's finished runs.

    ``labels``: each run's name in the grid (a variant's name; default the method's); ``paper_rows``: the
    paper's row each such name is read against, where it is not the name itself (``grid_table``). With
    ``reference`` (an entry, or several), table.md adds the paired differences of every entry to each, and
    plots/ draws them (``paired_differences.png`` for the first, ``paired_differences_<entry>.png``). With ``html``,
    also report.html (``rkif.html_report``), titled ``title`` (default: the folder's name).
    """
    results = [io.read_json(r.output_dir / "results.json") for r in runs]
    if labels is not None:
        for r, label in zip(results, labels, strict=True):
            r["method"] = label
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    per_run = []
    for r in results:
        name = f"{r['method']}_order{r['order']}_seed{r['config']['seed']}"
        files = [(plots / f"matrix_{name}.png", MATRIX_CAPTION), (plots / f"rounds_{name}.png", ROUNDS_CAPTION)]
        plot_matrix(r, files[0][0])
        per_run.append((r["method"], r, files if plot_rounds(r, files[1][0]) else files[:1]))
    figures = []
    for order in sorted({r["order"] for r in results}):
        figures.append((plots / f"final_accuracy_order{order}.png", f"{FINAL_CAPTION}, order {order}"))
        same_order = [r for r in results if r["order"] == order]
        plot_final_accuracy(same_order, figures[-1][0], seeded_labels(same_order))
    if plot_tradeoff(results, plots / "op_vs_bwt.png"):
        figures.append((plots / "op_vs_bwt.png", TRADEOFF_CAPTION))
    references = [reference] if isinstance(reference, str) else list(reference)
    paired = [plots / ("paired_differences.png" if k == 0 else f"paired_differences_{_file_name(ref)}.png")
              for k, ref in enumerate(references)]
    for stale in set(plots.glob("paired_differences*.png")) - set(paired):    # a reference the grid no longer has
        stale.unlink()
    for ref, path in zip(references, paired):
        if plot_paired_differences(results, ref, path):
            figures.append((path, f"{PAIRED_CAPTION} {ref}"))
    table = grid_table(results, benchmark, paper_rows) if results else "(no finished runs yet)"
    for ref in references if results else ():
        table += "\n\n" + paired_table(results, ref)
    io.write_text(out / "table.md", table + "\n")
    if html:
        from rkif.html_report import write_html
        write_html(out / "report.html", f"rkif bench: {title or Path(out).resolve().name} ({benchmark})", table,
                   figures, per_run)
    return table
