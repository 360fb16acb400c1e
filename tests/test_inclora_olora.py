"""IncLoRA and O-LoRA on the real MiniLM backbone (peft LoRA layers): adapters, sums, resume, orth loss."""

import json

import pytest
import torch
from transformers import set_seed

import rkif.methods.inclora  # noqa: F401  (registers inclora)
import rkif.methods.olora  # noqa: F401  (registers olora)
from rkif.config import RunConfig
from rkif.data import Example, Task
from rkif.methods import resolve
from rkif.methods.base import parse_options
from rkif.methods.olora import l2_penalty, orth_penalty
from rkif.training import train_stage
from tests.test_backbones import minilm, tiny_t5


def _task(name: str, labels: list[str]) -> Task:
    train = [Example(name, f"Item {i} of {name}: it is {labels[i % 2]}.\nAnswer:", labels[i % 2], "Which is it?\n")
             for i in range(8)]
    return Task(name, {"train": train, "test": train})


TASKS = [_task("first", ["good", "bad"]), _task("second", ["yes", "no"])]
RUN = RunConfig(batch_size=4, epochs=1, lr=1e-3, lr_scheduler="constant", seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads make a MiniLM forward ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _backbone():
    backbone = minilm()
    backbone.set_answer_space(TASKS)
    return backbone


def _method(name: str, backbone, **options):
    cls, opts = resolve(name, options)
    return cls(parse_options(cls.config_class, opts), backbone, RUN)


def _snapshot(backbone, marker: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backbone.named_parameters() if marker in n}


def _overlap(method) -> float:
    """Unweighted sum over modules of |A_default A_task_1^T| (the official orth term)."""
    layers = dict(method.lora_layers())
    return sum(orth_penalty(layer.lora_A["default"].weight, layer.lora_A["task_1"].weight).item()
               for layer in layers.values())


def _train(method, backbone, tmp_path, stages=(0, 1)) -> dict:
    """Train the given stages as the runner does; the default adapter after each stage, the start overlap."""
    after = {}
    for stage in stages:
        set_seed(RUN.seed + stage)                       # the runner seeds before before_task
        task = TASKS[stage]
        data = method.before_task(stage, [task], task.split("train"))
        if stage == 1:
            after["overlap"] = _overlap(method)
        train_stage(backbone, data, method, RUN, stage, str(tmp_path / "trainer"))
        method.after_task(stage, [task], task.split("train"))
        after[stage] = _snapshot(backbone, ".default.")
    return after


@pytest.fixture(scope="module")
def inc(tmp_path_factory):
    backbone = _backbone()
    method = _method("inclora", backbone)
    after = _train(method, backbone, tmp_path_factory.mktemp("inc"))
    return backbone, method, after


@pytest.fixture(scope="module")
def olo(tmp_path_factory):
    backbone = _backbone()
    method = _method("olora", backbone)
    after = _train(method, backbone, tmp_path_factory.mktemp("olo"))
    return backbone, method, after


def _logits(backbone, examples) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        batch = backbone.collate(examples)
        return backbone.logits(batch["input_ids"], batch["attention_mask"], batch["option_mask"])


# -- IncLoRA --------------------------------------------------------------------------------------
def test_task_two_trains_only_its_new_adapter(inc):
    backbone, method, after = inc
    assert method.adapters == ["default", "task_1"]
    names = list(backbone.trainable_parameters())
    assert len(names) == 24 and all(".task_1." in n for n in names)          # 6 layers x (q, v) x (A, B)
    old_end_of_task_1, old_now = after[0], after[1]
    assert old_end_of_task_1 and all(torch.equal(old_end_of_task_1[n], old_now[n]) for n in old_now)
    new_b = [p for n, p in backbone.named_parameters() if ".task_1." in n and "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in new_b)                            # B started at 0: it trained


def test_each_module_outputs_base_plus_sum_of_adapters(inc):
    backbone, method, _ = inc
    layers = dict(method.lora_layers())
    assert len(layers) == 12
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(0))
    backbone.eval()
    for layer in layers.values():
        assert set(layer.active_adapters) == {"default", "task_1"}
        with torch.no_grad():
            expected = layer.base_layer(x) + sum(layer.scaling[a] * x @ layer.lora_A[a].weight.T
                                                 @ layer.lora_B[a].weight.T for a in method.adapters)
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_model_output_equals_base_weights_plus_merged_sum(inc):
    backbone, method, _ = inc
    examples = TASKS[0].split("train")[:4] + TASKS[1].split("train")[:4]
    summed = _logits(backbone, examples)
    model = backbone.model
    layers = dict(method.lora_layers())
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    try:
        with torch.no_grad():
            for layer in layers.values():
                for a in method.adapters:
                    layer.base_layer.weight += layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight
        with model.disable_adapter():
            merged = _logits(backbone, examples)
    finally:
        with torch.no_grad():
            for n, layer in layers.items():
                layer.base_layer.weight.copy_(originals[n])
    torch.testing.assert_close(summed, merged, rtol=1e-4, atol=1e-4)
    # toggling: the old adapter alone gives other scores, and the full set is restored afterwards
    model.base_model.set_adapter("default")
    try:
        assert not torch.allclose(_logits(backbone, examples), summed, atol=1e-4)
    finally:
        method.activate()
    torch.testing.assert_close(_logits(backbone, examples), summed, rtol=0, atol=0)
    assert all(".task_1." in n for n in backbone.trainable_parameters())


def test_resume_recreates_adapters_and_predictions(inc):
    backbone, method, _ = inc
    tensors, meta = method.state_dict()
    assert tensors == {} and meta == {"adapters": ["default", "task_1"]}
    meta = json.loads(json.dumps(meta))
    weights = backbone.adapter_state()
    assert sum(".task_1." in n for n in weights) == 24 and sum(".default." in n for n in weights) == 24

    fresh = _backbone()
    resumed = _method("inclora", fresh)
    resumed.load_state_dict(tensors, meta)
    fresh.load_adapter_state(weights)
    assert resumed.adapters == method.adapters
    assert sorted(fresh.trainable_parameters()) == sorted(backbone.trainable_parameters())
    examples = TASKS[0].split("test") + TASKS[1].split("test")
    assert fresh.predict(examples) == backbone.predict(examples)
    torch.testing.assert_close(_logits(fresh, examples), _logits(backbone, examples), rtol=0, atol=0)
    resumed.before_task(2, [TASKS[1]], [])                                   # the sequence goes on
    assert resumed.adapters[-1] == "task_2" and all(".task_2." in n for n in fresh.trainable_parameters())
    with pytest.raises(ValueError):
        _method("inclora", _backbone()).load_state_dict({}, {"adapters": ["task_1"]})


def test_generative_backbone_predicts_with_summed_adapters():
    backbone = tiny_t5()
    method = _method("inclora", backbone)
    method.before_task(1, TASKS[1:], [])
    assert backbone.model.active_adapters == ["default", "task_1"]
    assert all(".task_1." in n for n in backbone.trainable_parameters())
    answers = backbone.predict(TASKS[1].split("test")[:2])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


# -- O-LoRA ---------------------------------------------------------------------------------------
def test_orth_forms_on_a_hand_example():
    bank = torch.tensor([[1.0, 0.0], [0.0, 2.0]])            # two old rows
    new = torch.tensor([[1.0, -1.0], [0.5, 0.0]])            # products: [[1, 0.5], [-2, 0]]
    assert orth_penalty(bank, new, "abs").item() == pytest.approx(3.5)     # |1| + |.5| + |-2| + 0
    assert orth_penalty(bank, new, "sq").item() == pytest.approx(5.25)     # 1 + .25 + 4 + 0
    assert l2_penalty([torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0], [2.0]])]).item() == pytest.approx(7.0)
    with pytest.raises(ValueError):
        orth_penalty(bank, new, "cube")


@pytest.mark.parametrize("form", ["abs", "sq"])
def test_orth_term_vanishes_on_the_orthogonal_complement(form):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    # LoRA-sized entries (Kaiming-uniform A of a 32-wide layer has |a| < 1 / sqrt(32))
    bank = 0.1 * torch.randn(16, 12, generator=g) @ q[:, :12].T             # 16 rows spanning 12 directions
    new = (0.1 * torch.randn(8, 20, generator=g) @ q[:, 12:].T).requires_grad_()   # rows in the complement
    value = orth_penalty(bank, new, form)
    value.backward()
    assert value.item() <= 1e-6
    if form == "sq":
        assert new.grad.abs().max().item() <= 1e-6
    same = bank[:8].clone().requires_grad_()                                 # A_new = bank rows
    assert orth_penalty(bank, same, form).item() > 0.01
    # exactly orthogonal (disjoint coordinates): value and (sub)gradient are exactly 0 for both forms
    exact = torch.zeros(8, 32)
    exact[:, 20:] = torch.randn(8, 12, generator=g)
    exact.requires_grad_()
    disjoint = torch.zeros(16, 32)
    disjoint[:, :20] = torch.randn(16, 20, generator=g)
    value = orth_penalty(disjoint, exact, form)
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(exact.grad) == 0


def test_olora_loss_terms_match_a_manual_sum(olo):
    backbone, method, _ = olo
    method.config.lambda2 = 0.1
    try:
        terms = method.extra_loss(backbone, {})
    finally:
        method.config.lambda2 = 0.0
    params = dict(backbone.named_parameters())
    orth, l2 = 0.0, 0.0
    for name in params:
        if ".lora_A.task_1." in name:
            old, b_new = name.replace(".task_1.", ".default."), name.replace("lora_A", "lora_B")
            orth += (params[old] @ params[name].T).abs().sum().item()
            l2 += params[name].norm().item() + params[b_new].norm().item()
    assert terms["olora_orth"].item() == pytest.approx(0.5 * orth, rel=1e-5)
    assert terms["olora_l2"].item() == pytest.approx(0.1 * l2, rel=1e-5)
    assert set(method.extra_loss(backbone, {})) == {"olora_orth"}            # lambda2 = 0: no L2 term
    method.config.scale_with_grad_accum, method.run = True, RunConfig(grad_accum=4)
    try:                                                                     # the official undivided sum
        assert method.extra_loss(backbone, {})["olora_orth"].item() == pytest.approx(4 * 0.5 * orth, rel=1e-5)
    finally:
        method.config.scale_with_grad_accum, method.run = False, RUN
    sum(method.extra_loss(backbone, {}).values()).backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if p.grad is not None}
    assert grads and all(".lora_A.task_1." in n for n in grads)              # only the new A gets a gradient
    backbone.zero_grad(set_to_none=True)


def test_olora_keeps_old_adapters_and_reduces_overlap(olo, inc):
    backbone, method, after = olo
    assert method.adapters == ["default", "task_1"]
    assert all(torch.equal(after[0][n], after[1][n]) for n in after[1])      # old adapter bit-identical
    assert all(".task_1." in n for n in backbone.trainable_parameters())
    # same data, seeds and initial new adapter as the IncLoRA run; only the penalty differs
    _, inc_method, inc_after = inc
    assert after["overlap"] == pytest.approx(inc_after["overlap"], rel=1e-5)
    assert _overlap(inc_method) > 0.95 * inc_after["overlap"]               # no penalty: overlap stays
    assert _overlap(method) < 0.8 * after["overlap"]                        # penalty: it shrinks


def test_first_task_has_no_orth_term_and_options_parse():
    backbone = _backbone()
    method = _method("olora", backbone, orth_form="sq", lambda2="0.3")
    assert method.config.orth_form == "sq" and method.config.lambda1 == 0.5 and method.config.lambda2 == 0.3
    assert set(method.extra_loss(backbone, {})) == {"olora_l2"}
    with pytest.raises(ValueError):
        _method("olora", backbone, orth_form="l1")


def test_runner_resumes_olora_mid_sequence(tiny_data, tmp_path, monkeypatch):
    """Crash in stage 2 of 2, resume: the runner recreates the adapters and ends with the same weights."""
    from safetensors.torch import load_file

    from rkif import runner
    from tests.conftest import cut_and_resume
    from tests.test_runner import config

    def cfg(name, **kw):
        return config(tiny_data, tmp_path / name, method="olora", tasks=["alpha", "beta"], **kw)

    full = runner.run_experiment(cfg("full"))
    saved = json.loads((tmp_path / "full" / "checkpoints" / "stage_1" / "method.json").read_text())
    assert saved == {"adapters": ["default", "task_1"]} and full["diagnostics"] == saved
    _, resumed = cut_and_resume(monkeypatch, lambda **kw: cfg("cut", **kw), 1)
    assert resumed["accuracy"] == full["accuracy"]
    weights = [load_file(tmp_path / name / "checkpoints" / "stage_1" / "adapter.safetensors")
               for name in ("full", "cut")]
    assert weights[0].keys() == weights[1].keys() and sum(".task_1." in n for n in weights[0]) == 24
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
