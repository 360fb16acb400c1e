"""FSDP2 on CPU (2 gloo processes): Recurrent-KIF and replay through ``rkif run``'s loop equal one process at
the same global batch; the Eq. 8 thresholds are global (4 all-reduces each); a method that needs whole
parameters refuses before training. In one process: local-shard logic, ``sharding_of`` and the refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rkif.kif import fusion
from rkif.kif.importance import step_scores
from rkif.methods import resolve
from rkif.sharding import WHOLE, Sharding, check_distribution, sharding_of

WORKER = Path(__file__).with_name("fsdp_worker.py")
ATOL = 1e-5     # fp32, summation order: reduce-scatter over 2 ranks vs one process's batch


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(WORKER), str(tmp_path / "fsdp"), "fsdp"], tmp_path)
    _run([sys.executable, str(WORKER), str(tmp_path / "single"), "single"], tmp_path)
    r0, r1, single = (json.loads((tmp_path / d / f"rank{r}.json").read_text())
                      for d, r in (("fsdp", 0), ("fsdp", 1), ("single", 0)))

    # the Trainer really sharded: lora_A (3 x 16) is split 2 + 1 rows
    a = next(n for n in r0["split"] if "lora_A" in n)
    assert (r0["split"][a], r1["split"][a]) == ([[2, 16], [3, 16]], [[1, 16], [3, 16]])
    # every Eq. 8 mask took its threshold over both shards: 4 all-reduces (radix passes) each
    assert r0["mask_all_reduce_calls"] and set(r0["mask_all_reduce_calls"]) == {4}
    assert r0["mask_all_reduce_calls"] == r1["mask_all_reduce_calls"]

    for method in ("rkif", "replay"):
        fsdp, one = r0["results"][method], single["results"][method]
        for r in (fsdp, r1["results"][method]):
            if r["diagnostics"]:
                r["diagnostics"].pop("seconds")
        assert fsdp == r1["results"][method], method                          # both processes saw the same run
        assert fsdp["accuracy"] == one["accuracy"] and fsdp["initial_accuracy"] == one["initial_accuracy"], method
        w_fsdp = load_file(tmp_path / "fsdp" / method / "checkpoints" / "stage_1" / "adapter.safetensors")
        w_one = load_file(tmp_path / "single" / method / "checkpoints" / "stage_1" / "adapter.safetensors")
        assert w_fsdp.keys() == w_one.keys()
        for n in w_one:
            assert w_fsdp[n].shape == w_one[n].shape, n                        # gathered whole
            assert torch.allclose(w_fsdp[n], w_one[n], atol=ATOL), (method, n, (w_fsdp[n] - w_one[n]).abs().max())
    rounds, rounds_one = (r["results"]["rkif"]["diagnostics"]["rounds"] for r in (r0, single))
    assert len(rounds) == len(rounds_one) >= 4
    for got, want in zip(rounds, rounds_one):                                  # masks, norms, overlaps: global
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-4), k

    assert "ewc does not run under FSDP" in r0["results"]["ewc"]["error"]


# -- one process: the same logic on a simulated shard ---------------------------------------------

def test_importance_and_totals_on_simulated_shards():
    """Importance on two dim-0 shards of a parameter is the whole's, split; totals over shards are the
    sums of what each shard sends (the 2-process test runs the real collectives)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    w.grad = torch.randn(5, 4)
    halves = [torch.nn.Parameter(w.detach()[:3].clone()), torch.nn.Parameter(w.detach()[3:].clone())]
    for h, g in zip(halves, (w.grad[:3], w.grad[3:])):
        h.grad = g.clone()
    whole = step_scores({"w": w})["w"]
    assert torch.equal(torch.cat([step_scores({"w": h})["w"] for h in halves]), whole)
    # a total over shards is the sum of the shards' totals: region fractions from Sharding.sum's totals
    m_in, m_out = {"w": whole > 0.5}, {"w": whole > 1.0}
    first, second = ([{"w": m[rows]} for m in (m_in["w"], m_out["w"])] for rows in (slice(0, 3), slice(3, 5)))
    sent = []

    class Totals(Sharding):          # what the all-reduce returns, given what each shard sends
        def sum(self, values):
            sent.append(list(values))
            return [a + b for a, b in zip(*sent)] if len(sent) == 2 else list(values)

    fusion.region_fractions(*first, Totals(group="simulated", size=2))
    assert fusion.region_fractions(*second, Totals(group="simulated", size=2)) == \
        pytest.approx(fusion.region_fractions(m_in, m_out))


def test_sharding_of_plain_model_is_whole_and_refusals_name_the_method():
    model = torch.nn.Linear(3, 2)
    assert sharding_of(model) is WHOLE and not WHOLE.sharded and WHOLE.reduce is None
    assert WHOLE.sum([1, 2.5]) == [1.0, 2.5] and WHOLE.max([3]) == [3.0]
    assert torch.equal(WHOLE.gather_maps({"a": torch.ones(2, 2)})["a"], torch.ones(4))

    model.weight.ds_id = 7                                                     # what ZeRO-3 puts on a parameter
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3"):
        sharding_of(model)
    del model.weight.ds_id

    trainer = SimpleNamespace(model_wrapped=model, is_deepspeed_enabled=True)
    for name in ("rkif", "ewc"):
        cls, _ = resolve(name)
        method = cls.__new__(cls)
        with pytest.raises(ValueError, match=f"{name} does not run under DeepSpeed"):
            check_distribution(method, trainer)
    cls, _ = resolve("replay")
    assert check_distribution(cls.__new__(cls), trainer) is WHOLE             # data-only: allowed on ZeRO-1/2


def test_every_method_declares_where_it_runs():
    from rkif.methods.registry import METHODS

    access = {name: cls.parameter_access for name, cls in METHODS.items()}
    assert access.pop("rkif") == "shards"
    assert {access.pop(n) for n in ("seqlora", "replay", "mtl")} == {"loss"}
    assert set(access.values()) == {"whole"}                                  # ewc, inclora, migu, olora, osf, ...
