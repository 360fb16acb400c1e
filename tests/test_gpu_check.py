"""The GPU check runs on CPU with its device parts skipped, and reports what it ran."""

import json

import pytest
import torch

from tests.conftest import benchmark_script

gpu_check = benchmark_script("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_gpu_check_on_cpu_skips_the_device_parts_and_records_the_tests(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--pytest-args", "tests/test_cuda.py"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["env"]["cuda_available"] is False and report["env"]["device"] == "cpu"
    tests = report["tests"]
    assert tests["status"] == "ok" and tests["failed"] == 0 and tests["passed"] == 0
    assert tests["skipped"] > 0 and "needs a CUDA GPU" in "".join(tests["skip_reasons"])
    assert report["smollm2"] == report["overhead"] == {"status": "skipped", "reason": "no CUDA device"}


def test_unknown_parts_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--parts", "env,nope"])
