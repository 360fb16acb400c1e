"""MIGU on the real MiniLM LoRA layers: activation statistics, row masks, SGD confinement, two tasks."""

from types import SimpleNamespace

import pytest
import torch

import rkif.methods.migu as migu
from rkif.config import RunConfig
from rkif.data import Example, Task
from rkif.methods import resolve
from rkif.methods.base import parse_options
from rkif.training import train_stage
from tests.test_backbones import EXAMPLES, minilm

TRAINER = SimpleNamespace(args=SimpleNamespace(world_size=1))


def _method(backbone, run=None, **options):
    cls, opts = resolve("migu", options)
    return cls(parse_options(cls.config_class, opts), backbone, run or RunConfig(batch_size=4, lr=1e-2))


@pytest.fixture(scope="module")
def _shared():
    """MiniLM with non-zero lora_B (at init B = 0 and lora_A's gradient vanishes), built once."""
    backbone = minilm()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in backbone.trainable_parameters().items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return backbone, {n: p.detach().clone() for n, p in backbone.trainable_parameters().items()}


@pytest.fixture
def backbone(_shared):
    """The shared backbone with its initial LoRA weights restored and no gradients."""
    model, init = _shared
    with torch.no_grad():
        for n, p in model.trainable_parameters().items():
            p.copy_(init[n])
    model.zero_grad(set_to_none=True)
    return model


def _record_outputs(method):
    """Independent forward hooks: the r-dim output of each lora_A and each LoraLayer's combined output."""
    seen, handles = {}, []
    for name, module, adapter in method.lora_layers():
        for key, mod in ((f"{name}|{adapter}|A", module.lora_A[adapter]), (f"{name}|out", module)):
            handles.append(mod.register_forward_hook(
                lambda m, a, out, key=key: seen.setdefault(key, []).append(out.detach().clone())))
    return seen, handles


def _one_step(backbone, method, batch_examples=EXAMPLES[:4]):
    """One forward/backward (training mode) with the method's hooks; returns grads before masking."""
    backbone.train()
    backbone.zero_grad(set_to_none=True)
    batch = backbone.collate(batch_examples)
    backbone(**batch)["loss"].backward()
    return batch, {n: p.grad.clone() for n, p in backbone.trainable_parameters().items()}


def test_mask_keeps_exactly_the_top_units_and_plain_sgd_moves_only_them(backbone):
    m = _method(backbone)
    m.before_task(1, [], [])
    m.on_train_begin(TRAINER)
    assert len(m.layers) == 12                                          # q and v of six layers
    seen, handles = _record_outputs(m)
    weights = {n: p.detach().clone() for n, p in backbone.trainable_parameters().items()}
    _, before = _one_step(backbone, m)
    for h in handles:
        h.remove()
    stats = {k: torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]).abs().mean(0) for k, outs in seen.items()}
    for key, stat in m.stats.items():                                   # the method's statistic
        assert torch.allclose(stat.mean(), stats[key], rtol=1e-5, atol=1e-7), key
    m.on_pre_optimizer_step(TRAINER)
    params = backbone.trainable_parameters()
    for name, module, adapter in m.layers:
        for kind, key in (("lora_A", f"{name}|{adapter}|A"), ("lora_B", f"{name}|out")):
            grad = getattr(module, kind)[adapter].weight.grad
            q = torch.quantile(stats[key].double(), 0.7)
            below = stats[key].double() < q
            assert torch.count_nonzero(grad[below]) == 0                 # frozen rows exactly zero
            nonzero_rows = int((grad.abs().sum(1) > 0).sum())
            assert nonzero_rows == int((~below).sum())
            if kind == "lora_A":
                assert nonzero_rows == 3                                 # 3 of 8 rank rows with T = 0.7
            pname = next(n for n, p in params.items() if p is getattr(module, kind)[adapter].weight)
            assert torch.equal(grad[~below], before[pname][~below])     # kept rows untouched
    assert all(s.mean() is None for s in m.stats.values())             # cleared after the step
    torch.optim.SGD(params.values(), lr=0.5).step()                     # plain SGD: only kept rows move
    for name, module, adapter in m.layers:
        for kind, key in (("lora_A", f"{name}|{adapter}|A"), ("lora_B", f"{name}|out")):
            pname = next(n for n, p in params.items() if p is getattr(module, kind)[adapter].weight)
            moved = (params[pname].detach() - weights[pname]).abs().sum(1) > 0
            assert torch.equal(moved, stats[key].double() >= torch.quantile(stats[key].double(), 0.7))
    m.on_train_end(TRAINER)
    assert not m.handles and m.diagnostics()["masking"][0]["kept_lora_A"] == pytest.approx(3 / 8)


def test_first_task_is_a_no_op(backbone):
    m = _method(backbone)
    m.before_task(0, [], [])
    m.on_train_begin(TRAINER)
    assert not m.handles
    g = torch.Generator().manual_seed(0)
    for p in backbone.trainable_parameters().values():
        p.grad = torch.randn(p.shape, generator=g)
    before = {n: p.grad.clone() for n, p in backbone.trainable_parameters().items()}
    m.on_pre_optimizer_step(TRAINER)
    assert all(torch.equal(p.grad, before[n]) for n, p in backbone.trainable_parameters().items())
    m2 = _method(backbone, skip_first_task=False)
    m2.before_task(0, [], [])
    m2.on_train_begin(TRAINER)
    assert m2.handles
    m2.on_train_end(TRAINER)


def test_statistics_accumulate_over_micro_batches_and_pad_mask_drops_padding(backbone):
    stat = migu._UnitStat()
    out = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]]])      # [B=1, T=3, units=2]
    mask = torch.tensor([[1, 1, 0]])
    stat.add(out, mask)
    assert torch.allclose(stat.mean(), torch.tensor([2.0, 3.0]))
    stat.add(-out[:, :1], None)                                          # a second micro-batch, one token
    assert torch.allclose(stat.mean(), torch.tensor([5.0 / 3, 8.0 / 3]))
    assert migu.unit_mask(torch.arange(8.0), 0.7).tolist() == [False] * 5 + [True] * 3

    examples = [Example("t", "short", "good"), Example("t", "a much longer sentence with many more words", "bad")]
    m = _method(backbone, pad_mask=True)
    m.before_task(1, [], [])
    m.on_train_begin(TRAINER)
    seen, handles = _record_outputs(m)
    batch, _ = _one_step(backbone, m, examples)
    for h in handles:
        h.remove()
    key = next(k for k in m.stats if k.endswith("|A"))
    query = seen[key][0]                                                # the query forward (then candidates)
    w = batch["attention_mask"].unsqueeze(-1).float()
    assert (w == 0).any()
    cand = seen[key][1]
    w_c = backbone.cand_mask.unsqueeze(-1).float()
    expected = ((query.abs() * w).sum((0, 1)) + (cand.abs() * w_c).sum((0, 1))) / (w.sum() + w_c.sum())
    assert torch.allclose(m.stats[key].mean(), expected, rtol=1e-5)
    m.on_train_end(TRAINER)


def test_two_tasks_through_the_trainer_and_state_round_trip(tmp_path, backbone):
    run = RunConfig(batch_size=2, grad_accum=2, max_steps=2, lr=1e-3, lr_scheduler="constant")
    m = _method(backbone, run)
    tasks = [Task("t", {"train": EXAMPLES}), Task("u", {"train": EXAMPLES[::-1]})]
    for stage, task in enumerate(tasks):
        data = m.before_task(stage, [task], task.split("train"))
        train_stage(backbone, data, m, run, stage, str(tmp_path / "trainer"))
        m.after_task(stage, [task], task.split("train"))
        assert not m.handles                                            # hooks removed after training
    log = m.diagnostics()["masking"]
    assert [r["stage"] for r in log] == [1] and log[0]["steps"] == 2    # task 1 unmasked
    assert log[0]["kept_lora_A"] == pytest.approx(3 / 8) and log[0]["kept_lora_B"] == pytest.approx(115 / 384, abs=0.01)
    tensors, meta = m.state_dict()
    fresh = _method(backbone, run)
    fresh.load_state_dict(tensors, meta)
    assert fresh.diagnostics() == m.diagnostics() and fresh.stage == 1


def test_bad_threshold_is_refused(backbone):
    with pytest.raises(ValueError, match="threshold"):
        _method(backbone, threshold=1.5)
