"""OSF (peft's orthogonal-subspace tuner): configuration, the between-task re-decomposition, state, runner."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import rkif.methods.osf as osf
from rkif import runner
from rkif.backbones import BackboneConfig, build_backbone
from rkif.config import RunConfig
from rkif.data import Example, Task
from rkif.methods import parse_options, resolve
from tests.conftest import cut_and_resume

TASKS = [Task(name, {"train": [Example(name, "x", "y")]}) for name in ("a", "b", "c")]


def test_config_targets_schedule_and_options():
    cfg = osf.OSFMethodConfig()
    for family, targets in (("encoder", ["query", "value"]), ("seq2seq", ["q", "v"]),
                            ("causal", ["q_proj", "v_proj"])):
        peft_cfg = osf.OSF.peft_config(cfg, BackboneConfig(family=family))
        assert sorted(peft_cfg.target_modules) == sorted(targets) and peft_cfg.effective_rank == 1
    custom = osf.OSF.peft_config(cfg, BackboneConfig(lora_targets=["key"], family="causal"))
    assert list(custom.target_modules) == ["key"]
    with pytest.raises(ValueError, match="toy"):
        osf.osf_targets(BackboneConfig(family="toy"))
    # peft's budget: stage j of K preserves j/K; f0 shifts the start; "fixed" keeps f0
    assert [osf.preserved_fraction(j, 4, 0.0, "progressive") for j in range(4)] == [0, 0.25, 0.5, 0.75]
    assert osf.preserved_fraction(2, 4, 0.5, "progressive") == pytest.approx(0.75)
    assert osf.preserved_fraction(3, 4, 0.3, "fixed") == 0.3
    assert osf.peft_effective_rank(0.0) == 1 and osf.peft_effective_rank(0.25) == 0.25
    cls, opts = resolve("osf", {"lr": "3e-5", "schedule": "fixed", "first_fraction": "0.5", "recompute": "no"})
    parsed = parse_options(cls.config_class, opts)
    assert cls is osf.OSF and parsed == osf.OSFMethodConfig("fixed", 0.5, False, 3e-5)
    assert osf.OSF.peft_config(parsed, BackboneConfig()).effective_rank == 0.5
    for bad in ({"schedule": "grow"}, {"first_fraction": "1.0"}, {"lr": "-1e-4"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            parse_options(osf.OSFMethodConfig, bad)


def test_on_train_begin_runs_the_stage_at_the_option_lr():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 10)
    trainer = SimpleNamespace(args=SimpleNamespace(learning_rate=1e-3), optimizer=optimizer, lr_scheduler=scheduler)
    fake_backbone = SimpleNamespace(config=BackboneConfig())
    osf.OSF(osf.OSFMethodConfig(), fake_backbone, RunConfig(lr=1e-3)).on_train_begin(trainer)   # default 1e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.9)    # the schedule follows the new rate
    untouched = torch.optim.AdamW([weight], lr=1e-3)
    trainer.optimizer = untouched
    osf.OSF(osf.OSFMethodConfig(lr=0), fake_backbone, RunConfig(lr=1e-3)).on_train_begin(trainer)   # the run's
    assert untouched.param_groups[0]["lr"] == 1e-3


def _minilm(cfg: osf.OSFMethodConfig):
    bcfg = BackboneConfig(max_length=32)
    torch.manual_seed(0)
    backbone = build_backbone(bcfg, osf.OSF.peft_config(cfg, bcfg))
    method = osf.OSF(cfg, backbone, RunConfig())
    assert method.stages(TASKS) == [[t] for t in TASKS]
    return backbone, method


def _embed(backbone) -> torch.Tensor:
    batch = backbone.tokenize(["a first sentence", "and a second, longer sentence"], 32)
    return backbone.embed(batch["input_ids"], batch["attention_mask"])


def test_new_task_merges_and_re_decomposes_with_a_larger_preserved_rank():
    backbone, method = _minilm(osf.OSFMethodConfig())
    names = set(backbone.trainable_parameters())
    assert names and all(".osf_svd_params.default." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"query", "value"}
    layers = method.osf_layers()
    assert len(layers) == 12 and all(m.effective_rank["default"] == 1 for m in layers.values())
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if n in backbone.frozen_base}
    with torch.no_grad():                                     # stand-in for training the first task
        for p in backbone.trainable_parameters().values():
            p.add_(0.01 * torch.randn_like(p))
        before = _embed(backbone)
    method.before_task(0, TASKS[:1], [])
    method.before_task(1, TASKS[1:2], [])
    with torch.no_grad():
        assert torch.allclose(_embed(backbone), before, atol=1e-5)       # merged: the function is unchanged
    assert set(backbone.trainable_parameters()) == names                 # same names: checkpoints still fit
    assert {n for n, _ in backbone.named_parameters()} == names | set(frozen)
    layer = method.osf_layers()["encoder.layer.0.attention.self.query"]
    assert layer.effective_rank["default"] == 128                      # 1/3 of 384 directions preserved
    assert layer.osf_svd_params["default"]["U_low"].shape == (384, 256)
    changed = {n for n, p in backbone.named_parameters() if n in frozen and not torch.equal(frozen[n], p)}
    assert changed and all(n.endswith(("query.base_layer.weight", "value.base_layer.weight")) for n in changed)
    assert len(changed) == 12                                          # exactly the merged target weights
    assert method.ranks == [1, 1 / 3] and method.merges == 1

    # peft's projection is active on the new factors: no gradient along the new top-128 directions
    _embed(backbone).pow(2).sum().backward()
    u_high = torch.linalg.svd(layer.get_base_layer().weight.detach(), full_matrices=False)[0][:, :128]
    grad = layer.osf_svd_params["default"]["U_low"].grad
    assert grad.abs().max() > 0 and (u_high.T @ grad).abs().max() < 1e-4 * grad.abs().max()
    backbone.zero_grad()

    # state round trip: a fresh backbone with the saved state computes the same function
    tensors, meta = method.state_dict()
    assert len(tensors) == 12 and all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    json.dumps(meta)
    adapter = backbone.adapter_state()
    assert set(adapter) == names                                       # adapter_state = the OSF factors
    fresh, restored = _minilm(osf.OSFMethodConfig())
    restored.load_state_dict(tensors, json.loads(json.dumps(meta)))
    fresh.load_adapter_state(adapter)
    with torch.no_grad():
        assert torch.allclose(_embed(fresh), _embed(backbone), atol=1e-5)
    assert restored.diagnostics() == method.diagnostics()


def _run_config(data, out, **kw) -> RunConfig:
    settings = dict(method="osf", method_options={"lr": "1e-3"}, backbone=BackboneConfig(max_length=32),
                    data=str(data), tasks=["alpha", "beta", "gamma"], train_size=8, test_size=None, epochs=1,
                    batch_size=8, lr=5e-3, seed=7, output=str(out))
    return RunConfig(**{**settings, **kw})


def test_osf_trains_through_the_runner_and_resumes_after_a_merge(tiny_data, tmp_path, monkeypatch):
    real_build, built = runner.build_learner, []

    def capture(run, tasks):
        backbone, method = real_build(run, tasks)
        built.append(({n: p.detach().clone() for n, p in backbone.named_parameters()}, backbone))
        return backbone, method

    monkeypatch.setattr(runner, "build_learner", capture)
    full = runner.run_experiment(_run_config(tiny_data, tmp_path / "full"))
    assert full["complete"] and len(full["accuracy"]) == 3 and all(len(row) == 3 for row in full["accuracy"])
    diagnostics = full["diagnostics"]
    assert diagnostics["merges"] == 2 and diagnostics["lr"] == 1e-3
    assert diagnostics["effective_rank"] == [1, 1 / 3, 2 / 3]
    start, backbone = built[0]
    trainable = backbone.trainable_parameters()
    targets = {n for n in start if n.endswith(("query.base_layer.weight", "value.base_layer.weight"))}
    assert len(targets) == 12
    for name, param in backbone.named_parameters():
        if name in trainable or name in targets:
            continue
        assert torch.equal(start[name], param), name                   # outside the trainable set: unchanged
    assert all(not torch.equal(start[n], p) for n, p in backbone.named_parameters() if n in targets)  # merged
    ckpt = tmp_path / "full" / "checkpoints"
    assert set(load_file(ckpt / "stage_2" / "adapter.safetensors")) == set(trainable)
    assert not load_file(ckpt / "stage_0" / "method.safetensors")       # no merge yet: pretrained weights
    assert len(load_file(ckpt / "stage_1" / "method.safetensors")) == 12

    partial, resumed = cut_and_resume(monkeypatch, lambda **kw: _run_config(tiny_data, tmp_path / "cut", **kw), 2)
    assert partial["finished_stages"] == 2
    assert resumed["accuracy"] == full["accuracy"] and resumed["diagnostics"] == full["diagnostics"]
    for part in ("adapter", "method"):
        a = load_file(ckpt / "stage_2" / f"{part}.safetensors")
        b = load_file(tmp_path / "cut" / "checkpoints" / "stage_2" / f"{part}.safetensors")
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
