"""The paths a CPU never takes: every method trained on CUDA under bf16 and under fp16 with a GradScaler.

Skipped without a GPU (CI has none); ``benchmarks/gpu_check.sh`` runs them where one is lent. Each run is
the whole pipeline (``run_experiment``: Trainer, method hooks, checkpoints, evaluation under autocast) on
a tiny LLaMA saved as a local folder, two tasks.
"""

import json
import math

import pytest
import torch

from rkif import runner
from rkif.backbones import BackboneConfig
from rkif.config import RunConfig
from rkif.methods import registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def config(model_dir, data, out, method: str, precision: str, **kw) -> RunConfig:
    return RunConfig(method=method, backbone=BackboneConfig(model=str(model_dir), family="causal", max_length=48),
                     data=str(data), tasks=["alpha", "beta"], train_size=None, test_size=None, memory_fraction=0.25,
                     epochs=2.0, batch_size=4, lr=1e-3, precision=precision, output=str(out), **kw)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", registry.available())
def test_every_method_trains_and_evaluates_on_cuda(tiny_llama_dir, tiny_data, tmp_path, method, precision):
    res = runner.run_experiment(config(tiny_llama_dir, tiny_data, tmp_path / "run", method, precision))
    assert res["precision_used"] == precision
    assert res["complete"] and all(a is not None for a in (res["accuracy"][0][-1], res["accuracy"][1][-1]))
    losses = [stage["train_loss"] for stage in res["stage_log"]]
    assert losses and all(math.isfinite(v) for v in losses)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["precision"] == precision


def test_rkif_importance_under_fp16_is_unscaled(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    """R-KIF's outer-loop importance comes from unscaled gradients under fp16: the same order of magnitude
    as under bf16, not the GradScaler's 2^16 times larger."""
    from rkif.methods import rkif as rkif_method

    seen: dict[str, list[float]] = {"bf16": [], "fp16": []}
    real = rkif_method.step_scores
    for precision in seen:
        def record(params, score, _p=precision):
            scores = real(params, score)
            seen[_p].append(float(sum(s.float().abs().sum() for s in scores.values())))
            return scores

        monkeypatch.setattr(rkif_method, "step_scores", record)
        runner.run_experiment(config(tiny_llama_dir, tiny_data, tmp_path / precision, "rkif", precision,
                                     method_options={"outer_steps": 2}))
    assert seen["bf16"] and seen["fp16"]
    ratio = (sum(seen["fp16"]) / len(seen["fp16"])) / (sum(seen["bf16"]) / len(seen["bf16"]))
    assert 0.1 < ratio < 10, ratio


def test_the_untrained_evaluation_runs_on_the_gpu(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    devices = []
    real = runner.evaluate

    def record(backbone, *args, **kw):
        devices.append(backbone.device.type)
        return real(backbone, *args, **kw)

    monkeypatch.setattr(runner, "evaluate", record)
    runner.run_experiment(config(tiny_llama_dir, tiny_data, tmp_path / "run", "seqlora", "fp32"))
    assert devices and set(devices) == {"cuda"}
