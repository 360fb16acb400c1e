"""Grid variants (one method under several names), plasticity and the paired table, on synthetic results."""

import json
import re
from pathlib import Path

import pytest

from rkif.bench import bench, grid_runs, load_grid, run_label
from rkif.metrics import backward_transfer, overall_performance, plasticity
from rkif.report import grid_table, just_trained, paired_difference, paired_table, t_quantile_975
from tests.conftest import BENCHMARKS

VARIANTS = """
name = "controls"
orders = [1, 2]
seeds = [1, 2]
methods = ["rkif", "rkif-ki", "random", "long"]
reference = "rkif"
[run]
epochs = 1.0
lr = 1e-3
[variants.random]
method = "rkif"
options = { mask_source = "random" }
[variants.long]
method = "rkif-ki"
options = { inner_steps = 4 }
run = { epochs = 3.0 }
paper = "rkif-ki"
[method_options.random]
top_fraction = 0.3
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_variant_is_a_method_with_options_and_run_settings_under_its_own_name(tmp_path):
    grid = load_grid(write(tmp_path / "g.toml", VARIANTS))
    runs = grid_runs(grid, tmp_path)
    assert [(run_label(r), r.method, r.order, r.seed) for r in runs][::4] == [
        ("rkif", "rkif", 1, 1), ("rkif-ki", "rkif-ki", 1, 1), ("random", "rkif", 1, 1), ("long", "rkif-ki", 1, 1)]
    by = {run_label(r): r for r in runs}
    assert by["random"].method_options == {"mask_source": "random", "top_fraction": 0.3}   # [method_options] on top
    assert by["rkif"].method_options == {} and by["rkif"].epochs == 1.0
    assert by["long"].method_options == {"inner_steps": 4} and by["long"].epochs == 3.0 and by["long"].lr == 1e-3
    assert Path(by["long"].output) == tmp_path / "runs" / "long" / "order2-seed2"


@pytest.mark.parametrize("extra, fault", [
    ('[variants.rkif-gm]\nmethod = "rkif"\n', "already a method or preset"),
    ('[variants.x]\noptions = { top_fraction = 0.1 }\n', "needs method"),
    ('[variants.x]\nmethod = "rkif"\nopts = {}\n', "unknown key(s) ['opts']"),
    ('[variants.x]\nmethod = "rkif"\noptions = { mask_sorce = "random" }\n', "mask_sorce"),
    ('[variants.x]\nmethod = "rkif"\noptions = { fusion = "sum", mask_source = "random" }\n', "binary masks"),
    ('[variants.x]\nmethod = "nope"\n', "unknown method 'nope'"),
    ('[variants.x]\nmethod = "rkif"\nrun = { epoch = 3 }\n', "run has unknown field(s) ['epoch']"),
    ('[variants.x]\nmethod = "rkif"\nrun = { seed = 3 }\n', "may not set ['seed']"),
    ('[variants.y]\nmethod = "rkif"\n', "[variants] for methods not in the grid: ['y']"),
    ('reference = "seqlora"\n', "reference 'seqlora' is not in the grid"),
    ('reference = ["rkif", "seqlora"]\n', "reference 'seqlora' is not in the grid"),
    ('reference = ["rkif", "rkif"]\n', "'reference' must be an entry of 'methods' or a list of distinct ones"),
    ('reference = 1\n', "'reference' must be an entry"),
    ('[variants.x]\nmethod = "rkif"\npaper = "rkif2"\n', "paper = 'rkif2': expected the method whose row"),
])
def test_bad_variants_are_refused_naming_the_file_and_the_entry(tmp_path, extra, fault):
    text = 'name = "g"\norders = [1]\nmethods = ["rkif", "x"]\n' + extra
    if "[variants.x]" not in extra:
        text = 'name = "g"\norders = [1]\nmethods = ["rkif"]\n' + extra
    path = write(tmp_path / "g.toml", text)
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        load_grid(path)
    assert fault in str(err.value)


# -- plasticity and the paired table ---------------------------------------------------------------
def test_plasticity_is_the_accuracy_right_after_training():
    acc = [[0.9, 0.8, 0.7], [0.1, 0.6, 0.5], [0.2, 0.3, 0.4]]
    assert plasticity(acc) == pytest.approx((0.9 + 0.6 + 0.4) / 3)
    k = len(acc)          # OP = plasticity + (K-1)/K BWT
    assert overall_performance(acc) == pytest.approx(plasticity(acc) + (k - 1) / k * backward_transfer(acc))
    assert plasticity([[0.5], [0.7]], [0, 0]) == pytest.approx(0.6)                   # one stage (MTL): OP
    assert just_trained({"complete": True, "accuracy": [[0.5], [0.7]], "stages": [["a", "b"]],
                         "tasks": ["a", "b"]}) == pytest.approx(0.6)
    assert just_trained({"complete": False, "accuracy": [[0.5]], "stages": [["a"]], "tasks": ["a"]}) is None


def test_t_quantile_and_paired_interval():
    assert t_quantile_975(2) == 4.3027 and t_quantile_975(8) == 2.306
    scipy_t = pytest.importorskip("scipy.stats").t
    for df in (1, 5, 8, 30, 31, 45, 100, 1000):
        assert t_quantile_975(df) == pytest.approx(scipy_t.ppf(0.975, df), abs=1e-4)
    mean, half = paired_difference([3.0, 5.0, 7.0], [1.0, 1.0, 1.0])                 # diffs 2, 4, 6: sd 2
    assert mean == 4.0 and half == pytest.approx(4.3027 * 2 / 3**0.5)
    assert paired_difference([2.0], [1.0]) == (1.0, None)
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def _result(method, order, seed, acc, seconds=60.0):
    """A finished run's results.json with a square accuracy matrix (tasks t0..)."""
    k = len(acc)
    return {"method": method, "model": "minilm", "order": order, "complete": True, "config": {"seed": seed},
            "tasks": [f"t{i}" for i in range(k)], "stages": [[f"t{i}"] for i in range(k)], "accuracy": acc,
            "initial_accuracy": [0.0] * k, "op": overall_performance(acc), "bwt": backward_transfer(acc),
            "fwt": None, "seconds": seconds, "stage_log": [{"train_seconds": seconds / 2}]}


def _acc(first_after, second):
    """Two tasks: a[0][0] = 0.8, a[0][1] = first_after, a[1][1] = second."""
    return [[0.8, first_after], [0.1, second]]


def _row(table: str, method: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_paired_table_differences_on_the_same_order_and_seed():
    ref = [_result("rkif", o, s, _acc(0.6, 0.7)) for o in (1, 2) for s in (1, 2)]
    ki = [_result("rkif-ki", o, s, _acc(0.6 + d, 0.7)) for (o, s), d in zip(((1, 1), (1, 2), (2, 1), (2, 2)),
                                                                             (0.02, 0.04, 0.06, 0.08))]
    lone = [_result("random", 1, 1, _acc(0.5, 0.9)), _result("random", 3, 1, _acc(0.0, 0.0))]   # order 3: no pair
    table = paired_table(ref + ki + lone, "rkif")
    # rkif-ki: BWT diffs 2, 4, 6, 8 points (mean 5, sd 2.582), OP diffs half of them, plasticity 0
    half = 3.1824 * (20 / 3) ** 0.5 / 2
    assert _row(table, "rkif-ki") == ["rkif-ki", "4", f"+2.5 [{2.5 - half / 2:+.1f}, {2.5 + half / 2:+.1f}]",
                                      f"+5.0 [{5 - half:+.1f}, {5 + half:+.1f}]", "+0.0 [+0.0, +0.0]"]
    assert _row(table, "random") == ["random", "1", "+5.0", "-10.0", "+10.0"]         # one pair: no interval
    assert "| rkif |" not in table
    assert "| later |" not in paired_table(ref + [_result("later", 3, 1, _acc(0.5, 0.9))], "rkif")   # no pair
    rows = grid_table(ref + ki, "standard")
    assert _row(rows, "rkif")[4] == "75.0 ± 0.0"                                       # plasticity column


def test_bench_report_labels_variants_and_adds_the_paired_table(tmp_path, monkeypatch):
    from rkif import runner

    def must_not_run(run):
        raise AssertionError("report only")

    monkeypatch.setattr(runner, "run_experiment", must_not_run)
    config = write(tmp_path / "g.toml", VARIANTS)
    out = tmp_path / "out"
    for name, bump in (("rkif", 0.0), ("random", -0.1), ("long", 0.05)):
        for order in (1, 2):
            for seed in (1, 2):
                run_dir = out / "runs" / name / f"order{order}-seed{seed}"
                run_dir.mkdir(parents=True)
                (run_dir / "results.json").write_text(json.dumps(_result(name, order, seed, _acc(0.6 + bump, 0.7))))
    table, failed = bench(config, out, report_only=True)
    assert not failed and table.startswith((out / "table.md").read_text().strip())
    assert _row(table, "random")[1] == "4 (1,2)" and _row(table, "long")[2] == "67.5 ± 0.0"
    assert "Paired differences to rkif" in table
    assert _row(table.split("Paired differences")[1], "random")[2:4] == ["-5.0 [-5.0, -5.0]", "-10.0 [-10.0, -10.0]"]
    assert _row(table.split("Paired differences")[1], "long")[1] == "4"
    main = table.split("Paired differences")[0]                 # the paper's columns: a variant's only if named
    assert _row(main, "rkif")[7:] == ["78.4", "-2.8", "77.9 / -3.4"]
    assert _row(main, "random")[7:] == ["-", "-", "-"] and _row(main, "long")[7:] == ["-", "-", "52.3 / -21.5"]
    assert (out / "plots" / "matrix_random_order2_seed1.png").stat().st_size > 0
    assert "12 of 16 runs finished" in table                                           # rkif-ki has none yet
    _, _ = bench(config, out, report_only=True, methods=["random"])                    # a variant name selects
    with pytest.raises(ValueError, match="not in the grid"):
        bench(config, out, report_only=True, methods=["rkif-random"])


def test_several_references_give_one_paired_table_and_plot_each(tmp_path, monkeypatch):
    from rkif import runner

    monkeypatch.setattr(runner, "run_experiment", lambda run: None)
    config = write(tmp_path / "g.toml", VARIANTS.replace('reference = "rkif"', 'reference = ["rkif", "long"]'))
    out = tmp_path / "out"
    for name, bump in (("rkif", 0.0), ("random", -0.1), ("long", 0.05)):
        for order, seed in ((1, 1), (2, 2)):
            run_dir = out / "runs" / name / f"order{order}-seed{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "results.json").write_text(json.dumps(_result(name, order, seed, _acc(0.6 + bump, 0.7))))
    table, _ = bench(config, out, report_only=True)
    to_rkif, to_long = table.split("Paired differences to rkif ")[1].split("Paired differences to long ")
    assert _row(to_rkif, "random")[2] == "-5.0 [-5.0, -5.0]" and _row(to_rkif, "long")[2] == "+2.5 [+2.5, +2.5]"
    assert _row(to_long, "random")[2] == "-7.5 [-7.5, -7.5]" and _row(to_long, "rkif")[2] == "-2.5 [-2.5, -2.5]"
    assert "| long |" not in to_long
    plots = out / "plots"
    assert (plots / "paired_differences.png").stat().st_size > 0
    assert (plots / "paired_differences_long.png").stat().st_size > 0
    write(tmp_path / "g.toml", VARIANTS)                      # "long" is no longer a reference: its figure goes
    bench(config, out, report_only=True)
    assert (plots / "paired_differences.png").exists() and not (plots / "paired_differences_long.png").exists()


def test_the_committed_control_and_budget_grids_load():
    root = BENCHMARKS
    controls = grid_runs(load_grid(root / "rkif_controls.toml"), Path("out"))
    assert len(controls) == 8 * 3 * 3 and {r.method for r in controls} == {"rkif", "rkif-ki", "vrmcl"}
    assert {run_label(r): r.method_options for r in controls}["rkif-outer-decay"] == {"outer_lr_schedule": "trainer"}
    budget = grid_runs(load_grid(root / "budget.toml"), Path("out"))   # the points no other grid has
    plain = [r for r in budget if not r.method_options]
    assert sorted((r.method, r.epochs) for r in plain) == sorted(
        [("replay", 3.0), ("vrmcl", 3.0)] + [(m, 10.0) for m in ("rkif", "rkif-ki", "replay", "vrmcl")])
    assert all(run_label(r) == f"{r.method}-e{int(r.epochs)}" and r.order == 1 for r in plain)
    masks_out = {run_label(r): (r.method, r.method_options, r.epochs) for r in budget if r.method_options}
    assert masks_out == {f"rkif-masks-out-e{e}": ("rkif", {"masks_on": "out"}, float(e)) for e in (3, 10)}
    seeds = grid_runs(load_grid(root / "budget_seeds.toml"), Path("out"))
    assert {(r.method, r.epochs) for r in seeds} == {
        ("rkif", 3.0), ("rkif-ki", 3.0), ("rkif", 10.0), ("rkif-ki", 10.0), ("vrmcl", 10.0)}
    assert sorted({r.seed for r in seeds}) == [43, 44] and all(r.order == 1 for r in seeds)


def test_paired_differences_and_their_plot(tmp_path):
    from rkif.report import paired_differences, plot_paired_differences

    ref = [_result("rkif", 1, s, _acc(0.6, 0.7)) for s in (1, 2)]
    ki = [_result("rkif-ki", 1, s, _acc(0.6 + d, 0.7)) for s, d in ((1, 0.02), (2, 0.06))]
    unpaired = [_result("random", 3, 1, _acc(0.5, 0.9))]
    diffs = paired_differences(ref + ki + unpaired, "rkif")
    assert diffs["random"] == (0, [None, None, None])
    n, (op, bwt, plast) = diffs["rkif-ki"]
    assert n == 2 and op[0] == pytest.approx(2.0) and bwt[0] == pytest.approx(4.0) and plast == (0.0, 0.0)
    assert bwt[1] == pytest.approx(12.7062 * 2)           # diffs 2, 6: sd 2 * 2**0.5, over sqrt(2) pairs: 2
    path = tmp_path / "paired.png"
    assert plot_paired_differences(ref + ki + unpaired, "rkif", path) and path.stat().st_size > 0
    assert not plot_paired_differences(ref + unpaired, "rkif", path)
    assert not path.exists()                              # the earlier figure is not left behind


def test_final_accuracy_legends_name_the_seed_where_a_grid_has_several():
    from rkif.report import seeded_labels

    seeded = [_result("rkif", 2, s, _acc(0.6, 0.7)) for s in (42, 43)]
    assert seeded_labels(seeded) == ["rkif s42", "rkif s43"]
    assert seeded_labels(seeded[:1] + [_result("replay", 2, 42, _acc(0.6, 0.7))]) == ["rkif", "replay"]
