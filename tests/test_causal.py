"""The causal backbone: prompt formats, truncation, bounded generation, length-sorted batches, rank classification."""

import pytest
import torch
from transformers import LlamaForCausalLM

from rkif.backbones import BackboneConfig, CausalBackbone
from rkif.backbones.causal import TAIL_TOKENS
from rkif.data import Example, Task
from tests.test_backbones import tiny_llama

LABELS = ["good", "bad", "very much so"]
EXAMPLES = [Example("t", "word " * (i * 3) + f"Sentence {i}.\nAnswer:", LABELS[i % 3], "Good, bad or very much so?\n")
            for i in range(7)]
OTHER = Task("u", {"train": [Example("u", "x", "maybe")]})
TASK = Task("t", {"train": EXAMPLES})
CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def build(**overrides) -> CausalBackbone:
    """The tiny LLaMA of test_backbones, with a chat template and ``overrides`` of its BackboneConfig."""
    reference = tiny_llama()
    tok = reference.tokenizer
    tok.chat_template = CHAT
    cfg = BackboneConfig(**{**vars(reference.config), "max_length": 64, **overrides})
    torch.manual_seed(0)
    backbone = CausalBackbone(cfg, model=LlamaForCausalLM(reference.model.get_base_model().config), tokenizer=tok)
    backbone.set_answer_space([TASK, OTHER])
    return backbone


def test_generation_stops_after_the_longest_answer_of_the_run(monkeypatch):
    backbone = build()
    longest = max(len(backbone.tokenizer(" " + label, add_special_tokens=False)["input_ids"])
                  for label in LABELS + ["maybe"])
    assert backbone.answer_limit == min(longest, backbone.config.max_target_length) + 1     # + EOS
    new_tokens = []
    real = backbone.model.generate

    def generate(**kw):
        out = real(**kw)
        new_tokens.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(backbone.model, "generate", generate)
    backbone.predict(EXAMPLES)
    assert new_tokens and set(new_tokens) == {backbone.answer_limit}    # the untrained model never says EOS


def test_batched_left_padded_generation_equals_one_example_at_a_time():
    backbone = build()
    backbone.config.eval_batch_size = 7
    batched = backbone.predict(EXAMPLES)
    backbone.config.eval_batch_size = 1
    assert backbone.predict(EXAMPLES) == batched


def test_collate_builds_cpu_tensors_for_the_dataloader():
    batch = build().collate(EXAMPLES[:3])                 # pinned and moved by the Trainer's DataLoader
    assert all(t.device.type == "cpu" for t in batch.values())


def test_length_sorted_batches_answer_in_the_callers_order(monkeypatch):
    backbone = build()
    backbone.config.eval_batch_size = 3
    batches = []

    def echo(examples):
        batches.append([backbone.prompt_length(ex) for ex in examples])
        return [ex.output for ex in examples]

    monkeypatch.setattr(backbone, "predict_batch", echo)
    shuffled = [EXAMPLES[i] for i in (4, 0, 6, 2, 5, 1, 3)]
    assert backbone.predict(shuffled) == [ex.output for ex in shuffled]
    flat = [n for batch in batches for n in batch]
    assert flat == sorted(flat) and [len(b) for b in batches] == [3, 3, 1]


def test_a_long_prompt_keeps_its_instruction_and_its_end():
    backbone = build()
    ex = Example("t", "filler " * 200 + "the very end.\nAnswer:", "good", "Good or bad?\n")
    ids = backbone.prompt_ids(ex)
    enc = lambda text: backbone.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(ids) == backbone.config.max_length
    assert ids[:len(enc(ex.instruction))] == enc(ex.instruction)
    assert ids[-TAIL_TOKENS:] == enc(ex.input)[-TAIL_TOKENS:]
    short = backbone.prompt_ids(EXAMPLES[0])
    assert short == enc(EXAMPLES[0].instruction) + enc(EXAMPLES[0].input)            # untouched when it fits


def test_max_length_too_small_for_the_instruction_is_refused_only_when_the_input_must_be_cut():
    backbone = build()
    backbone.config.max_length = 16
    assert len(backbone.prompt_ids(Example("t", "short", "good", "a long instruction " * 2))) <= 16
    with pytest.raises(ValueError, match="--max-length 16"):
        backbone.prompt_ids(Example("t", "a much longer input " * 4, "good", "a long instruction " * 2))


def test_chat_format_wraps_the_prompt_and_answers_without_a_leading_space():
    backbone = build(prompt_format="chat")
    enc = lambda text: backbone.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ex = EXAMPLES[1]
    ids = backbone.prompt_ids(ex)
    assert ids[:len(enc("<user>"))] == enc("<user>")
    assert ids[-len(enc("</user><assistant>")):] == enc("</user><assistant>")
    assert backbone.answer_ids("good") == enc("good") + [backbone.tokenizer.eos_token_id]
    raw = build()
    assert raw.answer_ids("good") == enc(" good") + [raw.tokenizer.eos_token_id]


def test_chat_format_needs_a_chat_template():
    reference = tiny_llama()
    reference.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        CausalBackbone(BackboneConfig(model="tiny", family="causal", prompt_format="chat"),
                       model=LlamaForCausalLM(reference.model.get_base_model().config), tokenizer=reference.tokenizer)


def brute_force_log_likelihood(backbone, prompt, answer):
    ids = torch.tensor([prompt + answer])
    logp = torch.log_softmax(backbone.model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(answer))


def test_rank_log_likelihoods_from_the_prompt_cache_match_one_sequence_at_a_time():
    backbone = build(answer_mode="rank").eval()
    prompts = [backbone.prompt_ids(ex) for ex in EXAMPLES[:4]]                  # different lengths: left padding
    answers = [backbone.answer_ids(label) for label in ("good", "very much so", "bad", "maybe")]
    with torch.no_grad():
        cached = backbone.candidate_log_likelihoods(prompts, answers)              # every answer after every prompt
        every = [[brute_force_log_likelihood(backbone, p, a) for a in answers] for p in prompts]
    assert cached.tolist() == [pytest.approx(row, abs=1e-4) for row in every]


def test_rank_mode_answers_the_most_likely_candidate_of_its_answer_space():
    backbone = build(answer_mode="rank").eval()
    with torch.no_grad():
        expected = []
        for ex in EXAMPLES:
            scores = {c: brute_force_log_likelihood(backbone, backbone.prompt_ids(ex), backbone.answer_ids(c))
                      for c in backbone.candidates}
            expected.append(max(scores, key=scores.get))
    assert backbone.predict(EXAMPLES) == expected


def test_rank_mode_with_the_task_answer_space_never_answers_another_tasks_label(monkeypatch):
    backbone = build(answer_mode="rank").eval()
    maybe = backbone.candidates.index("maybe")
    real = backbone.candidate_log_likelihoods

    def prefer_maybe(prompts, answers):                # the other task's label scores highest everywhere
        scores = real(prompts, answers)
        scores[:, maybe] = scores.max() + 1.0
        return scores

    monkeypatch.setattr(backbone, "candidate_log_likelihoods", prefer_maybe)
    assert set(backbone.predict(EXAMPLES)) == {"maybe"}
    backbone.config.answer_space = "task"
    answers = backbone.predict(EXAMPLES)
    assert "maybe" not in answers and set(answers) <= set(LABELS)


def test_rank_mode_splits_many_examples_into_bounded_prompt_passes(monkeypatch):
    from rkif.backbones import causal

    backbone = build(answer_mode="rank").eval()
    monkeypatch.setattr(causal, "RANK_ROWS", 2 * len(backbone.candidates))          # 2 examples per pass
    sizes = []
    real = backbone.candidate_log_likelihoods
    monkeypatch.setattr(backbone, "candidate_log_likelihoods",
                        lambda prompts, answers: sizes.append(len(prompts)) or real(prompts, answers))
    with torch.no_grad():
        expected = build(answer_mode="rank").eval().predict(EXAMPLES)
    assert backbone.predict(EXAMPLES) == expected and sizes == [2, 2, 2, 1]


def test_unknown_prompt_format_or_answer_mode_is_refused():
    with pytest.raises(ValueError, match="--prompt-format"):
        build(prompt_format="fancy")
    with pytest.raises(ValueError, match="--answer-mode"):
        build(answer_mode="vote")
