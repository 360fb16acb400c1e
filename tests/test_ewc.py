"""EWC on LoRA: the penalty, the empirical Fisher, two tasks through the Trainer, state round-trip."""

import pytest
import torch

import rkif.methods.ewc as ewc
from rkif import io
from rkif.config import RunConfig
from rkif.data import Task
from rkif.methods import resolve
from rkif.methods.base import parse_options
from rkif.training import train_stage
from tests.conftest import ToyBackbone, toy_examples

EPOCHS, LR, CLIP = 8, 0.05, 1.0


def _run_config(**kw) -> RunConfig:
    return RunConfig(**{**dict(batch_size=16, epochs=EPOCHS, lr=LR, lr_scheduler="constant", max_grad_norm=CLIP,
                              seed=3), **kw})


def _tasks():
    return [Task("A", {"train": toy_examples("A", 16, 1)}), Task("B", {"train": toy_examples("B", 16, 2)})]


def _method(backbone, run=None, **options):
    cls, opts = resolve("ewc", options)
    return cls(parse_options(cls.config_class, opts), backbone, run or _run_config())


def _random_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (3, 4), "b": (5,)}
    params = {n: torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for n, s in shapes.items()}
    fisher = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    delta = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    return params, fisher, delta


def test_penalty_is_exactly_zero_at_the_anchor():
    params, fisher, _ = _random_state()
    anchor = {n: p.detach().clone() for n, p in params.items()}
    penalty = ewc.ewc_penalty(params, anchor, fisher, 123.0)
    assert penalty.item() == 0.0
    penalty.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in params.values())


@pytest.mark.parametrize("lam", [0.5, 7.0, 1000.0])
def test_penalty_and_gradient_of_a_perturbation(lam):
    params, fisher, delta = _random_state(1)
    anchor = {n: (p.detach() - delta[n]) for n, p in params.items()}          # theta - theta* = delta
    penalty = ewc.ewc_penalty(params, anchor, fisher, lam)
    expected = lam / 2 * sum((fisher[n] * delta[n] ** 2).sum() for n in params)
    assert torch.allclose(penalty, expected, rtol=1e-12, atol=0)
    penalty.backward()
    for n, p in params.items():
        assert torch.allclose(p.grad, lam * fisher[n] * delta[n], rtol=1e-12, atol=1e-15)


def test_coordinates_with_zero_fisher_are_unpenalised():
    params, fisher, delta = _random_state(2)
    fisher["a"][0] = 0.0                                  # one row of "a" without Fisher
    anchor = {n: (p.detach() - delta[n]) for n, p in params.items()}
    penalty = ewc.ewc_penalty(params, anchor, fisher, 10.0)
    penalty.backward()
    assert torch.count_nonzero(params["a"].grad[0]) == 0
    assert torch.count_nonzero(params["a"].grad[1:]) == params["a"].grad[1:].numel()
    with torch.no_grad():
        params["a"][0] += 100.0                           # move the free coordinates far away
    assert torch.allclose(ewc.ewc_penalty(params, anchor, fisher, 10.0), penalty)


def _hand_fisher(backbone, examples):
    """Mean over examples of the squared CE gradient of a linear softmax model, written out by hand."""
    w, b = backbone.model.lora_w.detach(), backbone.model.lora_b.detach()
    batch = backbone.collate(examples)
    gw, gb = torch.zeros_like(w), torch.zeros_like(b)
    for x, y in zip(batch["x"], batch["labels"]):
        err = torch.softmax(w @ x + b, -1) - torch.nn.functional.one_hot(y, 3).float()   # dCE/dlogits
        gw += torch.outer(err, x) ** 2
        gb += err ** 2
    return {"model.lora_w": gw / len(examples), "model.lora_b": gb / len(examples)}


def test_fisher_of_the_toy_model_matches_a_hand_computation():
    backbone = ToyBackbone(seed=0)
    train = toy_examples("A", 12, 5)
    method = _method(backbone, fisher_samples=5, normalize_fisher=False)
    method.after_task(0, [Task("A", {"train": train})], train)
    sample = ewc.fisher_sample(train, 5, method.run.seed * 1000 + 0)
    assert len(sample) == 5 and len(set(sample)) == 5
    hand = _hand_fisher(backbone, sample)
    for n in hand:
        assert torch.allclose(method.fisher[n], hand[n], rtol=1e-5, atol=1e-8), n
        assert torch.equal(method.anchor[n], backbone.trainable_parameters()[n].detach())
    assert not torch.allclose(method.fisher["model.lora_w"], _hand_fisher(backbone, train[:5])["model.lora_w"])
    assert backbone.training                               # mode restored after the eval-mode Fisher


def test_normalised_fisher_has_mean_one_and_accumulates_online():
    backbone = ToyBackbone(seed=0)
    a, b = toy_examples("A", 10, 1), toy_examples("B", 10, 2)
    method = _method(backbone, fisher_samples=0, gamma=0.5)
    method.after_task(0, [Task("A", {"train": a})], a)
    f1 = {n: t.clone() for n, t in method.fisher.items()}
    mean = sum(t.sum() for t in f1.values()) / sum(t.numel() for t in f1.values())
    assert abs(float(mean) - 1.0) < 1e-5
    raw = _hand_fisher(backbone, a)
    ratio = f1["model.lora_w"] / raw["model.lora_w"]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)    # only rescaled
    method.after_task(1, [Task("B", {"train": b})], b)
    f2 = ewc.normalize_by_mean(_hand_fisher(backbone, b))
    for n in f1:
        assert torch.allclose(method.fisher[n], 0.5 * f1[n] + f2[n], rtol=1e-4, atol=1e-6)


def test_fisher_sum_mode_scales_by_the_number_of_label_tokens():
    from tests.test_backbones import EXAMPLES, tiny_t5
    backbone = tiny_t5()
    example = EXAMPLES[0]
    n_tokens = int((backbone.collate([example])["labels"] != -100).sum())
    assert n_tokens > 1
    fishers = {}
    for mode in ("sum", "mean"):
        method = _method(backbone, fisher_samples=0, normalize_fisher=False, fisher_loss=mode)
        method.after_task(0, [Task("t", {"train": [example]})], [example])
        fishers[mode] = method.fisher
    scale = max(float(f.max()) for f in fishers["sum"].values())
    assert scale > 0
    for n in fishers["sum"]:                  # dropout off (eval mode): both passes see the same model
        assert torch.allclose(fishers["sum"][n], n_tokens ** 2 * fishers["mean"][n], rtol=1e-3, atol=1e-5 * scale)


def run_ewc(tmp_path, **options):
    backbone = ToyBackbone(seed=0)
    run = _run_config()
    method = _method(backbone, run, fisher_samples=0, **options)
    snapshots, losses = [], []
    original = method.extra_loss

    def recording(model, inputs):
        losses.append(original(model, inputs))
        return losses[-1]

    method.extra_loss = recording
    for stage, task in enumerate(_tasks()):
        data = method.before_task(stage, [task], task.split("train"))
        train_stage(backbone, data, method, run, stage, str(tmp_path / "trainer"))
        snapshots.append({n: p.detach().clone() for n, p in backbone.trainable_parameters().items()})
        method.after_task(stage, [task], task.split("train"))
    return backbone, method, snapshots, losses


def _reference_task_b(theta_a, anchor, fisher, lam):
    """Task B with a plain torch loop: AdamW on CE + (lambda/2) sum F (theta - theta*)^2, clipped."""
    params = {n: torch.nn.Parameter(t.clone()) for n, t in theta_a.items()}
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    batch = ToyBackbone.collate(None, _tasks()[1].split("train"))
    for _ in range(EPOCHS):
        logits = batch["x"] @ params["model.lora_w"].T + params["model.lora_b"]
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss = loss + lam / 2 * sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in params.items()}


def test_two_tasks_through_the_trainer_match_a_plain_loop(tmp_path):
    lam = 50.0
    backbone, method, snaps, losses = run_ewc(tmp_path, ewc_lambda=lam)
    assert losses[:EPOCHS] == [{}] * EPOCHS                       # task 1 trains plainly
    assert all(set(t) == {"ewc_penalty"} for t in losses[EPOCHS:])
    assert losses[EPOCHS]["ewc_penalty"].item() == 0.0             # task 2 starts at the anchor
    assert losses[-1]["ewc_penalty"].item() > 0.0
    # the Fisher and anchor of task A, as after_task computed them, drive task B
    backbone_a = ToyBackbone(seed=0)
    with torch.no_grad():
        for n, p in backbone_a.trainable_parameters().items():
            p.copy_(snaps[0][n])
    fisher_a = ewc.normalize_by_mean(_hand_fisher(backbone_a, _tasks()[0].split("train")))
    ref = _reference_task_b(snaps[0], snaps[0], fisher_a, lam)
    for n in ref:
        assert torch.allclose(snaps[1][n], ref[n], atol=1e-5), n
    assert method.anchor is not None and len(method.diagnostics()["fisher"]) == 2


def test_penalty_holds_the_weights_near_the_anchor(tmp_path):
    _, _, free, _ = run_ewc(tmp_path, ewc_lambda=0.0)
    _, method, held, _ = run_ewc(tmp_path, ewc_lambda=1000.0)
    assert all(torch.equal(free[0][n], held[0][n]) for n in free[0])   # same task 1

    def drift(s):
        return sum(float((t - s[0][n]).norm() ** 2) for n, t in s[1].items()) ** 0.5

    assert drift(held) < 0.5 * drift(free)


def test_state_round_trip(tmp_path):
    backbone, method, _, _ = run_ewc(tmp_path, ewc_lambda=5.0)
    tensors, meta = method.state_dict()
    assert tensors and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    io.write_tensors(tmp_path / "m.safetensors", tensors)
    io.write_json(tmp_path / "m.json", meta)
    fresh = _method(ToyBackbone(seed=1), ewc_lambda=5.0)
    assert fresh.state_dict() == ({}, {"diagnostics": {"fisher": []}})
    fresh.load_state_dict(io.read_tensors(tmp_path / "m.safetensors"), io.read_json(tmp_path / "m.json"))
    for n in method.anchor:
        assert torch.equal(fresh.anchor[n], method.anchor[n].cpu())
        assert torch.equal(fresh.fisher[n], method.fisher[n].cpu())
    assert fresh.diagnostics() == method.diagnostics()
    params = backbone.trainable_parameters()
    assert torch.equal(ewc.ewc_penalty(params, fresh.anchor, fresh.fisher, 5.0),
                       ewc.ewc_penalty(params, method.anchor, method.fisher, 5.0))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="fisher_loss"):
        _method(ToyBackbone(), fisher_loss="tokens")
    with pytest.raises(ValueError, match="unknown option"):
        _method(ToyBackbone(), lam=3)
