"""MoELoRA (BASELINES.md section 10): router shapes and softmax, one expert = LoRA, gradients scaled by the
gate, no task id, end to end with resume, refusal on the encoder family."""

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import set_seed

from rkif import runner
from rkif.backbones import BackboneConfig
from rkif.config import RunConfig
from rkif.data import Example
from rkif.methods.moelora import MoELoRA, MoELoRAConfig, gate_weights
from tests.conftest import cut_and_resume
from tests.test_backbones import EXAMPLES, tiny_llama, tiny_t5
from tests.test_input_hook import build, nonzero_adapters


def _layers(method):
    return list(method.layers.values())


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_every_target_layer_has_e_experts_and_a_router_whose_gates_sum_to_one(family):
    backbone, method = build("moelora", family, experts=3)
    assert method.experts == ["default", "expert_1", "expert_2"]
    assert _layers(method) and all(set(layer.lora_A) == set(method.experts) for layer in _layers(method))
    d = backbone.model.get_base_model().get_input_embeddings().embedding_dim
    batch = backbone.collate(EXAMPLES[:4])
    backbone(**batch)
    for layer in _layers(method):
        assert tuple(layer.moe_router.weight.shape) == (3, d) and layer.moe_router.bias is None
        assert layer.scaling["expert_1"] == pytest.approx(32 / (3 * 2))       # alpha / r, r = E * r_e
        gates = method.gates[layer]
        assert gates.shape == (4, 3) and (gates > 0).all()
        assert torch.allclose(gates.sum(-1), torch.ones(4))
        assert torch.allclose(gates, torch.softmax(method.query @ layer.moe_router.weight.T, -1))
    names = set(backbone.trainable_parameters())
    assert any("moe_router" in n for n in names) and any(".expert_2." in n for n in names)


def test_gate_weights_are_a_softmax_over_experts():
    router = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]]))
    g = gate_weights(router, torch.tensor([[2.0, 0.0, 5.0, 5.0]]))
    e = torch.exp(torch.tensor([2.0, 0.0, 0.0]))
    assert torch.allclose(g, (e / e.sum())[None])


def test_one_expert_equals_plain_lora():
    config = MoELoRAConfig(experts=1)
    cls_config = MoELoRA.peft_config(config, BackboneConfig(model="tiny", family="causal"))
    set_seed(0)
    lora = tiny_llama(LoraConfig(r=2, lora_alpha=32, lora_dropout=0.1))
    set_seed(0)
    moe = tiny_llama(cls_config)
    MoELoRA(config, moe, RunConfig(tasks=["a"]))
    for backbone in (lora, moe):
        nonzero_adapters(backbone)
        backbone.eval()
    batch = lora.collate(EXAMPLES[:4])
    with torch.no_grad():
        assert torch.equal(lora(**batch)["loss"], moe(**batch)["loss"])
    assert lora.predict(EXAMPLES[:4]) == moe.predict(EXAMPLES[:4])


def test_each_expert_gets_gradient_in_proportion_to_its_gate():
    backbone, method = build("moelora", tiny_llama, experts=3)
    layer = _layers(method)[0]
    with torch.no_grad():                     # identical experts: their gradients differ only by the gate
        for name in method.experts:
            layer.lora_A[name].weight.copy_(layer.lora_A["default"].weight)
            layer.lora_B[name].weight.fill_(0.1)
    backbone.eval()                           # no dropout
    backbone(**backbone.collate(EXAMPLES[:1]))["loss"].backward()
    g = method.gates[layer][0].detach()
    assert (g.max() - g.min()) > 1e-3         # the router does prefer some experts
    for kind in ("lora_A", "lora_B"):
        grads = [getattr(layer, kind)[name].weight.grad for name in method.experts]
        assert all(gr.abs().sum() > 0 for gr in grads)
        for e in range(1, 3):
            assert torch.allclose(grads[e] / g[e], grads[0] / g[0], rtol=1e-4, atol=1e-7), kind


def test_routing_reads_the_input_never_the_task():
    backbone, method = build("moelora", tiny_llama, experts=3)
    nonzero_adapters(backbone)
    backbone.eval()
    renamed = [Example("some-other-task", ex.input, ex.output, ex.instruction) for ex in EXAMPLES[:4]]
    gates = []
    for examples in (EXAMPLES[:4], renamed):
        with torch.no_grad():
            backbone(**backbone.collate(examples))
        gates.append(method.gates[_layers(method)[0]].clone())
    assert torch.equal(gates[0], gates[1])
    assert not torch.allclose(gates[0][0], gates[0][1])          # another input, another gate
    assert backbone.predict(EXAMPLES[:4]) == backbone.predict(renamed)


def _config(model_dir, data, out, **kw) -> RunConfig:
    return RunConfig(method="moelora", backbone=BackboneConfig(model=str(model_dir), family="causal", max_length=48),
                     data=str(data), tasks=["alpha", "beta"], train_size=None, test_size=None, epochs=1.0,
                     batch_size=4, lr=1e-2, output=str(out), **kw)


def test_two_tasks_end_to_end_and_resume_gives_the_same_run(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    full = runner.run_experiment(_config(tiny_llama_dir, tiny_data, tmp_path / "full"))
    assert full["complete"] and all(a is not None for row in full["accuracy"] for a in row)
    assert full["diagnostics"]["experts"] == ["default", "expert_1"]            # E = K = 2
    assert [g["stage"] for g in full["diagnostics"]["gates"]] == [0, 1]
    saved = load_file(tmp_path / "full" / "checkpoints" / "stage_1" / "adapter.safetensors")
    assert any("moe_router" in n for n in saved) and any(".expert_1." in n for n in saved)
    first = load_file(tmp_path / "full" / "checkpoints" / "stage_0" / "adapter.safetensors")
    assert any(not torch.equal(first[n], saved[n]) for n in saved if "moe_router" in n)    # routers trained

    _, resumed = cut_and_resume(monkeypatch, lambda **kw: _config(tiny_llama_dir, tiny_data, tmp_path / "cut", **kw), 1)
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["diagnostics"] == full["diagnostics"]
    again = load_file(tmp_path / "cut" / "checkpoints" / "stage_1" / "adapter.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[n], saved[n]) for n in saved)


def test_refuses_the_encoder_family_before_loading_a_model():
    run = RunConfig(method="moelora", backbone=BackboneConfig(model="minilm", family="encoder"), tasks=["a"])
    with pytest.raises(ValueError, match="moelora cannot run on the encoder family"):
        runner.build_learner(run, [])


def test_scale_rows_repeats_a_prompts_weight_over_its_rows_and_refuses_a_mismatch():
    from rkif.methods.base import scale_rows

    out = torch.ones(4, 2, 3)
    scaled = scale_rows(out, torch.tensor([2.0, 3.0]), "m")          # 2 prompts, 2 rows each (rank mode)
    assert scaled[:, 0, 0].tolist() == [2.0, 2.0, 3.0, 3.0]
    with pytest.raises(RuntimeError, match="m: batch of 4 rows for 3 prompts"):
        scale_rows(out, torch.ones(3), "m")
