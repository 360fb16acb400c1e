"""Two-process DDP on CPU (gloo): identical weights on both ranks, equal to one process, same global batch;
evaluation sharded between the ranks, with the single process's accuracy matrix and answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import MINILM_WEIGHTS_MISSING

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks_match_each_other_and_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    _run([*torchrun, str(WORKER), str(tmp_path / "ddp"), "8"], tmp_path)
    _run([sys.executable, str(WORKER), str(tmp_path / "single"), "16"], tmp_path)
    r0, r1 = (load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1))
    single = load_file(tmp_path / "single" / "rank0.safetensors")
    for n in single:
        assert torch.equal(r0[n], r1[n]), n                                   # ranks agree bit for bit
        assert torch.allclose(r0[n], single[n], atol=1e-5), n                 # = one process, same global batch

    e0, e1 = (json.loads((tmp_path / "ddp" / f"eval{r}.json").read_text()) for r in (0, 1))
    alone = json.loads((tmp_path / "single" / "eval0.json").read_text())
    assert e0["matrix"] == e1["matrix"] == alone["matrix"]                    # the single process's matrix
    assert len({a for col in alone["matrix"] for a in col}) > 2               # training moved it
    # three evaluations of test sets of 31 and 1 examples: rank 0 answers 16 + 1, rank 1 15 + 0 each time
    assert (e0["toy_predicted"], e1["toy_predicted"], alone["toy_predicted"]) == (3 * 17, 3 * 15, 3 * 32)
    families = {"causal", "seq2seq"} | (set() if MINILM_WEIGHTS_MISSING else {"encoder"})
    assert set(alone["families"]) == set(e0["families"]) == families
    for family, want in alone["families"].items():
        got0, got1 = e0["families"][family], e1["families"][family]
        assert got0["answers"] == got1["answers"] == want["answers"] == want["alone"] == got0["alone"], family
        assert (got0["predicted"], got1["predicted"], want["predicted"]) == (4, 3, 7), family
    for r in (0, 1):                # the process group is gone before exit: no gloo thread outlives the run
        threads = json.loads((tmp_path / "ddp" / f"exit{r}.json").read_text())["threads"]
        assert not [t for t in threads if "gloo" in t], threads


def test_gather_answers_round_trips_any_text_through_fixed_shape_tensors():
    """One gloo process: the byte encoding keeps empty, accented and non-Latin answers, in example order."""
    import torch.distributed as dist

    from rkif.distributed import gather_answers

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert gather_answers([2, 0, 1, 3], ["日本", "", "café", " b "], 4, torch.device("cpu")) == [
            "", "café", "日本", " b "]
        assert gather_answers([], [], 0, torch.device("cpu")) == []
        with pytest.raises(ValueError, match="2 answers for 1 indices"):
            gather_answers([0], ["a", "b"], 2, torch.device("cpu"))
        with pytest.raises(RuntimeError, match=r"no rank answered examples \[1\]"):
            gather_answers([0], ["a"], 2, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
