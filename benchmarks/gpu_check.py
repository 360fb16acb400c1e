"""The GPU check: what a CPU never exercises, in one command, under 10 minutes on one GPU.

    python benchmarks/gpu_check.py --out gpu_check            # every part
    python benchmarks/gpu_check.py --parts env,tests           # a subset

Parts (each timed, each recorded as ok / failed / timeout / skipped in ``OUT/gpu_check.json``):
  env       torch, CUDA, the device, native bf16, library versions
  tests     the test suite on the GPU (``tests/test_cuda.py``: every method under bf16 and under fp16 with a
            GradScaler, end to end), in parallel where pytest-xdist is installed
  smollm2   a short SmolLM2 Standard run (seqlora, order 1) under fp32, bf16 and fp16: accuracy and seconds
  overhead  R-KIF's wall time against replay's on SmolLM2 (benchmarks/overhead.py)

Without CUDA the SmolLM2 and overhead parts are skipped (CPU numbers come from their own benchmarks)
and the CUDA tests skip themselves, so the script runs, and is tested, on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from rkif import io
from rkif.config import library_versions

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "tests", "smollm2", "overhead")


def env() -> dict:
    from rkif.precision import native_bf16

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "native_bf16": native_bf16("cuda" if cuda else "cpu"), "versions": library_versions()}


def run_command(cmd: list[str], timeout: float, log: Path) -> dict:
    """Run ``cmd`` with its output in ``log``; status, return code and seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timeout"
    return {"status": status, "returncode": code, "seconds": round(time.perf_counter() - t0, 1),
            "command": " ".join(cmd), "log": log.name}


def junit_summary(path: Path) -> dict:
    """Counts and the failing tests (id and first line of the message) of a pytest junit file."""
    if not path.exists():
        return {}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skip_reasons = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "").splitlines()[0][:300]
                             if bad.get("message") else ""})
        elif (skip := case.find("skipped")) is not None:
            counts["skipped"] += 1
            reason = (skip.get("message") or "").splitlines()[0][:120] if skip.get("message") else ""
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skip_reasons}


def tests(out: Path, timeout: float, pytest_args: list[str], workers: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(out / "junit.xml")]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    result = run_command(cmd + (pytest_args or ["tests"]), timeout, out / "tests.log")
    return {**result, **junit_summary(out / "junit.xml")}


def smollm2(out: Path, timeout: float, data: str) -> dict:
    """seqlora on Standard order 1, 64 train / 40 test per task, 1 epoch, under each precision (``timeout`` each)."""
    runs = {}
    for precision in ("fp32", "bf16", "fp16"):
        folder = out / f"smollm2_{precision}"
        cmd = [sys.executable, "-m", "rkif", "run", "--model", "smollm2", "--benchmark", "standard", "--order", "1",
               "--method", "seqlora", "--train-size", "64", "--test-size", "40", "--epochs", "1",
               "--eval-scope", "all", "--precision", precision, "--data", data, "--output", str(folder)]
        runs[precision] = run_command(cmd, timeout, out / f"smollm2_{precision}.log")
        if (folder / "results.json").exists():
            res = json.loads((folder / "results.json").read_text())
            runs[precision].update({k: res.get(k) for k in ("op", "bwt", "fwt", "accuracy", "initial_accuracy",
                                                            "precision_used", "seconds", "complete")})
    return runs


def overhead(out: Path, timeout: float, data: str) -> dict:
    target = out / "overhead_smollm2.json"
    cmd = [sys.executable, "benchmarks/overhead.py", "--model", "smollm2", "--steps", "48", "--repeats", "3",
           "--data", data, "--out", str(target)]
    result = run_command(cmd, timeout, out / "overhead.log")
    if target.exists():
        res = json.loads(target.read_text())
        result.update({k: res[k] for k in ("ratio_rkif_to_replay", "floor", "median_seconds",
                                           "bookkeeping_fraction_of_rkif_time", "outer_fraction_of_rkif_time")})
        result["precision"] = res["run"]["precision"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and the logs")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--data", default=os.environ.get("RKIF_DATA", "../shared/data"))
    p.add_argument("--timeout", type=float, default=180, help="seconds per part")
    p.add_argument("--pytest-args", default="", help="arguments for pytest instead of the whole suite (shell-quoted)")
    p.add_argument("--pytest-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel test processes where pytest-xdist is installed")
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; known: {', '.join(PARTS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    cuda = torch.cuda.is_available()
    for part in parts:
        t0 = time.perf_counter()
        if part == "env":
            report["env"] = env()
        elif part == "tests":
            report["tests"] = tests(out, a.timeout, shlex.split(a.pytest_args), a.pytest_workers)
        elif not cuda:
            report[part] = {"status": "skipped", "reason": "no CUDA device"}
        elif part == "smollm2":
            report["smollm2"] = smollm2(out, a.timeout, a.data)
        else:
            report["overhead"] = overhead(out, a.timeout, a.data)
        print(f"{part}: {time.perf_counter() - t0:.0f} s", flush=True)
        io.write_json(out / "gpu_check.json", report)          # after every part: a timeout keeps what ran
    print(json.dumps(report, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
