"""Recurrent-KIF through the stock Trainer against a plain-torch transcription of Algorithm 1."""

import pytest
import torch

from rkif.config import RunConfig
from rkif.data import Task
from rkif.methods import resolve
from rkif.methods.base import parse_options
from tests.conftest import ToyBackbone, toy_examples, toy_loss, train_sequence

EPOCHS = 10          # full-batch: one optimizer step per epoch
LR, OUTER_LR, CLIP = 0.05, 0.03, 1.0


def _run_config(**kw) -> RunConfig:
    settings = dict(batch_size=16, epochs=EPOCHS, lr=LR, lr_scheduler="constant", max_grad_norm=CLIP,
                    memory_fraction=0.25, seed=3)
    return RunConfig(**{**settings, **kw})


def _tasks():
    return [Task("A", {"train": toy_examples("A", 16, 1)}), Task("B", {"train": toy_examples("B", 16, 2)})]


def run_rkif(tmp_path, method="rkif", run_options=None, **options):
    """Two tasks through train_stage; returns the final parameters and the method."""
    backbone = ToyBackbone(seed=0)
    run = _run_config(**(run_options or {}))
    cls, opts = resolve(method, {"inner_steps": 3, "outer_steps": 2, "outer_lr": OUTER_LR, **options})
    m = cls(parse_options(cls.config_class, opts), backbone, run)
    train_sequence(backbone, m, run, _tasks(), tmp_path / "trainer")
    return {n: p.detach().clone() for n, p in backbone.trainable_parameters().items()}, m


_loss = toy_loss


def _step(params, opt, examples):
    """One optimizer step; returns |w g| at the pre-step weights (Eq. 3)."""
    _loss(params, examples).backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
    score = {n: (p.detach() * p.grad).abs() for n, p in params.items()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return score


def _top(scores, fraction):
    flat = torch.cat([s.flatten() for s in scores.values()])
    delta = flat.sort(descending=True).values[round(fraction * flat.numel()) - 1]
    return {n: (s >= delta).float() for n, s in scores.items()}


def reference(fuse=True, q_steps=3, m_steps=2, a1=0.55, a2=0.55, frac=0.2, linear=False, outer_follows=False):
    """Algorithm 1, transcribed: plain task A, then rounds of Q inner + M outer steps and Eq. 9 fusion.

    ``linear``: the Trainer's linear decay to 0 over each task (else constant); ``outer_follows``: the
    outer lr times the factor that schedule holds when the round closes.
    """
    init = ToyBackbone(seed=0)
    params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in init.trainable_parameters().items()}
    task_a, task_b = _tasks()

    def factor(steps_done):
        return (EPOCHS - steps_done) / EPOCHS if linear else 1.0

    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for _ in range(EPOCHS):
        _step(params, opt, task_a.split("train"))
        sched.step()
    from rkif.data import ReplayMemory
    memory = ReplayMemory(0.25, 3)
    memory.add("A", task_a.split("train"))
    pool = memory.examples()
    gen = torch.Generator().manual_seed(3 * 1000 + 1)
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)             # fresh per task
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    outer = torch.optim.AdamW(params.values(), lr=OUTER_LR, weight_decay=0.0)
    anchor = {n: p.detach().clone() for n, p in params.items()}
    i_in, i_out, q = {n: torch.zeros_like(p) for n, p in params.items()}, None, 0
    for step in range(EPOCHS):
        s = _step(params, opt, task_b.split("train"))
        sched.step()
        i_in = {n: a1 * i_in[n] + (1 - a1) * s[n] for n in s}                    # Eq. 4
        q += 1
        if q == q_steps or step == EPOCHS - 1:
            outer.param_groups[0]["lr"] = OUTER_LR * (factor(step + 1) if outer_follows else 1.0)
            theta_q = {n: p.detach().clone() for n, p in params.items()}
            tau_in = {n: theta_q[n] - anchor[n] for n in params}                   # Eq. 2
            ibar_out = {n: torch.zeros_like(p) for n, p in params.items()}
            for _ in range(m_steps):
                idx = torch.randint(len(pool), (8,), generator=gen).tolist()
                so = _step(params, outer, [pool[i] for i in idx])
                ibar_out = {n: ibar_out[n] + so[n] / m_steps for n in so}         # Eq. 6 (mean of M)
            tau_out = {n: p.detach() - theta_q[n] for n, p in params.items()}      # Eq. 5
            i_out = ibar_out if i_out is None else {n: a2 * ibar_out[n] + (1 - a2) * i_out[n] for n in params}
            if fuse:
                m_in, m_out = _top(i_in, frac), _top(i_out, frac)                  # Eq. 8
                with torch.no_grad():
                    for n, p in params.items():                                     # Eq. 9
                        p.copy_(anchor[n] + m_in[n] * tau_in[n] + m_out[n] * tau_out[n])
            anchor = {n: p.detach().clone() for n, p in params.items()}
            i_in, q = {n: torch.zeros_like(p) for n, p in params.items()}, 0
    return {n: p.detach() for n, p in params.items()}


def test_rkif_through_trainer_matches_algorithm_1(tmp_path):
    ours, method = run_rkif(tmp_path)
    ref = reference()
    for n in ref:
        assert torch.allclose(ours[n], ref[n], atol=1e-5), n
    rounds = method.diagnostics()["rounds"]
    assert [r["step"] for r in rounds] == [3, 6, 9, 10]            # 3 full rounds + the partial one
    assert all(r["stage"] == 1 for r in rounds)                     # task 1 trains plainly


def test_all_ones_masks_equal_plain_sequential_training(tmp_path):
    ours, _ = run_rkif(tmp_path, top_fraction=1.0)
    summed, _ = run_rkif(tmp_path, method="rkif-ki")
    ref = reference(fuse=False)
    for n in ref:
        assert torch.allclose(ours[n], ref[n], atol=1e-5)
        assert torch.allclose(summed[n], ref[n], atol=1e-5)


def test_fusion_changes_the_result(tmp_path):
    ours, _ = run_rkif(tmp_path)
    plain = reference(fuse=False)
    assert any(not torch.allclose(ours[n], plain[n], atol=1e-4) for n in plain)


@pytest.mark.parametrize("preset, option, value", [
    ("rkif-die", "dynamic_outer", False), ("rkif-ki", "fusion", "sum"), ("rkif-gm", "fusion", "global"),
    ("rkif-adaptive", "fusion", "adaptive"), ("rkif-share", "share", False), ("rkif-grad", "score", "grad"),
    ("rkif-single", "rounds", "single"),
])
def test_each_ablation_preset_changes_exactly_its_switch(preset, option, value):
    cls, opts = resolve(preset)
    cfg, default = parse_options(cls.config_class, opts), cls.config_class()
    changed = {f for f in vars(default) if getattr(cfg, f) != getattr(default, f)}
    assert changed == {option} and getattr(cfg, option) == value


def test_no_ema_preset_drops_both_smoothings():
    cls, opts = resolve("rkif-noema")
    cfg, default = parse_options(cls.config_class, opts), cls.config_class()
    assert {f for f in vars(default) if getattr(cfg, f) != getattr(default, f)} == {"smoothing", "outer_smoothing"}


def test_static_historical_importance_freezes_the_outer_mask(tmp_path):
    _, dynamic = run_rkif(tmp_path)
    _, static = run_rkif(tmp_path, method="rkif-die")
    static_rounds = static.diagnostics()["rounds"][1:]
    assert all(r["mask_out_overlap"] == 1.0 for r in static_rounds)
    assert all(abs(r["i_out_rank_corr"] - 1.0) < 1e-6 for r in static_rounds)
    assert any(r["i_out_rank_corr"] < 1.0 - 1e-6 for r in dynamic.diagnostics()["rounds"][1:])


def test_single_step_fusion_fuses_once_per_task(tmp_path):
    _, m = run_rkif(tmp_path, method="rkif-single")
    assert [r["step"] for r in m.diagnostics()["rounds"]] == [EPOCHS]


def test_partial_round_keep_leaves_last_steps_unfused(tmp_path):
    _, m = run_rkif(tmp_path, partial_round="keep")
    assert [r["step"] for r in m.diagnostics()["rounds"]] == [3, 6, 9]


@pytest.mark.parametrize("method", ["rkif-gm", "rkif-adaptive", "rkif-share", "rkif-grad", "rkif-noema",
                                    "rkif-release"])
def test_every_variant_trains_and_differs_from_the_default(tmp_path, method):
    default, _ = run_rkif(tmp_path)
    ours, m = run_rkif(tmp_path, method=method)
    assert all(torch.isfinite(t).all() for t in ours.values())
    assert any(not torch.allclose(ours[n], default[n]) for n in default)


def test_region_fractions_sum_to_one(tmp_path):
    _, m = run_rkif(tmp_path)
    for r in m.diagnostics()["rounds"]:
        assert abs(r["in_only"] + r["out_only"] + r["shared"] + r["neither"] - 1) < 1e-9
        assert r["in_only"] + r["shared"] >= 0.2 - 1e-9            # at least the top 20% of I_in


def test_each_round_logs_the_weights_and_the_share_of_the_plain_update_it_kept(tmp_path):
    _, m = run_rkif(tmp_path)
    for r in m.diagnostics()["rounds"]:                     # Eq. 9: the weights are the masks
        assert abs(r["w_in_mean"] - (r["in_only"] + r["shared"])) < 1e-9
        assert abs(r["w_out_mean"] - (r["out_only"] + r["shared"])) < 1e-9
        assert r["update_kept"] > 0
    _, ki = run_rkif(tmp_path, method="rkif-ki")            # -KI keeps tau_in + tau_out whole
    assert all(r["w_in_mean"] == r["w_out_mean"] == 1 and abs(r["update_kept"] - 1) < 1e-5
               for r in ki.diagnostics()["rounds"])
    _, gm = run_rkif(tmp_path, method="rkif-gm")            # +GM: two scalars that sum to one
    assert all(abs(r["w_in_mean"] + r["w_out_mean"] - 1) < 1e-9 for r in gm.diagnostics()["rounds"])


def test_bad_option_is_refused():
    cls, opts = resolve("rkif", {"fusion": "magic"})
    with pytest.raises(ValueError, match="fusion"):
        cls(parse_options(cls.config_class, opts), ToyBackbone(), _run_config())
    with pytest.raises(ValueError, match="unknown option"):
        parse_options(cls.config_class, {"inner_step": "3"})


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    """Q counts optimizer steps and importance is taken once per step from the accumulated gradient."""
    accumulated, m = run_rkif(tmp_path, run_options={"batch_size": 8, "grad_accum": 2})
    ref = reference()
    for n in ref:
        assert torch.allclose(accumulated[n], ref[n], atol=1e-5), n
    assert [r["step"] for r in m.diagnostics()["rounds"]] == [3, 6, 9, 10]


def test_bf16_mixed_precision_trains_and_fuses(tmp_path):
    ours, m = run_rkif(tmp_path, run_options={"precision": "bf16"})
    ref = reference()
    assert len(m.diagnostics()["rounds"]) == 4
    for n in ref:
        assert torch.isfinite(ours[n]).all() and ours[n].dtype == torch.float32
        assert torch.allclose(ours[n], ref[n], atol=0.1)                   # close to fp32, not equal


def test_the_outer_batch_must_split_evenly_over_the_trainers_processes():
    from rkif.methods.rkif import RKIFConfig

    RKIFConfig(outer_batch_size=6).check_processes(3)
    with pytest.raises(ValueError, match="outer_batch_size=6: expected a multiple of the number of processes \\(4\\)"):
        RKIFConfig(outer_batch_size=6).check_processes(4)
