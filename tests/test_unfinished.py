"""benchmarks/unfinished.py lists what a fresh clone needs to resume a grid's unfinished runs."""

import subprocess
from pathlib import Path

from rkif import io
from tests.conftest import benchmark_script


def test_lists_results_and_the_last_checkpoint_of_unfinished_runs_only(tmp_path):
    module = benchmark_script("unfinished")
    for name, finished, complete in (("a", 2, False), ("b", 4, True), ("c", 0, False)):
        run = tmp_path / "runs" / name / "order1-seed42"
        for stage in range(finished):
            io.write_tensors(run / "checkpoints" / f"stage_{stage}" / "adapter.safetensors", {})
        io.write_json(run / "results.json", {"finished_stages": finished, "complete": complete})
    a = tmp_path / "runs" / "a" / "order1-seed42"
    assert module.resumable_files(tmp_path) == [a / "results.json", a / "checkpoints" / "stage_1"]


def test_superseded_checkpoints_are_the_tracked_ones_no_resume_reads(tmp_path):
    module = benchmark_script("unfinished")
    for name, finished, complete in (("a", 2, False), ("b", 4, True)):
        run = tmp_path / "runs" / name / "order1-seed42"
        for stage in range(finished):
            io.write_tensors(run / "checkpoints" / f"stage_{stage}" / "adapter.safetensors", {})
        io.write_json(run / "results.json", {"finished_stages": finished, "complete": complete})
    a, b = (tmp_path / "runs" / name / "order1-seed42" for name in "ab")
    tracked = [
        a / "results.json",
        a / "checkpoints" / "stage_0" / "adapter.safetensors",
        a / "checkpoints" / "stage_1" / "adapter.safetensors",
        b / "results.json",
        b / "checkpoints" / "stage_3" / "adapter.safetensors",
    ]
    assert module.superseded_checkpoints(tmp_path, tracked) == [
        a / "checkpoints" / "stage_0" / "adapter.safetensors",
        b / "checkpoints" / "stage_3" / "adapter.safetensors",
    ]


def test_tracked_files_are_spelled_as_the_grid_folder_is(tmp_path, monkeypatch):
    module = benchmark_script("unfinished")
    tmp_path = tmp_path.resolve()                                  # as os.getcwd() spells it
    grid = tmp_path / "grid"
    io.write_json(grid / "runs" / "a" / "order1-seed42" / "results.json", {})
    (grid / "untracked.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "add", "grid/runs"], check=True)
    relative = Path("grid") / "runs" / "a" / "order1-seed42" / "results.json"
    assert module.tracked_files(Path("grid")) == [relative]
    assert module.tracked_files(grid) == [tmp_path / relative]
