"""VR-MCL on the toy backbone: against a plain-torch transcription, the STORM recursion, state round-trip."""

import pytest
import torch

import rkif.methods.vrmcl as vrmcl
from rkif.config import RunConfig
from rkif.data import ReplayMemory, Task
from rkif.methods import resolve
from rkif.methods.base import parse_options
from rkif.training import train_stage
from tests.conftest import ToyBackbone, toy_examples, toy_loss, train_sequence

EPOCHS, LR, INNER_LR, CLIP, SEED = 4, 0.05, 0.3, 1.0, 3


def _run_config(**kw) -> RunConfig:
    settings = dict(batch_size=16, epochs=EPOCHS, lr=LR, lr_scheduler="constant", max_grad_norm=CLIP,
                    memory_fraction=0.25, seed=SEED)
    return RunConfig(**{**settings, **kw})


def _tasks():
    return [Task("A", {"train": toy_examples("A", 16, 1)}), Task("B", {"train": toy_examples("B", 16, 2)})]


def run_vrmcl(tmp_path, run_options=None, **options):
    """Two tasks through train_stage (full batch: one optimizer step per epoch)."""
    backbone = ToyBackbone(seed=0)
    run = _run_config(**(run_options or {}))
    cls, opts = resolve("vrmcl", {"inner_lr": INNER_LR, **options})
    m = cls(parse_options(cls.config_class, opts), backbone, run)
    train_sequence(backbone, m, run, _tasks(), tmp_path / "trainer")
    return {n: p.detach().clone() for n, p in backbone.trainable_parameters().items()}, m


_loss = toy_loss


def _grad(params, loss):
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _clipped(grads):
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    scale = min(1.0, CLIP / (float(total) + 1e-6))
    return {n: g * scale for n, g in grads.items()}


def _meta(params, cur, rep):
    """First-order meta-gradient, K = 1, by hand: one SGD step on the current batch, then the union loss."""
    theta = {n: p.detach().requires_grad_() for n, p in params.items()}
    g_in = _clipped(_grad(theta, _loss(theta, cur)))
    fast = {n: (theta[n] - INNER_LR * g_in[n]).detach().requires_grad_() for n in theta}
    return _grad(fast, (_loss(fast, cur) + _loss(fast, rep)) / 2)


def reference(r: float):
    """Task A plainly (AdamW, clipped); task B with the meta-gradient and STORM, the update clipped."""
    init = ToyBackbone(seed=0)
    params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in init.trainable_parameters().items()}
    task_a, task_b = _tasks()
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    for _ in range(EPOCHS):
        grads = _clipped(_grad(params, _loss(params, task_a.split("train"))))
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
    memory = ReplayMemory(0.25, SEED)
    memory.add("A", task_a.split("train"))
    pool = memory.examples()
    gen = torch.Generator().manual_seed(SEED * 1000 + 1)
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)                           # fresh per task
    cur = task_b.split("train")
    ghat = prev = None
    for _ in range(EPOCHS):
        rep = [pool[i] for i in torch.randint(len(pool), (16,), generator=gen).tolist()]
        g = _meta(params, cur, rep)
        if r > 0 and prev is not None:
            g_prev = _meta(prev, cur, rep)                                    # previous iterate, same batch
            g = {n: g[n] + r * (ghat[n] - g_prev[n]) for n in g}
        ghat, prev = g, {n: p.detach().clone() for n, p in params.items()}
        update = _clipped(ghat)
        for n, p in params.items():
            p.grad = update[n]
        opt.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default run (r = 0.25), shared by the tests that only read it."""
    return run_vrmcl(tmp_path_factory.mktemp("vrmcl"))


@pytest.mark.parametrize("r", [0.0, 0.25])
def test_through_the_trainer_matches_the_hand_transcription(tmp_path, trained, r):
    ours, m = trained if r == 0.25 else run_vrmcl(tmp_path, r=r)
    ref = reference(r)
    for n in ref:
        assert torch.allclose(ours[n], ref[n], atol=1e-5), n
    assert m.diagnostics()["meta"] == [{"stage": 1, "meta_steps": EPOCHS, "storm_steps": EPOCHS - 1 if r else 0}]


def test_storm_and_the_meta_step_change_the_result():
    with_storm, without = reference(0.25), reference(0.0)
    assert any(not torch.allclose(with_storm[n], without[n], atol=1e-4) for n in without)


def test_gradient_accumulation_gives_the_same_steps(tmp_path):
    ours, _ = run_vrmcl(tmp_path, run_options={"batch_size": 8, "grad_accum": 2})
    ref = reference(0.25)
    for n in ref:
        assert torch.allclose(ours[n], ref[n], atol=1e-5), n


def test_previous_iterate_is_evaluated_on_the_same_batch(tmp_path, monkeypatch):
    calls = []
    original = vrmcl.first_order_meta_gradient

    def recording(grad_fn, theta, current, eps, *args, **kw):
        calls.append({"theta": {n: t.clone() for n, t in theta.items()}, "current": current, "eps": eps,
                      "trainer_grad": kw.get("first_inner_grad") is not None, "seed": kw["seed"]})
        return original(grad_fn, theta, current, eps, *args, **kw)

    monkeypatch.setattr(vrmcl, "first_order_meta_gradient", recording)
    run_vrmcl(tmp_path)
    assert len(calls) == 2 * EPOCHS - 1                    # first step of task B has no previous iterate
    steps = [calls[0:1]] + [calls[i:i + 2] for i in range(1, len(calls), 2)]
    for b, step in enumerate(steps):
        now = step[0]
        assert now["trainer_grad"] and len(now["eps"]) == 2 and now["eps"][0] is now["current"][0]
        if b == 0:
            continue
        before = step[1]
        assert not before["trainer_grad"]
        assert before["current"] is now["current"] and before["eps"] is now["eps"]   # the same batches
        assert before["seed"] == now["seed"]                                         # the same dropout
        prev_theta = steps[b - 1][0]["theta"]                                        # theta_{b-1}
        assert all(torch.equal(before["theta"][n], prev_theta[n]) for n in prev_theta)
        assert any(not torch.equal(now["theta"][n], prev_theta[n]) for n in prev_theta)
    assert len({id(s[0]["eps"][1]) for s in steps}) == EPOCHS                        # a new replay batch per step


def test_storm_lowers_the_variance_on_a_noisy_quadratic():
    """f(theta; xi) = |theta - c|^2 / 2 + xi . theta: the error of ghat has variance (1 - r) / (1 + r) of g's."""
    torch.manual_seed(0)
    dim, steps, r, alpha, lr = 4, 4000, 0.25, 0.1, 0.05
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    noise = {}

    def grad_fn(theta, batches, clip, seed):
        return {"w": theta["w"] - c + sum(noise[b] for b in batches) / len(batches)}

    theta = {"w": torch.zeros(dim, dtype=torch.float64)}
    ghat = prev = g_prev = None
    raw_err, storm_err = [], []
    for b in range(steps):
        noise["cur"], noise["rep"] = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
        g = vrmcl.first_order_meta_gradient(grad_fn, theta, ["cur"], ["cur", "rep"], alpha)
        if prev is not None:
            g_prev = vrmcl.first_order_meta_gradient(grad_fn, prev, ["cur"], ["cur", "rep"], alpha)
        ghat = vrmcl.storm(g, g_prev, ghat, r)
        true = (1 - alpha) * (theta["w"] - c)                            # the noise-free meta-gradient
        if b >= 100:
            raw_err.append(g["w"] - true)
            storm_err.append(ghat["w"] - true)
        prev = {"w": theta["w"].clone()}
        theta = {"w": theta["w"] - lr * ghat["w"]}
    var_raw = torch.stack(raw_err).var(0).mean()
    var_storm = torch.stack(storm_err).var(0).mean()
    assert var_storm < 0.75 * var_raw
    assert var_storm / var_raw == pytest.approx((1 - r) / (1 + r), rel=0.1)
    g0 = {"w": torch.ones(2)}
    assert torch.equal(vrmcl.storm(g0, {"w": torch.zeros(2)}, {"w": torch.full((2,), 5.0)}, 0.0)["w"], g0["w"])


def test_k_inner_steps_mean_and_last_meta_loss():
    """K = 2 on a quadratic, by hand: theta1 = theta - a g(theta), theta2 = theta1 - a g(theta1)."""
    c = torch.tensor([1.0, 2.0])

    def grad_fn(theta, batches, clip, seed):
        return {"w": 2.0 * (theta["w"] - c) + (0.5 if batches == ["eps"] else 0.0)}

    theta, a = {"w": torch.tensor([3.0, -1.0])}, 0.1
    t1 = theta["w"] - a * 2 * (theta["w"] - c)
    t2 = t1 - a * 2 * (t1 - c)
    m1, m2 = 2 * (t1 - c) + 0.5, 2 * (t2 - c) + 0.5
    mean = vrmcl.first_order_meta_gradient(grad_fn, theta, ["cur"], ["eps"], a, inner_steps=2)
    last = vrmcl.first_order_meta_gradient(grad_fn, theta, ["cur"], ["eps"], a, inner_steps=2, average=False)
    assert torch.allclose(mean["w"], (m1 + m2) / 2) and torch.allclose(last["w"], m2)


def test_state_round_trip_and_momentum_kept(trained):
    _, m = trained
    tensors, meta = m.state_dict()
    assert {k.split("/")[0] for k in tensors} == {"ghat", "prev"}
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    fresh = vrmcl.VRMCL(m.config, ToyBackbone(seed=0), m.run)
    fresh.load_state_dict(tensors, meta)
    assert fresh.memory.examples() == m.memory.examples() and fresh.diagnostics() == m.diagnostics()
    assert all(torch.equal(fresh.ghat[n], m.ghat[n]) and torch.equal(fresh.prev[n], m.prev[n]) for n in m.ghat)
    again, again_meta = fresh.state_dict()
    assert again.keys() == tensors.keys() and again_meta == meta
    empty = vrmcl.VRMCL(m.config, ToyBackbone(seed=0), m.run)
    t0, meta0 = empty.state_dict()
    empty.load_state_dict(t0, meta0)
    assert empty.ghat is None and len(empty.memory) == 0


def test_bf16_trains(tmp_path):
    ours, m = run_vrmcl(tmp_path, run_options={"precision": "bf16"})
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in ours.values())
    assert m.diagnostics()["meta"][0]["meta_steps"] == EPOCHS


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="meta_loss"):
        vrmcl.VRMCL(vrmcl.VRMCLConfig(meta_loss="first"), ToyBackbone(), _run_config())
    with pytest.raises(ValueError, match="r <"):
        vrmcl.VRMCL(vrmcl.VRMCLConfig(r=1.0), ToyBackbone(), _run_config())


def test_minilm_two_tasks_and_matched_dropout(tmp_path):
    """Real peft LoRA with dropout: trains through the Trainer; one seed gives one set of dropout masks."""
    import contextlib
    from types import SimpleNamespace

    from tests.test_backbones import EXAMPLES, minilm

    backbone = minilm()
    run = RunConfig(batch_size=2, grad_accum=2, max_steps=2, lr=1e-3, memory_fraction=0.5, seed=SEED)
    m = vrmcl.VRMCL(vrmcl.VRMCLConfig(), backbone, run)
    for stage, task in enumerate([Task("t", {"train": EXAMPLES}), Task("u", {"train": EXAMPLES[::-1]})]):
        data = m.before_task(stage, [task], task.split("train"))
        train_stage(backbone, data, m, run, stage, str(tmp_path / "trainer"))
        m.after_task(stage, [task], task.split("train"))
    assert m.diagnostics()["meta"] == [{"stage": 1, "meta_steps": 2, "storm_steps": 1}]
    assert all(torch.isfinite(t).all() for t in backbone.trainable_parameters().values())
    m.trainer = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext),
                                args=SimpleNamespace(world_size=1, max_grad_norm=0.0))
    backbone.train()
    theta = {n: p.detach().clone() for n, p in backbone.trainable_parameters().items()}
    batches = [backbone.collate(EXAMPLES[:2])]
    g1, g2, g3 = (m._grad(theta, batches, False, seed) for seed in (5, 5, 6))
    assert all(torch.equal(g1[n], g2[n]) for n in theta)
    assert any(not torch.equal(g1[n], g3[n]) for n in theta)


def test_options_parse_from_strings():
    cfg = parse_options(vrmcl.VRMCLConfig, {"replay_batch_size": "4", "inner_lr": "0.1", "keep_momentum": "false"})
    assert cfg.replay_batch_size == 4 and isinstance(cfg.replay_batch_size, int)
    assert cfg.inner_lr == 0.1 and cfg.keep_momentum is False and cfg.r == 0.25


def test_keep_momentum_false_resets_the_estimate_each_task(trained):
    _, m = trained
    tensors, meta = m.state_dict()
    for keep in (True, False):
        fresh = vrmcl.VRMCL(vrmcl.VRMCLConfig(keep_momentum=keep), ToyBackbone(seed=0), m.run)
        fresh.load_state_dict(tensors, meta)
        fresh.before_task(2, [], [])
        fresh.on_train_begin(trainer=None)
        assert (fresh.ghat is not None) == keep and (fresh.prev is not None) == keep and fresh.active
