"""The Eq. 8 threshold's radix select: equal to sorting on every kind of float, 4 passes, and sharded
over 2 gloo processes equal to one process on the concatenation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rkif.kif.masks import binary_masks, kth_largest, linear_quantile, order_statistics, top_fraction_threshold
from tests.threshold_worker import scores

WORKER = Path(__file__).with_name("threshold_worker.py")


def _data(kind: str, n: int = 4102) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(kind))
    if kind == "random":
        return torch.rand(n, generator=g)
    if kind == "tied":
        return torch.randint(0, 5, (n,), generator=g).float()
    if kind == "negative":
        return -torch.rand(n, generator=g) * 1e3
    x = torch.randn(n, generator=g) * torch.logspace(-40, 38, n).float()[torch.randperm(n, generator=g)]  # mixed
    x[:12] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.4e38, -3.4e38, 0.0, -0.0, 1.0, 1.0])
    return x


@pytest.mark.parametrize("kind", ["random", "tied", "negative", "mixed"])
def test_radix_select_equals_sorting(kind):
    x = _data(kind)
    desc = x.sort(descending=True).values
    parts = [x[:1000], x[1000:1001], x[1001:].reshape(-1, 7)[:, :3].T, x[1001:].reshape(-1, 7)[:, 3:]]  # non-contiguous
    parts.append(x[:0])                                                   # and an empty one
    for k in (1, 2, 50, 2048, x.numel() - 1, x.numel()):
        assert kth_largest(parts, k) == desc[k - 1].item(), k
        assert kth_largest(parts, k) == torch.kthvalue(x, x.numel() - k + 1).values.item(), k
    for f in (0.01, 0.2, 0.5, 0.99):
        k = max(1, round(f * x.numel()))
        delta = top_fraction_threshold(parts, f)
        assert delta == desc[k - 1].item()
        masks = binary_masks({str(i): p for i, p in enumerate(parts)}, f)
        assert sum(int(m.sum()) for m in masks.values()) == int((x >= delta).sum())   # ties all in (>=)
    if kind != "mixed":                                                   # torch.quantile: inf - inf is NaN
        for q in (0.0, 0.3, 0.8, 1.0):
            assert linear_quantile(parts, q) == pytest.approx(torch.quantile(x.double(), q).item(), rel=1e-6)


def test_signed_zero_reads_as_zero_and_dtypes_are_read_as_float32():
    assert str(kth_largest([torch.tensor([-0.0, -0.0, 1.0])], 2)) == "0.0"
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    ref = x.sort(descending=True).values
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert kth_largest([x.to(dtype)], 100) == x.to(dtype).float().sort(descending=True).values[99].item()
    assert kth_largest([x.view(10, 100).T], 100) == ref[99].item()


def test_four_reduce_calls_per_threshold_and_bad_input_refused():
    calls = []

    def reduce(h):
        calls.append(tuple(h.shape))
        return h

    x = _data("tied")
    top_fraction_threshold([x], 0.2, reduce=reduce)
    assert calls == [(257,)] + [(1, 256)] * 3                         # 256 bins (+ NaNs in pass 1)
    calls.clear()
    linear_quantile([x], 0.8, reduce=reduce)                             # two order statistics, same passes
    assert len(calls) == 4
    assert order_statistics([x], lambda n: [0, n // 2, n - 1]) == [0.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="NaN"):
        kth_largest([x, torch.tensor([1.0, float("nan")])], 1)
    with pytest.raises(ValueError, match="k=4103 out of range for 4102"):
        kth_largest([x], 4103)
    with pytest.raises(ValueError, match="k=0"):
        kth_largest([x], 0)


def test_counts_exact_beyond_float32():
    """A run of 2^24 + 1 equal values: a float32 count would round it to 2^24 and miss the last rank."""
    n = 2**24 + 1
    x = torch.ones(n + 2)
    x[0], x[-1] = 2.0, 0.0                                                # 2, then 2^24 + 1 ones, then 0
    assert kth_largest([x], n + 1) == 1.0
    assert kth_largest([x], n + 2) == 0.0


@pytest.mark.slow
def test_sharded_threshold_two_gloo_processes_equals_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*torchrun, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = scores()
    x = torch.cat([t.reshape(-1) for t in full.values()])
    n = x.numel()
    desc = x.sort(descending=True).values
    expected = {"top_0.2": desc[round(0.2 * n) - 1].item(), "top_0.5": desc[round(0.5 * n) - 1].item(),
                "k_1": desc[0].item(), "k_last": desc[-1].item(),
                "quantile_0.8": linear_quantile([x], 0.8)}
    assert expected["quantile_0.8"] == pytest.approx(torch.quantile(x.double(), 0.8).item(), rel=1e-6)
    single = binary_masks(full, 0.2)
    for r in ranks:
        assert r["values"] == expected                                    # exact, on both ranks
        assert all(c <= 4 for c in r["all_reduce_calls"].values()), r["all_reduce_calls"]
        assert r["all_reduce_calls"]["top_0.2"] == 4
        assert r["selected"] == [int(m.sum()) for m in single.values()]   # the masks' union = one process's
