"""SAPT (BASELINES.md section 10): attention over task keys, gated task LoRAs, the reflection KL, pseudo-prompts
from the generator, frozen earlier stages, refusal on the encoder family, a CLI run end to end with resume."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import set_seed

from rkif import runner
from rkif.backbones import BackboneConfig
from rkif.backbones.causal import CausalBackbone
from rkif.cli import build_parser, config_from_args, main, parse_args
from rkif.config import RunConfig
from rkif.data import Example, Task
from rkif.methods import parse_options, resolve
from rkif.methods.sapt import GEN, SAPTConfig, masked_max, padded, parse_pseudo, reflection_kl
from tests.conftest import cut_and_resume, write_tasks
from tests.test_backbones import EXAMPLES, tiny_llama, tiny_t5
from tests.test_input_hook import nonzero_adapters

FAMILY = {tiny_llama: "causal", tiny_t5: "seq2seq"}
TASKS = [Task("first", {"train": EXAMPLES}),
         Task("second", {"train": [Example("second", f"Item {i}: pick {c}.\nAnswer:", c, "Which colour?\n")
                                   for i, c in enumerate(["red", "blue"] * 4)]})]


def build(family=tiny_llama, memory_fraction=0.25, **options):
    cls, opts = resolve("sapt", options)
    config = parse_options(cls.config_class, opts)
    set_seed(0)
    backbone = family(cls.peft_config(config, BackboneConfig(model="tiny", family=FAMILY[family])))
    run = RunConfig(tasks=["first", "second", "third"], batch_size=4, memory_fraction=memory_fraction)
    return backbone, cls(config, backbone, run)


def fake_sampler(monkeypatch, method, texts=None):
    """Replace ``sample_text``: record each call and the adapter alone in the pass, run the real sampler, and
    return ``texts`` (default: well-formed texts made of the real samples)."""
    real, calls = method.backbone.sample_text, []

    def sample(sources, max_new_tokens, **kw):
        calls.append({"sources": list(sources), "generator": method._generator, **kw})
        out = real(sources, max_new_tokens, **kw)
        return list(texts) if texts is not None else [f"Say it {i} __inp__ {s or 'x'} {i}" for i, s in enumerate(out)]

    monkeypatch.setattr(method.backbone, "sample_text", sample)
    return calls


def to_stage_one(monkeypatch, family=tiny_llama, texts=None):
    """Stage 0 recorded, stage 1 prepared (its pseudo-prompts from a recording sampler)."""
    backbone, method = build(family)
    method.before_task(0, TASKS[:1], TASKS[0].split("train"))
    method.after_task(0, TASKS[:1], TASKS[0].split("train"))
    calls = fake_sampler(monkeypatch, method, texts)
    method.before_task(1, TASKS[1:], TASKS[1].split("train"))
    return backbone, method, calls


# -- selection ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_attention_weights_sum_to_one_over_the_tasks_learned(monkeypatch, family):
    backbone, method, _ = to_stage_one(monkeypatch, family)
    assert method.adapters == ["default", "task_1"] and method.generators == ["generator_0", "generator_1"]
    assert len(method.selection.keys) == 2
    backbone(**backbone.collate(EXAMPLES[:4]))
    w = method.weights
    assert w.shape == (4, 2) and (w > 0).all() and torch.allclose(w.sum(-1), torch.ones(4))
    expected = torch.softmax(method.selection.logits(method.pooled_prompts(EXAMPLES[:4])), -1)
    assert torch.allclose(w, expected)                          # the hook pools the prompt as pooled_prompts does
    assert not torch.allclose(w[0], w[1])                       # another input, another mixture


def test_the_query_mlp_is_the_official_stack_and_pools_by_maximum():
    _, method = build()
    layers = [type(m).__name__ for m in method.selection.query]
    assert layers == ["Linear", "Linear", "SiLU", "LayerNorm"]
    assert method.selection.query[0].weight.shape == (100, 16) and method.selection.query[0].bias is None
    x = torch.tensor([[[1.0, -5.0], [3.0, -4.0], [100.0, 100.0]]])
    assert torch.equal(masked_max(x, torch.tensor([[True, True, False]])), torch.tensor([[3.0, -4.0]]))
    assert torch.equal(masked_max(x, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


def test_each_layer_outputs_the_attention_weighted_sum_of_task_loras_and_no_generator(monkeypatch):
    backbone, method, _ = to_stage_one(monkeypatch)
    nonzero_adapters(backbone)
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:                                   # frozen ones too: every adapter contributes
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    backbone.eval()
    name, layer = next(method.lora_layers())
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    batch = backbone.collate(EXAMPLES[:3])

    def lora(adapter, x):
        return layer.scaling[adapter] * x @ layer.lora_A[adapter].weight.T @ layer.lora_B[adapter].weight.T

    with torch.no_grad():
        backbone(**batch)
        x, w = seen["x"], method.weights
        expected = layer.base_layer(x) + sum(w[:, t, None, None] * lora(a, x) for t, a in enumerate(method.adapters))
        assert torch.allclose(seen["y"], expected, atol=1e-5)
        with method.generating("generator_0"):                 # a generator pass: that generator alone
            backbone(**batch)
        assert torch.allclose(seen["y"], layer.base_layer(seen["x"]) + lora("generator_0", seen["x"]), atol=1e-5)


def test_stage_one_trains_its_lora_key_generator_and_the_shared_mlp_only(monkeypatch):
    backbone, method, _ = to_stage_one(monkeypatch)
    names = set(backbone.trainable_parameters())
    assert {n.split(".")[-2] for n in names if "lora_" in n} == {"task_1", "generator_1"}
    assert {n for n in names if n.startswith("sapt.")} == {
        "sapt.keys.1", "sapt.query.0.weight", "sapt.query.1.weight", "sapt.query.3.weight", "sapt.query.3.bias"}


def test_the_generator_loss_reaches_the_current_generator_only(monkeypatch):
    backbone, method, _ = to_stage_one(monkeypatch)
    nonzero_adapters(backbone)
    method.on_train_begin(None)
    terms = method.extra_loss(backbone, {})
    assert set(terms) == {"sapt_generator", "sapt_kl"}
    terms["sapt_generator"].backward()
    grads = {n: p.grad for n, p in backbone.trainable_parameters().items()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".generator_1." in n)
    assert all(g is None or not g.any() for n, g in grads.items() if ".generator_1." not in n)


# -- attentive reflection -------------------------------------------------------------------------
def test_reflection_kl_is_zero_at_the_recorded_attention_and_positive_elsewhere():
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.5, -0.5]])
    same = torch.softmax(logits, -1)
    assert reflection_kl(logits[:1], same[0]) == 0                             # exactly
    official = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(logits, -1), same[0].expand(2, 3))
    assert torch.allclose(reflection_kl(logits, same[0]), official)
    assert reflection_kl(logits, same[0]) > 0
    recorded = padded([0.7, 0.3], 3)                                           # a key added since: weight 0
    assert torch.equal(recorded, torch.tensor([0.7, 0.3, 0.0]))
    expected = (recorded[:2] * (recorded[:2].log() - torch.log_softmax(logits[:1], -1)[0, :2])).sum()
    assert torch.allclose(reflection_kl(logits[:1], recorded), expected) and expected > 0


def test_the_method_kl_is_zero_when_pseudo_prompts_attend_as_recorded(monkeypatch):
    backbone, method, _ = to_stage_one(monkeypatch, texts=["Say it __inp__ the only pseudo prompt"])
    assert method.pseudo == {0: [["Say it", "the only pseudo prompt"]] * 2}      # two draws of the one text
    method.on_train_begin(None)
    method.extra_loss(backbone, {})                         # pools the pseudo-prompts
    with torch.no_grad():                                   # record the attention they have now
        method.recorded[0] = method.selection(method._pooled[0])[0].tolist()
    assert method.extra_loss(backbone, {})["sapt_kl"] == 0  # exactly
    method.recorded[0] = [1.0]                              # stage 0's own record: all weight on key 0
    kl = method.extra_loss(backbone, {})["sapt_kl"]
    assert kl > 0
    kl.backward()
    assert method.selection.keys[1].grad.abs().sum() > 0 and method.selection.query[1].weight.grad.abs().sum() > 0
    assert method.selection.keys[0].grad is None            # the earlier key is frozen


# -- pseudo-prompts -------------------------------------------------------------------------------
def test_pseudo_prompts_are_the_parsed_generator_samples_never_stored_data(monkeypatch):
    texts = ["Pick one __inp__ Sentence 99: it is grand.", "no marker at all", "Pick __inp__ a __inp__ b",
             "Empty input __inp__  ", "__inp__ Sentence 98: it is grim."]
    backbone, method, calls = to_stage_one(monkeypatch, texts=texts)
    want = max(1, int(0.25 * len(TASKS[0].split("train"))))                   # memory_fraction x n_0 = 2
    assert want == 2 and len(calls) == 1
    call = calls[0]
    assert call["sources"] == [GEN] * want and call["generator"] == "generator_0" and call["top_k"] == 20
    parsed = [list(p) for p in map(parse_pseudo, texts) if p]
    assert parsed == [["Pick one", "Sentence 99: it is grand."], ["", "Sentence 98: it is grim."]]
    assert method.pseudo == {0: parsed[:want]}
    stored = {(ex.instruction.strip(), ex.input.strip()) for t in TASKS for ex in t.split("train")}
    assert not {tuple(p) for p in method.pseudo[0]} & stored
    meta = method.state_dict()[1]
    assert json.loads(json.dumps(meta))["pseudo_prompts"] == {"0": parsed[:want]}


def test_missing_pseudo_prompts_are_drawn_again_up_to_sample_rounds(monkeypatch):
    _, method, calls = to_stage_one(monkeypatch, texts=["nothing usable"])
    assert len(calls) == 3 and method.pseudo == {0: []}
    assert all(c["generator"] == "generator_0" for c in calls)


# -- options and families -------------------------------------------------------------------------
def test_bad_options_are_refused_naming_them():
    with pytest.raises(ValueError, match="sapt option kl_ratio=-1"):
        SAPTConfig(kl_ratio=-1.0)
    with pytest.raises(ValueError, match="sapt option lora_dropout=1.0"):
        SAPTConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="sapt option top_k=5: used only with kl_ratio > 0"):
        SAPTConfig(kl_ratio=0.0, top_k=5)
    assert SAPTConfig().lora_r == 8 and SAPTConfig().kl_ratio == 0.1


def test_refuses_the_encoder_family_before_loading_a_model():
    run = RunConfig(method="sapt", backbone=BackboneConfig(model="minilm", family="encoder"), tasks=["a"])
    with pytest.raises(ValueError, match="sapt cannot run on the encoder family: it needs a causal or seq2seq"):
        run.check()
    with pytest.raises(ValueError, match="sapt cannot run on the encoder family"):
        runner.build_learner(run, [])


def test_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")               # each process would sample its own pseudo-prompts
    run = RunConfig(method="sapt", backbone=BackboneConfig(model="tiny", family="causal"), tasks=["a"])
    with pytest.raises(ValueError, match="sapt runs on one process"):
        run.check()


# -- end to end -----------------------------------------------------------------------------------
def _argv(model_dir, data, out) -> list[str]:
    return ["run", "--model", str(model_dir), "--family", "causal", "--data", str(data), "--tasks", "alpha,beta",
            "--method", "sapt", "--train-size", "all", "--test-size", "all", "--epochs", "1", "--batch-size", "4",
            "--lr", "1e-2", "--max-length", "48", "--memory-fraction", "0.25", "--output", str(out)]


def _wellformed(monkeypatch):
    """Every sampled text, wrapped around the marker: WordPiece decodes ``__inp__`` as ``_ _ inp _ _``."""
    real = CausalBackbone.sample_text
    monkeypatch.setattr(CausalBackbone, "sample_text", lambda self, sources, n, **kw: [
        f"Pick one {s} __inp__ {s} Answer:" for s in real(self, sources, n, **kw)])


@pytest.fixture(scope="module")
def e2e(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sapt")
    data = write_tasks(root / "data", {"alpha": (["yes", "no"], 16, 8), "beta": (["red", "green", "blue"], 16, 9)})
    with pytest.MonkeyPatch.context() as mp:
        _wellformed(mp)
        assert main(_argv(tiny_llama_dir, data, root / "full")) == 0
    return tiny_llama_dir, data, root


def test_a_cli_run_finishes_with_attention_and_reflection_logged(e2e):
    _, _, root = e2e
    full = json.loads((root / "full" / "results.json").read_text())
    assert full["complete"] and all(a is not None for row in full["accuracy"] for a in row)
    diag = full["diagnostics"]
    assert diag["adapters"] == ["default", "task_1"] and diag["generators"] == ["generator_0", "generator_1"]
    first, second = diag["stages"]
    assert first["mean_attention"] == [1.0] and first["pseudo_prompts"] == {} and "mean_sapt_kl" not in first
    assert first["mean_sapt_generator"] > 0 and "mean_sapt_generator" not in second   # the last one is never sampled
    assert len(second["mean_attention"]) == 2 and sum(second["mean_attention"]) == pytest.approx(1, abs=1e-3)
    assert second["pseudo_prompts"] == {"alpha": 4}                           # 0.25 x 16 training examples
    assert second["mean_sapt_kl"] > 0
    meta = json.loads((root / "full" / "checkpoints" / "stage_1" / "method.json").read_text())
    assert len(meta["pseudo_prompts"]["0"]) == 4 and meta["recorded"][0] == [1.0]


def test_earlier_stages_stay_bit_identical_after_a_later_one(e2e):
    _, _, root = e2e
    before = load_file(root / "full" / "checkpoints" / "stage_0" / "adapter.safetensors")
    after = load_file(root / "full" / "checkpoints" / "stage_1" / "adapter.safetensors")
    old = [n for n in before if ".default." in n or ".generator_0." in n or n == "sapt.keys.0"]
    assert len(old) == 9 and all(torch.equal(before[n], after[n]) for n in old)   # (q, v) x 2 adapters x (A, B) + key 0
    changed = [n for n in after if n not in before or not torch.equal(before[n], after[n])]
    assert {n for n in changed if n.startswith("sapt.")} >= {"sapt.keys.1", "sapt.query.0.weight"}
    assert any(".task_1." in n for n in changed) and any(".generator_1." in n for n in changed)


def test_resume_gives_the_same_run(e2e, monkeypatch):
    model_dir, data, root = e2e
    _wellformed(monkeypatch)
    make = lambda **kw: replace(config_from_args(parse_args(build_parser(), _argv(model_dir, data, root / "cut"))),  # noqa: E731
                                **kw)
    _, resumed = cut_and_resume(monkeypatch, make, 1)
    full = json.loads((root / "full" / "results.json").read_text())
    assert resumed["accuracy"] == full["accuracy"] and resumed["diagnostics"] == full["diagnostics"]
    saved = load_file(root / "full" / "checkpoints" / "stage_1" / "adapter.safetensors")
    again = load_file(root / "cut" / "checkpoints" / "stage_1" / "adapter.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[n], saved[n]) for n in saved)
