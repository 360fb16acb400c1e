"""benchmarks/budget_plot.py: OP, BWT and "just trained" against epochs per task, from several grid folders."""

from pathlib import Path

import pytest

from rkif import io
from rkif.config import RunConfig
from tests.conftest import benchmark_script


def _run(folder: Path, name: str, method: str, epochs: float, order: int = 1, bwt: float | None = -0.1,
         rounds: int = 0, seed: int = 42, op: float = 0.8, **settings) -> None:
    config = RunConfig(method=method, epochs=epochs, order=order, seed=seed, output=str(folder / name),
                       **settings).to_dict()
    acc = [[0.8, 0.7], [None, 0.9]]
    io.write_json(folder / "runs" / name / f"order{order}-seed{seed}" / "results.json", {
        "method": method, "order": order, "tasks": ["a", "b"], "stages": [["a"], ["b"]], "accuracy": acc,
        "op": op, "bwt": bwt, "complete": True, "config": config,
        "stage_log": [{"steps": int(63 * epochs)}, {"steps": int(63 * epochs)}],
        "diagnostics": {"rounds": [{"stage": 1, "round": k} for k in range(rounds)]}})


def test_points_from_several_grids_make_one_table_and_plot(tmp_path):
    module = benchmark_script("budget_plot")
    one, two = tmp_path / "budget", tmp_path / "standard"
    _run(one, "rkif-e3", "rkif", 3.0, rounds=24)
    _run(two, "rkif", "rkif", 1.0, rounds=8, eval_scope="all")       # every cell evaluated: the same metrics
    _run(two, "rkif", "rkif", 1.0, order=2, rounds=8, eval_scope="all")
    _run(two, "replay", "replay", 1.0)
    _run(two, "mtl", "mtl", 1.0, bwt=None)                            # no BWT: not a point
    _run(two, "rkif-random", "rkif", 1.0, method_options={"mask_source": "random"})   # a variant: its own entry
    points = module.load_points([one, two, tmp_path / "not-yet"], orders=[1])
    assert sorted(points) == [("replay", 1.0), ("rkif", 1.0), ("rkif", 3.0), ("rkif mask_source=random", 1.0)]
    assert [len(v) for _, v in sorted(points.items())] == [1, 1, 1, 1]
    table = module.table(points)
    assert "| rkif | 3 | 1 | 42 | 189 | 24 | 80.0 | -10.0 | 85.0 |" in table
    assert "| replay | 1 | 1 | 42 | 63 | - |" in table
    assert module.entry_name("rkif masks_on=out fusion=sum") == "rkif fusion=sum masks_on=out"
    assert list(module.load_points([two], methods=["rkif"])) == [("rkif", 1.0)]      # an entry: no variant
    assert len(module.load_points([two], methods=["rkif"])[("rkif", 1.0)]) == 2
    assert list(module.load_points([two], methods=["rkif mask_source=random"])) == [("rkif mask_source=random", 1.0)]
    module.main([str(one), str(two), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "budget.png").stat().st_size > 0 and (tmp_path / "out" / "budget.md").exists()


def test_one_point_with_other_settings_in_two_grids_is_refused(tmp_path):
    module = benchmark_script("budget_plot")
    _run(tmp_path / "a", "rkif", "rkif", 1.0)
    _run(tmp_path / "b", "rkif", "rkif", 1.0, order=2, lr=5e-4)
    with pytest.raises(ValueError, match=r"rkif at 1 epochs differs from .* in \['lr'\]"):
        module.load_points([tmp_path / "a", tmp_path / "b"])


def test_an_order_and_seed_in_two_folders_counts_once_and_pairs_give_intervals(tmp_path):
    module = benchmark_script("budget_plot")
    first, second = tmp_path / "controls", tmp_path / "standard"
    for seed, (ref, ki) in zip((42, 43, 44), ((0.60, 0.65), (0.62, 0.61), (0.58, 0.60))):
        _run(first, "rkif", "rkif", 1.0, seed=seed, op=ref)
        _run(first, "rkif-ki", "rkif-ki", 1.0, seed=seed, op=ki)
    _run(second, "rkif", "rkif", 1.0, op=0.10)                       # seed 42 again: the first folder's counts
    _run(second, "rkif-ki", "rkif-ki", 3.0, op=0.70)                  # no rkif at 3 epochs: no pair
    points = module.load_points([first, second])
    assert sorted(round(100 * r["op"]) for r in points[("rkif", 1.0)]) == [58, 60, 62]
    table = module.paired_table(points, "rkif")
    # differences +5, -1, +2: mean +2.0, sample std 3.0, half-width t(2) * 3 / sqrt(3) = 7.45
    assert "| rkif-ki | 1 | 3 | +2.0 [-5.5, +9.5] | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] |" in table
    assert "| rkif-ki | 3 |" not in table
    assert "| rkif | 1 | 3 | 42,43,44 |" in module.table(points)
    module.main([str(first), str(second), "--reference", "rkif", "--out", str(tmp_path / "out")])
    assert "Paired differences to rkif" in (tmp_path / "out" / "budget.md").read_text()
    with pytest.raises(SystemExit, match="--reference vrmcl: no finished run"):
        module.main([str(first), "--reference", "vrmcl", "--out", str(tmp_path / "out")])
