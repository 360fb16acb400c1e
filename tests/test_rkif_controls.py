"""The R-KIF controls of issue 13: random masks, masks on one task vector, the outer lr schedule,
per-tensor thresholds; on plain tensors and through the Trainer on the ToyBackbone."""

import pytest
import torch

from rkif import runner
from rkif.kif.masks import random_masks_like
from rkif.methods import resolve
from rkif.methods import rkif as rkif_module
from rkif.methods.base import parse_options
from rkif.methods.rkif import RecurrentKIF, RKIFConfig, lr_factor
from tests.conftest import ToyBackbone
from tests.test_rkif_method import EPOCHS, LR, OUTER_LR, _run_config, reference, run_rkif

SIZES = {"model.lora_w": 12, "model.lora_b": 3}          # the ToyBackbone's trainable tensors


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _count(masks) -> int:
    return sum(int(m.sum()) for m in masks.values())


# -- random masks on plain tensors ---------------------------------------------------------------
def test_random_masks_keep_the_count_of_each_threshold_group():
    masks = {"a": torch.tensor([True, True, True, False, False, False]), "b": torch.zeros(2, 5, dtype=torch.bool)}
    glob = random_masks_like(masks, _gen(0))
    assert _count(glob) == 3 and glob["b"].shape == (2, 5) and glob["a"].dtype == torch.bool
    per = random_masks_like(masks, _gen(0), "per_tensor")
    assert int(per["a"].sum()) == 3 and int(per["b"].sum()) == 0
    again = random_masks_like(masks, _gen(0))
    assert all(torch.equal(glob[n], again[n]) for n in masks)                    # seeded
    draws = [random_masks_like(masks, _gen(s)) for s in range(1, 6)]
    assert any(not torch.equal(d["a"], masks["a"]) for d in draws)               # not the input masks
    with pytest.raises(ValueError, match="scope"):
        random_masks_like(masks, _gen(0), "per_row")


def test_random_masks_are_uniform_over_the_group():
    masks = {"a": torch.arange(20) < 4, "b": torch.zeros(30, dtype=torch.bool)}      # 4 of 50 ones, all in "a"
    g = _gen(1)
    hits = sum(torch.cat([m["a"], m["b"]]).float() for m in (random_masks_like(masks, g) for _ in range(4000)))
    freq = hits / 4000
    assert abs(float(freq.mean()) - 4 / 50) < 1e-6                               # every draw has 4 ones
    assert float((freq - 4 / 50).abs().max()) < 0.03                             # sd per place ~ 0.004
    assert float(freq[20:].mean()) > 0.07                                        # "b" gets its share


# -- through the Trainer: spies on the masks each round ---------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    """Records, per round, the importance masks (binary_masks' results) and the masks fused (``_fuse``)."""
    record = {"importance": [], "fused": []}
    real_masks, real_fuse = rkif_module.binary_masks, RecurrentKIF._fuse

    def masks(*args, **kw):
        out = real_masks(*args, **kw)
        record["importance"].append({n: m.clone() for n, m in out.items()})
        return out

    def fuse(self, tau_in, tau_out, i_in, m_in, m_out):
        record["fused"].append(({n: m.clone() for n, m in m_in.items()}, {n: m.clone() for n, m in m_out.items()}))
        return real_fuse(self, tau_in, tau_out, i_in, m_in, m_out)

    monkeypatch.setattr(rkif_module, "binary_masks", masks)
    monkeypatch.setattr(RecurrentKIF, "_fuse", fuse)
    return record


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_random_mask_control_draws_fresh_masks_of_the_importance_density_each_round(tmp_path, spy, scope):
    params, m = run_rkif(tmp_path, mask_source="random", threshold_scope=scope)
    importance, fused = spy["importance"], spy["fused"]
    assert len(fused) == 4 and len(importance) == 8                             # 4 rounds, m_in and m_out each
    for r, (m_in, m_out) in enumerate(fused):
        for drawn, ranked in ((m_in, importance[2 * r]), (m_out, importance[2 * r + 1])):
            if scope == "global":
                assert _count(drawn) == _count(ranked) == 3                      # round(0.2 * 15)
            else:
                assert all(int(drawn[n].sum()) == int(ranked[n].sum()) for n in SIZES)
    differs = [any(not torch.equal(a[n], b[n]) for n in SIZES) for (a, _), b in zip(fused, importance[::2])]
    assert any(differs)                                                          # not the importance masks
    assert len({tuple(torch.cat([mi[n].flatten() for n in SIZES]).tolist()) for mi, _ in fused}) > 1   # fresh per round
    again, m2 = run_rkif(tmp_path / "again", mask_source="random", threshold_scope=scope)
    assert all(torch.equal(params[n], again[n]) for n in params)                 # seeded: the same run twice
    _, plain = run_rkif(tmp_path / "plain", threshold_scope=scope)
    assert torch.equal(m.rng.get_state(), plain.rng.get_state())                 # the memory draws are untouched


@pytest.mark.parametrize("side", ["in", "out"])
def test_masks_on_one_task_vector_leaves_the_other_whole(tmp_path, spy, side):
    run_rkif(tmp_path / "both")
    first_both = spy["fused"][0]
    spy["fused"].clear()
    run_rkif(tmp_path / side, masks_on=side)
    masked, whole = (0, 1) if side == "in" else (1, 0)
    for masks in spy["fused"]:
        assert all(bool(masks[whole][n].all()) for n in SIZES)                   # m = 1 everywhere
        assert _count(masks[masked]) == 3                                        # the top 20 %
    # the first round starts from the same state: the masked side is the full method's mask
    assert all(torch.equal(spy["fused"][0][masked][n], first_both[masked][n]) for n in SIZES)


def test_per_tensor_thresholds_take_the_top_fraction_of_each_tensor(tmp_path, spy):
    run_rkif(tmp_path / "per", threshold_scope="per_tensor")
    for masks in spy["fused"]:
        for m in masks:
            assert int(m["model.lora_w"].sum()) == 2 and int(m["model.lora_b"].sum()) == 1   # round(0.2 n)
    spy["fused"].clear()
    run_rkif(tmp_path / "global")
    assert all(_count(m) == 3 for masks in spy["fused"] for m in masks)


# -- the outer lr -------------------------------------------------------------------------------------
def test_outer_lr_follows_the_trainers_schedule_only_when_asked(tmp_path):
    linear = {"lr_scheduler": "linear"}
    ours, m = run_rkif(tmp_path / "sched", run_options=linear, outer_lr_schedule="trainer")
    ref = reference(linear=True, outer_follows=True)
    for n in ref:
        assert torch.allclose(ours[n], ref[n], atol=1e-5), n
    rounds = m.diagnostics()["rounds"]
    assert [r["step"] for r in rounds] == [3, 6, 9, 10]
    assert [r["outer_lr"] for r in rounds] == pytest.approx([OUTER_LR * (EPOCHS - s) / EPOCHS for s in (3, 6, 9, 10)])
    const, c = run_rkif(tmp_path / "const", run_options=linear)                 # the default: constant
    assert all(r["outer_lr"] == OUTER_LR for r in c.diagnostics()["rounds"])
    ref_const = reference(linear=True)
    assert all(torch.allclose(const[n], ref_const[n], atol=1e-5) for n in ref)
    assert any(not torch.allclose(const[n], ours[n], atol=1e-4) for n in ref)
    _, d = run_rkif(tmp_path / "default_lr", run_options=linear, outer_lr=None, outer_lr_schedule="trainer")
    assert d.diagnostics()["rounds"][0]["outer_lr"] == pytest.approx(LR * 0.7)  # outer_lr None: the Trainer's lr


def test_lr_factor_reads_the_scheduler():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    assert lr_factor(opt) == 1.0                                                  # no scheduler
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 4)
    for _ in range(3):
        opt.step()
        sched.step()
    assert lr_factor(opt) == pytest.approx(0.25)


# -- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, fault", [
    ({"mask_source": "random", "fusion": "sum"}, "mask_source='random'"),
    ({"masks_on": "out", "fusion": "adaptive"}, "masks_on='out'"),
    ({"masks_on": "in", "share": False}, "drop all of tau_in"),
    ({"outer_lr_schedule": "trainer", "outer_optimizer": "shared"}, "outer_lr_schedule='trainer'"),
    ({"mask_source": "shuffled"}, "mask_source"),
    ({"masks_on": "neither"}, "masks_on"),
    ({"outer_lr_schedule": "cosine"}, "outer_lr_schedule"),
    ({"threshold_scope": "per_row"}, "threshold_scope"),
    ({"score": "fisher"}, "score"),
])
def test_controls_refuse_what_they_cannot_do(options, fault):
    cls, opts = resolve("rkif", options)
    with pytest.raises(ValueError, match="rkif option") as err:
        cls(parse_options(cls.config_class, opts), ToyBackbone(), _run_config())
    assert fault in str(err.value)


def test_controls_are_off_by_default_and_on_with_release_fusion():
    cfg = RKIFConfig()
    assert (cfg.mask_source, cfg.masks_on, cfg.outer_lr_schedule) == ("importance", "both", "constant")
    cls, opts = resolve("rkif-release", {"mask_source": "random", "masks_on": "out"})
    cls(parse_options(cls.config_class, opts), ToyBackbone(), _run_config())     # accepted


def test_a_run_saved_before_new_options_still_resumes(tmp_path):
    """A results.json written before the control options existed resumes: they were at their defaults."""
    from dataclasses import replace

    run = replace(_run_config(), method="rkif", method_options={})
    saved = {k: v for k, v in vars(RKIFConfig()).items() if k not in ("mask_source", "masks_on", "outer_lr_schedule")}
    previous = {"config": run.to_dict(), "method_config": saved}
    runner._check_resumable(run, previous, tmp_path / "results.json")                     # no error
    with pytest.raises(ValueError, match="top_fraction"):
        runner._check_resumable(run, {**previous, "method_config": {**saved, "top_fraction": 0.3}}, tmp_path)
    with pytest.raises(ValueError, match="masks_on"):
        runner._check_resumable(replace(run, method_options={"masks_on": "in"}), previous, tmp_path)