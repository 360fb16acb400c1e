"""SmolLM2 on this CPU, side by side in one process: evaluation before/after bounding generation, and fp32 vs bf16.

1. Evaluation, seconds per 100 predictions on the same examples (a mix of the four Standard tasks):
   ``before``: the previous causal evaluation (examples in their given order, up to ``max_target_length``
   = 16 new tokens); ``after``: batches sorted by prompt length, generation stopped at EOS or after the
   longest answer of the run (tokens + EOS); ``rank``: rank classification over every label of the run.
   Measured on the untrained model and, with ``--adapter``, on a trained one (e.g. a grid run's
   ``checkpoints/stage_0/adapter.safetensors``); the answers of before/after are compared.
2. Precision: the same LoRA steps on the same batches from the same start in fp32 and under bf16 autocast:
   seconds per step (median after the first), the loss of every step, and the evaluation in each precision
   (accuracy and agreement with fp32). ``native_bf16`` says whether this CPU has bf16 kernels; without
   them bf16 is emulated.

    python benchmarks/smollm2_speed.py --out benchmarks/results/smollm2_speed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from transformers import set_seed

from rkif import io, metrics
from rkif.backbones import BackboneConfig, build_backbone
from rkif.config import library_versions
from rkif.data import load_benchmark
from rkif.precision import autocast, native_bf16

TASKS = ["dbpedia", "amazon", "yahoo", "agnews"]


def timed_predict(backbone, examples, *, answer_mode="generate", bounded=True, precision="fp32") -> tuple[float, list]:
    """Seconds per 100 predictions and the answers, in one of the evaluation modes."""
    saved = (backbone.config.answer_mode, backbone.answer_limit, backbone.length_sorted_prediction)
    backbone.config.answer_mode = answer_mode
    if not bounded:                               # the previous evaluation: fixed 16 new tokens, given order
        backbone.answer_limit, backbone.length_sorted_prediction = backbone.config.max_target_length, False
    try:
        start = time.perf_counter()
        with autocast(precision, "cpu"):
            answers = backbone.predict(examples, desc=f"{answer_mode} bounded={bounded} {precision}")
        seconds = time.perf_counter() - start
    finally:
        backbone.config.answer_mode, backbone.answer_limit, backbone.length_sorted_prediction = saved
    return 100 * seconds / len(examples), answers


def accuracy(answers, examples) -> float:
    return metrics.accuracy(answers, [ex.output for ex in examples])


def agreement(answers, others) -> float:
    """Share of examples answered identically."""
    return sum(a == b for a, b in zip(answers, others, strict=True)) / len(answers)


def evaluation_speed(backbone, examples, with_rank: bool) -> dict:
    out = {}
    for name, kw in (("before", {"bounded": False}), ("after", {}), ("rank", {"answer_mode": "rank"})):
        if name == "rank" and not with_rank:
            continue
        per100, answers = timed_predict(backbone, examples, **kw)
        out[name] = {"seconds_per_100": per100, "accuracy": accuracy(answers, examples), "answers": answers}
    out["after_equals_before"] = agreement(out["after"]["answers"], out["before"]["answers"])
    out["speedup_after_vs_before"] = out["before"]["seconds_per_100"] / out["after"]["seconds_per_100"]
    return out


def precision_comparison(backbone, train, examples, steps: int, lr: float) -> dict:
    start = backbone.adapter_state()
    params = list(backbone.trainable_parameters().values())
    batches = [train[8 * k:8 * k + 8] for k in range(steps)]
    out = {}
    for precision in ("fp32", "bf16"):
        backbone.load_adapter_state(start)
        set_seed(0)
        optimizer = torch.optim.AdamW(params, lr=lr)
        backbone.train()
        losses, seconds = [], []
        for batch in batches:
            t0 = time.perf_counter()
            with autocast(precision, "cpu"):
                loss = backbone(**backbone.collate(batch))["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds.append(time.perf_counter() - t0)
            losses.append(loss.item())
        evals = {}
        for eval_precision in ("fp32", "bf16"):
            per100, answers = timed_predict(backbone, examples, precision=eval_precision)
            evals[eval_precision] = {"seconds_per_100": per100, "accuracy": accuracy(answers, examples),
                                     "answers": answers}
        evals["agreement_fp32_bf16"] = agreement(evals["fp32"]["answers"], evals["bf16"]["answers"])
        out[precision] = {"seconds_per_step": seconds, "median_seconds_per_step": statistics.median(seconds[1:]),
                          "losses": losses, "eval": evals}
    out["bf16_step_speedup"] = out["fp32"]["median_seconds_per_step"] / out["bf16"]["median_seconds_per_step"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--per-task", type=int, default=16, help="test examples per task for the timings")
    p.add_argument("--steps", type=int, default=4, help="training steps in each precision")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--adapter", default=None, help="adapter.safetensors of a trained run (first task trained)")
    p.add_argument("--no-rank", action="store_true", help="skip timing rank classification (about 20x slower)")
    p.add_argument("--out", default="benchmarks/results/smollm2_speed.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    tasks = load_benchmark(Path(a.data), TASKS, 8 * a.steps, a.per_task, "test", 42)
    examples = [ex for t in tasks for ex in t.split("test")]
    train = [ex for t in tasks for ex in t.split("train")]
    set_seed(42)
    backbone = build_backbone(BackboneConfig(model="smollm2", max_length=a.max_length, eval_batch_size=16))
    backbone.set_answer_space(tasks)
    result = {"command": "python benchmarks/smollm2_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v not in (None, False)),
        "examples": len(examples), "answer_limit": backbone.answer_limit, "native_bf16": native_bf16("cpu"),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "versions": library_versions()}
    result["evaluation_untrained"] = evaluation_speed(backbone, examples, not a.no_rank)
    if a.adapter:
        untrained = backbone.adapter_state()
        backbone.load_adapter_state(io.read_tensors(Path(a.adapter)))
        result["evaluation_trained"] = evaluation_speed(backbone, examples, not a.no_rank)
        backbone.load_adapter_state(untrained)
    result["precision"] = precision_comparison(backbone, train, examples, a.steps, a.lr)
    io.write_json(Path(a.out), result)
    brief = {k: v for k, v in result.items() if k not in ("versions",)}
    print(json.dumps(brief, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
