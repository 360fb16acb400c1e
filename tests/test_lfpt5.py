"""LFPT5 (BASELINES.md section 10): the generator stream's format, pseudo-samples parsed from the model's samples
(never from stored data), KL zero for equal prompts and positive otherwise, only the prompt trains, end to end
through the CLI and with resume, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import set_seed

from rkif import runner
from rkif.backbones import BackboneConfig, CausalBackbone
from rkif.cli import main
from rkif.config import RunConfig
from rkif.data import Example, Task
from rkif.methods import parse_options, resolve
from rkif.methods.lfpt5 import answer_kl, answer_logits, cue, frequent_ids, lm_target, parse_pseudo
from tests.conftest import cut_and_resume
from tests.test_backbones import EXAMPLES, tiny_llama, tiny_t5

FAMILY = {tiny_llama: "causal", tiny_t5: "seq2seq"}
TINY = {"prompt_length": 4, "max_gen_tokens": 12}


def build(family=tiny_llama, batch_size: int = 4, seed: int = 42, **options):
    """A tiny backbone with lfpt5 attached, as the runner builds it (peft config, then the method)."""
    cls, opts = resolve("lfpt5", {**TINY, **options})
    config = parse_options(cls.config_class, opts)
    peft = cls.peft_config(config, BackboneConfig(model="tiny", family=FAMILY[family]))
    set_seed(0)
    backbone = family(peft)
    return backbone, cls(config, backbone, RunConfig(tasks=["a", "b"], batch_size=batch_size, seed=seed))


def task(name: str, labels: list[str], n: int = 6, free_text: bool = False) -> Task:
    examples = [Example(name, f"Sample {i} of {name}: it is {labels[i % len(labels)]}.\nAnswer:",
                        labels[i % len(labels)], f"Pick one of: {', '.join(labels)}.\n") for i in range(n)]
    return Task(name, {"train": examples}, free_text=free_text)


ALPHA, BETA = task("alpha", ["yes", "no"]), task("beta", ["red", "green", "blue"])


def test_the_generator_stream_learns_the_whole_prompt_the_separator_and_the_answer_after_the_task_cue():
    ex = ALPHA.split("train")[0]
    assert cue("alpha") == "__gen__ alpha"
    assert lm_target(ex.prompt, ex.output) == ex.instruction + ex.input + " __ans__ " + ex.output
    backbone, method = build(batch_size=3)
    seen = []
    real = backbone.text_batch
    backbone.text_batch = lambda sources, targets, n: seen.append((sources, targets, n)) or real(sources, targets, n)
    pseudo = Example("beta", "Pick one colour. Made up.\nAnswer:", "red")
    method.before_task(0, [ALPHA], ALPHA.split("train"))
    method.stream = ALPHA.split("train") + [pseudo]
    torch.manual_seed(0)
    terms = method.extra_loss(backbone, {})
    (sources, targets, n), = seen
    assert len(sources) == 3 and n == 12
    stream = {lm_target(backbone.prompt_text(e), e.output): cue(e.task) for e in method.stream}
    assert all(stream[target] == source for source, target in zip(sources, targets))   # each row with its own cue
    by_hand = 0.25 * backbone(**real(sources, targets, n))["loss"]
    assert torch.allclose(terms["lfpt5_lm"], by_hand)
    method.stream = [pseudo]
    method.extra_loss(backbone, {})
    assert seen[-1][0] == ["__gen__ beta"] * 3 and seen[-1][1] == [f"{backbone.prompt_text(pseudo)} __ans__ red"] * 3
    with torch.no_grad():                                   # the stream reads the soft prompt
        method.prompt.weight.add_(torch.randn(method.prompt.weight.shape, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(backbone(**real(sources, targets, n))["loss"], by_hand / 0.25)
    assert "lfpt5_kl" not in terms                          # no distillation before the second task


def stream_targets(global_seed: int) -> list[list[str]]:
    """The LM targets of two steps of stage 0, with torch's global generator at ``global_seed``."""
    backbone, method = build()
    method.before_task(0, [ALPHA], ALPHA.split("train"))
    real, rows = backbone.text_batch, []
    backbone.text_batch = lambda sources, targets, n: rows.append(targets) or real(sources, targets, n)
    torch.manual_seed(global_seed)
    method.extra_loss(backbone, {})
    method.extra_loss(backbone, {})
    return rows


def test_stream_rows_are_a_seeded_draw_per_stage():
    first = stream_targets(0)
    assert stream_targets(1) == first and first[0] != first[1]       # torch's global generator is not read


@pytest.mark.parametrize("text, parsed", [
    ("Is it red? Answer: __ans__ red", ("Is it red? Answer:", "red")),
    ("  a prompt __ans__  two words ", ("a prompt", "two words")),
    ("no separator", None),
    (" __ans__ red", None),                                 # empty prompt
    ("a prompt __ans__   ", None),                          # empty answer
    ("a __ans__ b __ans__ c", None),                        # two separators
])
def test_parse_pseudo(text, parsed):
    ex = parse_pseudo(text, "beta")
    assert (None if ex is None else (ex.task, ex.input, ex.output, ex.instruction)) == (
        None if parsed is None else ("beta", *parsed, ""))


PATTERNS = ["made up {k} __ans__ yes", "no separator {k}", "made up {k} __ans__ maybe", "made up {k} __ans__ ",
            "{k} __ans__ no __ans__ yes", " __ans__ no", "made up {k} __ans__ no"]


def fake_sampler(calls: list, drawn: list):
    """Stands in for ``Backbone.sample_text``: numbered strings in a fixed pattern; records its calls and the
    first number torch's global generator gives inside each call (to check the seeding)."""
    def sample_text(sources, max_new_tokens, num_return_sequences=1, **sampling):
        calls.append({"sources": list(sources), "max_new_tokens": max_new_tokens, "n": num_return_sequences,
                      "sampling": sampling, "rng": torch.randint(10 ** 9, (1,)).item()})
        out = []
        for _ in sources:
            out.append(PATTERNS[len(drawn) % len(PATTERNS)].format(k=len(drawn)))
            drawn.append(out[-1])
        return out
    return sample_text


def test_pseudo_samples_are_the_parsed_samples_of_the_model_and_no_stored_example_is_replayed():
    backbone, method = build(oversample=1, sample_rounds=3, seed=7)
    calls, drawn = [], []
    backbone.sample_text = fake_sampler(calls, drawn)
    method.before_task(0, [ALPHA], ALPHA.split("train"))
    method.after_task(0, [ALPHA], ALPHA.split("train"))
    assert method.finished == [{"name": "alpha", "labels": ["no", "yes"], "free_text": False}]
    rng = torch.get_rng_state()
    data = method.before_task(1, [BETA], BETA.split("train"))
    assert torch.equal(torch.get_rng_state(), rng)          # sampling forks torch's generator
    # round 1 wants 2 per class (4): keeps "made up 0"/yes; round 2 (3 missing): "made up 6"/no; round 3 (2): "7"/yes
    expected = [Example("alpha", "made up 0", "yes"), Example("alpha", "made up 6", "no"),
                Example("alpha", "made up 7", "yes")]
    assert data[:len(BETA.split("train"))] == BETA.split("train") and data[len(BETA.split("train")):] == expected
    assert method.pseudo == expected and method.stream == data
    assert not set(data) & set(ALPHA.split("train"))        # nothing stored from alpha is replayed
    assert [len(c["sources"]) for c in calls] == [4, 3, 2] and len(drawn) == 9
    assert all(c["sources"] == ["__gen__ alpha"] * len(c["sources"]) and c["n"] == 1 for c in calls)
    assert all(c["max_new_tokens"] == 12 and c["sampling"] == {"top_k": 64, "repetition_penalty": 2.5} for c in calls)
    torch.manual_seed(7 + 1)                                # seeded with run.seed + stage
    assert calls[0]["rng"] == torch.randint(10 ** 9, (1,)).item()
    assert method.diagnostics() == {"pseudo_samples": [        # why the other six were rejected, and examples
        {"stage": 1, "tasks": {"alpha": {"kept": 3, "wanted": 4, "drawn": 9, "malformed": 5, "off_label": 1,
                                         "rejected": ["no separator 1", "made up 2 __ans__ maybe",
                                                      "made up 3 __ans__ "]}}}]}
    assert torch.equal(method.previous, method.prompt.weight.detach())   # P_prev: the prompt before stage 1


def test_free_text_tasks_keep_any_well_formed_answer_up_to_pseudo_per_task():
    backbone, method = build(oversample=2, pseudo_per_task=3)
    calls, drawn = [], []
    backbone.sample_text = fake_sampler(calls, drawn)
    free = task("summary", ["a long answer", "another one"], free_text=True)
    method.after_task(0, [free], free.split("train"))
    assert method.finished == [{"name": "summary", "labels": [], "free_text": True}]
    method.before_task(1, [BETA], BETA.split("train"))
    # round 1 draws 6: keeps 0/yes and 2/maybe; round 2 draws 2 for the 1 missing: keeps 6/no
    assert [(e.input, e.output) for e in method.pseudo] == [("made up 0", "yes"), ("made up 2", "maybe"),
                                                            ("made up 6", "no")]
    assert [len(c["sources"]) for c in calls] == [6, 2]


def test_answer_logits_predict_the_answer_tokens_and_answer_kl_is_the_official_sum():
    for family in (tiny_llama, tiny_t5):
        backbone, _ = build(family)
        backbone.eval()
        batch = backbone.collate(EXAMPLES[:3])
        with torch.no_grad():
            logits = answer_logits(backbone, batch)
            loss = backbone(**batch)["loss"]
        answers = batch["labels"][batch["labels"] != -100]
        if family is tiny_llama:
            answers = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
        assert torch.allclose(torch.nn.functional.cross_entropy(logits, answers), loss, atol=1e-6)
    current, previous = torch.randn(5, 7), torch.randn(5, 7)
    p, q = torch.softmax(previous, -1), torch.softmax(current, -1)
    assert answer_kl(current, previous).item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)
    assert answer_kl(current, current).item() == 0


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_kl_is_zero_for_equal_prompts_positive_otherwise_and_only_the_prompt_gets_gradient(family):
    backbone, method = build(family)
    backbone.train()                                        # T5's dropout is on in training: KL runs without it
    assert sorted(backbone.trainable_parameters()) == ["soft_prompt.weight"]
    rows = ALPHA.split("train")[:3]
    method.previous = method.prompt.weight.detach().clone()
    assert method.distillation(rows).item() == 0
    with torch.no_grad():
        method.previous.add_(torch.randn(method.previous.shape, generator=torch.Generator().manual_seed(0)))
    kl = method.distillation(rows)
    assert kl.item() > 0 and backbone.training
    method.before_task(0, [ALPHA], ALPHA.split("train"))
    method.pseudo = rows
    terms = method.extra_loss(backbone, {})
    assert set(terms) == {"lfpt5_lm", "lfpt5_kl"} and terms["lfpt5_kl"].item() > 0
    (backbone(**backbone.collate(rows))["loss"] + sum(terms.values())).backward()
    assert method.prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in backbone.named_parameters() if n != "soft_prompt.weight")


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_distillation_is_kl_from_the_previous_prompt_to_the_current_one_and_trains_the_current(family):
    backbone, method = build(family)
    rows = ALPHA.split("train")[:3]
    with torch.no_grad():
        method.previous = method.prompt.weight + torch.randn(method.prompt.weight.shape,
                                                             generator=torch.Generator().manual_seed(0))
    kl = method.distillation(rows)
    batch = backbone.collate(rows)
    backbone.eval()
    with torch.no_grad():                                   # by hand: P's logits, then P_prev's in P's place
        current = answer_logits(backbone, batch)
        saved = method.prompt.weight.detach().clone()
        method.prompt.weight.copy_(method.previous)
        previous = answer_logits(backbone, batch)
        method.prompt.weight.copy_(saved)
    assert kl.item() > 0 and torch.allclose(kl, answer_kl(current, previous), rtol=1e-6, atol=0)   # KL(P_prev||P)
    assert not torch.allclose(kl, answer_kl(previous, current), rtol=1e-6, atol=0)
    kl.backward()                                           # the student pass is P's, the teacher's has no grad
    assert method.prompt.weight.grad.abs().sum() > 0


def test_the_distillation_passes_compute_no_logits_for_the_prefix():
    backbone, method = build(prompt_length=6)
    widths = []
    backbone.model.get_base_model().lm_head.register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    rows = ALPHA.split("train")[:3]
    method.previous = method.prompt.weight.detach() + 1
    method.distillation(rows)
    assert widths == [backbone.collate(rows)["labels"].shape[1]] * 2      # teacher and student: T columns, not 6 + T


def test_the_prompt_starts_from_frequent_tokens_then_the_first_task_name_and_labels():
    backbone, method = build(init_vocab=50, seed=3)
    embedding = backbone.model.get_base_model().get_input_embeddings().weight.detach()
    frequent = embedding[frequent_ids(backbone.tokenizer, embedding.shape[0], 50)]
    start = method.prompt.weight.detach().clone()
    assert all((frequent == row).all(-1).any() for row in start)          # each row: one of the 50 tokens
    assert len({tuple(r.tolist()) for r in start}) == 4                    # drawn without replacement
    assert torch.equal(build(init_vocab=50, seed=3)[1].prompt.weight, start)   # seeded by run.seed
    assert not torch.equal(build(init_vocab=50, seed=4)[1].prompt.weight, start)
    method.before_task(0, [ALPHA], ALPHA.split("train"))
    for row, text in zip(method.prompt.weight.detach(), ["alpha", "no", "yes"]):
        ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert torch.allclose(row, embedding[ids].mean(0))
    assert torch.equal(method.prompt.weight[3], start[3])


def test_state_round_trips_through_json_and_safetensors():
    backbone, method = build(oversample=1)
    backbone.sample_text = fake_sampler([], [])
    method.after_task(0, [ALPHA], ALPHA.split("train"))
    method.before_task(1, [BETA], BETA.split("train"))
    tensors, meta = method.state_dict()
    _, fresh = build(oversample=1)
    fresh.load_state_dict({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    assert torch.equal(fresh.previous, method.previous) and fresh.pseudo == method.pseudo
    assert fresh.finished == method.finished and fresh.diagnostics() == method.diagnostics()


def test_settings_are_refused_before_a_model_loads(monkeypatch):
    with pytest.raises(ValueError, match="method lfpt5 cannot run on the encoder family: it needs a causal or "
                                         "seq2seq backbone"):
        RunConfig(method="lfpt5").check()                  # the default backbone: MiniLM, an encoder
    causal = BackboneConfig(model="tiny", family="causal")
    with pytest.raises(ValueError, match="lfpt5 option prompt_length=0: expected an integer >= 1"):
        RunConfig(method="lfpt5", backbone=causal, method_options={"prompt_length": "0"}).check()
    with pytest.raises(ValueError, match="lfpt5 option kl_weight=-1.0: expected a number >= 0"):
        RunConfig(method="lfpt5", backbone=causal, method_options={"kl_weight": "-1"}).check()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="lfpt5 runs on one process"):
        RunConfig(method="lfpt5", backbone=causal).check()


# -- end to end -------------------------------------------------------------------------------------------------

def test_two_tasks_through_the_cli(tiny_llama_dir, tiny_data, tmp_path):
    out = tmp_path / "cli"
    code = main(["run", "--model", str(tiny_llama_dir), "--family", "causal", "--data", str(tiny_data),
                 "--tasks", "alpha,beta", "--method", "lfpt5", "-O", "prompt_length=4", "-O", "max_gen_tokens=12",
                 "-O", "oversample=2", "--train-size", "all", "--test-size", "all", "--max-length", "48",
                 "--batch-size", "4", "--lr", "0.03", "--output", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and all(a is not None for row in results["accuracy"] for a in row)
    (log,) = results["diagnostics"]["pseudo_samples"]
    assert log["stage"] == 1 and log["tasks"]["alpha"]["drawn"] >= 2 * 2 * 2     # the model was sampled
    assert sorted(load_file(out / "checkpoints" / "stage_1" / "adapter.safetensors")) == ["soft_prompt.weight"]
    assert sorted(load_file(out / "checkpoints" / "stage_1" / "method.safetensors")) == ["previous_prompt"]


def _stand_in_sampler(self, sources, max_new_tokens, num_return_sequences=1, **sampling):
    """Well-formed alpha samples chosen by torch's generator (the tiny WordPiece model never writes ``__ans__``)."""
    picks = torch.randint(3, (len(sources),)).tolist()
    return [f"Pick one of: yes, no.\nSample {p} made up: it is x.\nAnswer: __ans__ {['yes', 'no', 'maybe'][p]}"
            for p in picks]


def _config(model_dir, data, out, **kw) -> RunConfig:
    return RunConfig(method="lfpt5", method_options={**TINY, "oversample": 2},
                     backbone=BackboneConfig(model=str(model_dir), family="causal", max_length=48),
                     data=str(data), tasks=["alpha", "beta"], train_size=None, test_size=None, epochs=1.0,
                     batch_size=4, lr=0.03, lr_scheduler="constant", output=str(out), **kw)


def test_resume_after_the_first_task_gives_the_same_run(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(CausalBackbone, "sample_text", _stand_in_sampler)
    full = runner.run_experiment(_config(tiny_llama_dir, tiny_data, tmp_path / "full"))
    assert full["diagnostics"]["pseudo_samples"][0]["tasks"]["alpha"]["kept"] == 4
    logged = [json.loads(line) for line in (tmp_path / "full" / "trainer" / "log.jsonl").read_text().splitlines()]
    assert any("lfpt5_kl" in entry for entry in logged)     # the second stage distilled
    saved = load_file(tmp_path / "full" / "checkpoints" / "stage_1" / "adapter.safetensors")

    _, resumed = cut_and_resume(monkeypatch, lambda **kw: _config(tiny_llama_dir, tiny_data, tmp_path / "cut", **kw), 1)
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["diagnostics"] == full["diagnostics"]
    again = load_file(tmp_path / "cut" / "checkpoints" / "stage_1" / "adapter.safetensors")
    assert torch.equal(again["soft_prompt.weight"], saved["soft_prompt.weight"])
