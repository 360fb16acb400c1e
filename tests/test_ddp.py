"""Two-process DDP on CPU (gloo): identical weights on both ranks, equal to one process, same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_ranks_match_each_other_and_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    _run([*torchrun, str(WORKER), str(tmp_path / "ddp"), "8"], tmp_path)
    _run([sys.executable, str(WORKER), str(tmp_path / "single"), "16"], tmp_path)
    r0, r1 = (load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1))
    single = load_file(tmp_path / "single" / "rank0.safetensors")
    for n in single:
        assert torch.equal(r0[n], r1[n]), n                                   # ranks agree bit for bit
        assert torch.allclose(r0[n], single[n], atol=1e-5), n                 # = one process, same global batch
