"""Plots that stay readable: distinct colours, a heatmap for many runs, task boundaries, OP against BWT."""

import matplotlib.axes
import pytest

from rkif import report


def fake_run(method: str, op: float | None = 0.5, bwt: float | None = -0.1, rounds=None) -> dict:
    acc = [[0.8, 0.6], [None, 0.9]]
    return {"method": method, "tasks": ["a", "b"], "stages": [["a"], ["b"]], "accuracy": acc, "op": op,
            "bwt": bwt, "complete": True, "finished_stages": 2, "diagnostics": {"rounds": rounds or []}}


@pytest.mark.parametrize("n", [3, 10, 20, 25])
def test_method_colours_are_distinct(n):
    assert len(set(report.method_colours(n))) == n


def test_many_runs_become_a_heatmap_few_stay_bars(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(report, "_final_heatmap", lambda results, path, labels: drawn.append(len(results)))
    report.plot_final_accuracy([fake_run(f"m{i}") for i in range(report.MAX_BARS)], tmp_path / "bars.png")
    assert drawn == [] and (tmp_path / "bars.png").exists()
    report.plot_final_accuracy([fake_run(f"m{i}") for i in range(report.MAX_BARS + 1)], tmp_path / "heat.png")
    assert drawn == [report.MAX_BARS + 1]


def test_final_heatmap_is_written(tmp_path):
    report.plot_final_accuracy([fake_run(f"m{i}") for i in range(12)], tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 0


def test_op_against_bwt_needs_runs_with_both(tmp_path):
    assert not report.plot_tradeoff([fake_run("mtl", bwt=None)], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert report.plot_tradeoff([fake_run("a"), fake_run("a", op=0.6), fake_run("b")], tmp_path / "t.png")
    assert (tmp_path / "t.png").exists()
    assert not report.plot_tradeoff([fake_run("mtl", bwt=None)], tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()                 # the earlier figure is not left behind


def test_rounds_plot_marks_each_new_task(tmp_path, monkeypatch):
    lines = []
    real = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x, **kw: lines.append(x) or real(self, x, **kw))
    keys = {"in_only": 0.1, "out_only": 0.1, "shared": 0.1, "neither": 0.7}
    rounds = [{"stage": s, **keys} for s in (1, 1, 1, 2, 2, 3)]
    assert report.plot_rounds(fake_run("rkif", rounds=rounds), tmp_path / "r.png")
    assert sorted(set(lines)) == [2.5, 4.5] and len(lines) == 4          # two boundaries, on both panels


def test_names_of_crowded_points_do_not_cover_each_other():
    """Five points within a point's width of each other (as rkif's presets on the MiniLM grid): each name
    finds a place of its own, clear of the other names and of the other points."""
    fig, ax = report.plt.subplots(figsize=(7.5, 5))
    named = [(f"rkif-variant-{i}", 0.2 * i, 64 + 0.1 * i) for i in range(5)] + [("far", -30.0, 40.0)]
    ax.plot([x for _, x, _ in named], [y for _, _, y in named], "o")
    ax.set_xlim(-50, 25)
    ax.set_ylim(35, 67)
    boxes = report.place_names(ax, named)
    assert len(boxes) == len(named)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    dots = [ax.transData.transform((x, y)) for _, x, y in named]
    assert not any(box.padded(report.NAME_CLEARANCE).contains(*dot)
                   for i, box in enumerate(boxes) for j, dot in enumerate(dots) if i != j)
    report.plt.close(fig)


def test_names_keep_off_error_bars_and_far_names_get_a_leader_line():
    """Eight points in a cluster, each with error bars across it (as the R-KIF presets on the MiniLM grid):
    no name covers a bar, another name, another name's leader line or another point, every name stays inside
    the axes, and a name moved off its point is joined to it by a leader that crosses no other name."""
    fig, ax = report.plt.subplots(figsize=(7.5, 5))
    named = [(f"rkif-variant-{i}", 0.4 * (i % 4), 60 + 0.8 * (i // 4)) for i in range(8)]
    bars = [b for _, x, y in named for b in (((x - 3, y), (x + 3, y)), ((x, y - 2), (x, y + 2)))]
    ax.plot([x for _, x, _ in named], [y for _, _, y in named], "o")
    ax.set_xlim(-50, 25)
    ax.set_ylim(35, 67)
    boxes = report.place_names(ax, named, bars=bars)
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    segments = [tuple(ax.transData.transform(end) for end in bar) for bar in bars]
    dots = [ax.transData.transform((x, y)) for _, x, y in named]
    leaders = [(i, t.arrow_patch.get_path().transformed(t.arrow_patch.get_transform())) for i, t in enumerate(ax.texts)
               if t.arrow_patch is not None]
    assert not any(report._crosses(box, segments) for box in boxes)
    assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert not any(box.padded(report.NAME_CLEARANCE).contains(*dot)
                   for i, box in enumerate(boxes) for j, dot in enumerate(dots) if i != j)
    assert leaders and all(max(map(abs, ax.texts[i].get_position())) >= 18 for i, _ in leaders)  # far names only
    assert not any(line.intersects_bbox(box) for i, line in leaders for j, box in enumerate(boxes) if i != j)
    report.plt.close(fig)
