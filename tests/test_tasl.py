"""TaSL: importance through the Trainer, the four consolidation cases, units, variants, state round-trip."""

import pytest
import torch
from torch import nn

import rkif.methods.tasl as tasl
from rkif import io
from rkif.backbones.base import Backbone, BackboneConfig
from rkif.config import RunConfig
from rkif.data import Task
from rkif.methods import resolve
from rkif.methods.base import parse_options
from rkif.training import train_stage
from tests.conftest import ToyBackbone, toy_examples

EPOCHS, LR, CLIP = 6, 0.05, 1.0


def _run_config(**kw) -> RunConfig:
    return RunConfig(**{**dict(batch_size=16, epochs=EPOCHS, lr=LR, lr_scheduler="constant", max_grad_norm=CLIP,
                              seed=3), **kw})


def _tasks():
    return [Task("A", {"train": toy_examples("A", 16, 1)}), Task("B", {"train": toy_examples("B", 16, 2)})]


def _method(backbone, name="tasl", run=None, **options):
    cls, opts = resolve(name, options)
    return cls(parse_options(cls.config_class, opts), backbone, run or _run_config())


class UnitsBackbone(Backbone):
    """Four 2x3 'LoRA matrices' (four skill units), optionally plus one whose gradient is always zero."""

    family = "toy"

    def __init__(self, dead: bool = True):
        model = nn.Module()
        for i in range(4):
            setattr(model, f"lora_u{i}", nn.Parameter(torch.zeros(2, 3)))
        if dead:
            model.lora_dead = nn.Parameter(torch.ones(2, 3))
        super().__init__(model, None, BackboneConfig(model="toy", family="toy"))

    def collate(self, examples):
        return ToyBackbone.collate(None, examples)

    def forward(self, x, labels):
        w = sum(getattr(self.model, f"lora_u{i}") for i in range(4))                      # [2, 3]
        logits = torch.cat([x[:, :3] @ w.T, torch.zeros(len(x), 1)], 1)
        if hasattr(self.model, "lora_dead"):
            logits = logits + 0.0 * self.model.lora_dead.sum()
        return {"loss": nn.functional.cross_entropy(logits, labels)}


def _set(backbone, values):
    with torch.no_grad():
        for n, p in backbone.trainable_parameters().items():
            p.copy_(values[n])


def test_the_four_consolidation_cases_on_four_units():
    backbone = UnitsBackbone(dead=False)
    names = [f"model.lora_u{i}" for i in range(4)]
    g = torch.Generator().manual_seed(0)
    prev = {n: torch.randn(2, 3, generator=g) for n in names}
    cur = {n: torch.randn(2, 3, generator=g) for n in names}
    method = _method(backbone, top_percent=50.0)                  # 2 of the 4 units important per score set
    assert method.units.keys == sorted(names)
    _set(backbone, prev)
    method.on_train_begin(None)                                   # snapshot thetahat_{k-1}
    _set(backbone, cur)
    # unit scores: u0 important for both, u1 previous only, u2 current only, u3 neither
    cur_scores = {"model.lora_u0": 0.9, "model.lora_u1": 0.1, "model.lora_u2": 1.0, "model.lora_u3": 0.2}
    prev_scores = {"model.lora_u0": 1.0, "model.lora_u1": 0.8, "model.lora_u2": 0.3, "model.lora_u3": 0.1}
    for n in names:
        method.ibar[n].fill_(cur_scores[n])
        method.ubar[n].fill_(1.0)
    method.accumulated = torch.tensor([prev_scores[k] for k in method.units.keys])
    method.after_task(1, [], [])
    after = backbone.trainable_parameters()
    assert torch.equal(after["model.lora_u1"], prev["model.lora_u1"])                        # previous only
    assert torch.equal(after["model.lora_u2"], cur["model.lora_u2"])                         # current only
    n = "model.lora_u0"
    assert torch.allclose(after[n], 0.3 * cur[n] + 0.7 * prev[n], rtol=1e-6, atol=1e-7)      # both
    n = "model.lora_u3"
    assert torch.allclose(after[n], 0.5 * cur[n] + 0.5 * prev[n], rtol=1e-6, atol=1e-7)      # neither
    # accumulated importance: minmax(0.3 minmax(I_k) + 0.7 minmax(Ihat)), in unit order
    c = torch.tensor([cur_scores[k] for k in method.units.keys])
    p = torch.tensor([prev_scores[k] for k in method.units.keys])
    mix = 0.3 * c + 0.7 * p
    assert torch.allclose(method.accumulated, (mix - mix.min()) / (mix.max() - mix.min()))


def test_default_threshold_marks_the_top_20_percent_strictly():
    x = torch.arange(10, dtype=torch.float32)
    assert tasl.important(x, 20.0).tolist() == [False] * 8 + [True] * 2
    w = tasl.hard_weights(tasl.minmax(x), tasl.minmax(x.flip(0)))
    assert w.tolist() == [0.0, 0.0] + [0.5] * 6 + [1.0, 1.0]
    assert tasl.minmax(torch.full((4,), 3.0)).tolist() == [0.0] * 4


def test_importance_through_the_trainer_matches_a_plain_loop(tmp_path):
    """Post-step weights, clipped gradients, S/U smoothing; a parameter without gradient scores 0."""
    backbone = UnitsBackbone()
    with torch.no_grad():
        for i in range(4):
            getattr(backbone.model, f"lora_u{i}").normal_(generator=torch.Generator().manual_seed(i))
    start = {n: p.detach().clone() for n, p in backbone.trainable_parameters().items()}
    run = _run_config()
    method = _method(backbone, run=run)
    task = _tasks()[0]
    train_stage(backbone, task.split("train"), method, run, 0, str(tmp_path))
    ours = {n: method.ibar[n] * method.ubar[n] for n in method.ibar}

    params = {n: nn.Parameter(t.clone()) for n, t in start.items()}
    ibar = {n: torch.zeros_like(t) for n, t in start.items()}
    ubar = {n: torch.zeros_like(t) for n, t in start.items()}
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    batch = ToyBackbone.collate(None, task.split("train"))
    for _ in range(EPOCHS):
        w = sum(params[f"model.lora_u{i}"] for i in range(4))
        logits = torch.cat([batch["x"][:, :3] @ w.T, torch.zeros(16, 1)], 1) + 0.0 * params["model.lora_dead"].sum()
        nn.functional.cross_entropy(logits, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
        opt.step()
        for n, p in params.items():                                   # post-step weights, clipped grads
            s = (p.detach() * p.grad).abs()
            ibar[n] = 0.85 * ibar[n] + 0.15 * s
            ubar[n] = 0.85 * ubar[n] + 0.15 * (s - ibar[n]).abs()
        opt.zero_grad(set_to_none=True)
    for n in ours:
        assert torch.allclose(ours[n], ibar[n] * ubar[n], rtol=1e-4, atol=1e-9), n
    scores = dict(zip(method.units.keys, method.current_scores().tolist()))
    assert scores["model.lora_dead"] == 0.0                          # zero gradient -> score 0
    assert all(v > 0 for k, v in scores.items() if k != "model.lora_dead")
    assert tasl.element_scores(torch.randn(3), None, "first_order").count_nonzero() == 0


def test_two_tasks_through_train_stage(tmp_path):
    backbone = ToyBackbone(seed=0)
    run = _run_config()
    method = _method(backbone, run=run)
    trained = []
    for stage, task in enumerate(_tasks()):
        data = method.before_task(stage, [task], task.split("train"))
        train_stage(backbone, data, method, run, stage, str(tmp_path / "trainer"))
        trained.append({n: p.detach().clone() for n, p in backbone.trainable_parameters().items()})
        scores = method.current_scores()
        method.after_task(stage, [task], task.split("train"))
        if stage == 0:                                                # task 1: copy, Ihat = I_1
            after_first = {n: p.detach().clone() for n, p in backbone.trainable_parameters().items()}
            assert all(torch.equal(after_first[n], trained[0][n]) for n in after_first)
            assert torch.equal(method.accumulated, tasl.minmax(scores))
            first_scores = scores
    assert method.previous is not None
    assert all(torch.equal(method.previous[n], after_first[n]) for n in after_first)   # thetahat_1 = start of task 2
    # two units (lora_b, lora_w): the top one of each score set is important
    w = tasl.hard_weights(tasl.minmax(scores), tasl.minmax(first_scores))
    final = backbone.trainable_parameters()
    for name, wk in zip(method.units.keys, w.tolist()):
        expected = wk * trained[1][name] + (1 - wk) * after_first[name]
        assert torch.allclose(final[name], expected, atol=1e-7), name
    assert not all(torch.equal(final[n], trained[1][n]) for n in final)        # consolidation changed something
    assert [r["stage"] for r in method.diagnostics()["consolidation"]] == [0, 1]


def test_rank1_units_score_the_outer_product_and_expand_to_rows_and_columns():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 5, generator=g), torch.rand(4, 3, generator=g)
    shapes = {"m.lora_A.w": (3, 5), "m.lora_B.w": (4, 3), "other": (2,)}
    units = tasl.SkillUnits(shapes, "rank1")
    assert units.keys == ["m.lora_A.w|0", "m.lora_A.w|1", "m.lora_A.w|2", "other"]
    scores = units.scores({"m.lora_A.w": a, "m.lora_B.w": b, "other": torch.tensor([1.0, 3.0])})
    for j in range(3):
        assert torch.allclose(scores[j], torch.outer(b[:, j], a[j]).mean())
    assert scores[3] == 2.0
    w = units.expand(torch.tensor([0.0, 1.0, 0.5, 0.25]), shapes)
    assert torch.equal(w["m.lora_A.w"].expand(3, 5)[:, 0], torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(w["m.lora_B.w"].expand(4, 3)[0], torch.tensor([0.0, 1.0, 0.5]))
    assert float(w["other"]) == 0.25


def test_soft_rule_is_a_two_way_softmax():
    cur, prev = torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])
    w = tasl.soft_weights(cur, prev, 0.25)
    ref = torch.exp(cur / 0.25) / (torch.exp(cur / 0.25) + torch.exp(prev / 0.25))
    assert torch.allclose(w, ref) and w[2] == 0.5


def test_taslora_preset_on_real_peft_lora_layers(tmp_path):
    from tests.test_backbones import EXAMPLES, tiny_t5
    backbone = tiny_t5()
    run = RunConfig(batch_size=4, epochs=1, lr=1e-2, seed=3)
    method = _method(backbone, "tasl-taslora", run)
    assert (method.config.units, method.config.rule, method.config.score) == ("rank1", "soft", "param_mix")
    assert len(method.units) == 6 * 8             # (enc self, dec self, cross) x (q, v) x rank 8
    halves = [EXAMPLES[:4], EXAMPLES[4:]]
    for stage, data in enumerate(halves):
        train_stage(backbone, data, method, run, stage, str(tmp_path))
        theta_k = {n: p.detach().clone() for n, p in backbone.trainable_parameters().items()}
        method.after_task(stage, [], data)
    final = backbone.trainable_parameters()
    moved = [n for n in final if not torch.equal(final[n], theta_k[n])]
    assert moved and all(torch.isfinite(p).all() for p in final.values())
    orth = tasl.orthogonality(final)
    assert orth.item() > 0 and method.extra_loss(None, {})["orth_reg"].item() == pytest.approx(0.1 * orth.item())


def test_state_round_trip(tmp_path):
    backbone = ToyBackbone(seed=0)
    run = _run_config()
    method = _method(backbone, run=run)
    for stage, task in enumerate(_tasks()):
        train_stage(backbone, task.split("train"), method, run, stage, str(tmp_path / "trainer"))
        method.after_task(stage, [task], task.split("train"))
    tensors, meta = method.state_dict()
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    io.write_tensors(tmp_path / "m.safetensors", tensors)
    io.write_json(tmp_path / "m.json", meta)
    fresh = _method(ToyBackbone(seed=1), run=run)
    fresh.load_state_dict(io.read_tensors(tmp_path / "m.safetensors"), io.read_json(tmp_path / "m.json"))
    assert torch.equal(fresh.accumulated, method.accumulated)
    assert fresh.diagnostics() == method.diagnostics()
    # a model with other skill units refuses the state
    other = _method(UnitsBackbone(), run=run)
    with pytest.raises(ValueError, match="skill units"):
        other.load_state_dict(tensors, meta)


def test_bad_option_is_refused():
    with pytest.raises(ValueError, match="rule"):
        _method(ToyBackbone(), rule="average")
    with pytest.raises(ValueError, match="unknown option"):
        _method(ToyBackbone(), temperature=1.0)
