"""``Backbone.text_batch`` and ``sample_text``: the free-text stream generative-replay methods train and
sample (LFPT5's input generator, SAPT's generator adapter), on the tiny LLaMA and T5."""

import pytest
import torch

from tests.test_backbones import minilm, tiny_llama, tiny_t5

SOURCES = ["__gen__ alpha", "__gen__ a longer task name here"]
TARGETS = ["pick one of yes or no sample 3 answer yes", "short"]


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_text_batch_trains_on_the_target_tokens_only(family):
    backbone = family()
    batch = backbone.text_batch(SOURCES, TARGETS, max_target_tokens=64)
    eos = backbone.tokenizer.eos_token_id
    for row, target in zip(batch["labels"], TARGETS):
        kept = row[row != -100].tolist()
        assert kept[-1] == eos                                       # the target ends with EOS
        assert backbone.tokenizer.decode(kept[:-1], skip_special_tokens=True).strip() == target
    loss = backbone(**batch)["loss"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.trainable_parameters().values())


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_text_batch_cuts_the_target(family):
    backbone = family()
    batch = backbone.text_batch(SOURCES[:1], [" ".join(["word"] * 50)], max_target_tokens=5)
    assert (batch["labels"][0] != -100).sum() <= 6                  # 5 tokens + EOS


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_sample_text_is_seeded_and_counts_sequences(family):
    backbone = family()
    backbone.train()
    torch.manual_seed(3)
    first = backbone.sample_text(SOURCES, max_new_tokens=6, num_return_sequences=3, top_k=50)
    torch.manual_seed(3)
    again = backbone.sample_text(SOURCES, max_new_tokens=6, num_return_sequences=3, top_k=50)
    assert len(first) == 6 and first == again
    assert all(isinstance(s, str) for s in first)
    assert backbone.training                                         # the mode is restored
    assert len(set(first)) > 1                                       # sampling, not greedy: the draws differ


def test_free_text_needs_a_generative_family():
    backbone = minilm()
    with pytest.raises(ValueError, match="encoder family cannot generate text"):
        backbone.text_batch(["a"], ["b"], 4)
    with pytest.raises(ValueError, match="encoder family cannot generate text"):
        backbone.sample_text(["a"], 4)


def test_causal_source_must_not_be_empty():
    with pytest.raises(ValueError, match="must not be empty"):
        tiny_llama().text_batch([""], ["x"], 4)


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_repetition_penalty_spares_the_source_in_every_family(family):
    """A repeated *generated* token is penalised, a token of the source is not: a decoder-only model reads its
    source in ``input_ids``, where ``generate`` would penalise it too (an encoder-decoder never does)."""
    backbone = family()
    head = backbone.model.get_base_model().lm_head
    alpha, beta = backbone.tokenizer.convert_tokens_to_ids(["alpha", "beta"])
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():                                 # logits: 10 for alpha (in the source), 5 for beta
        biased.weight.zero_()
        biased.bias.zero_()
        biased.bias[alpha], biased.bias[beta] = 10.0, 5.0
    backbone.model.get_base_model().lm_head = biased
    assert backbone.sample_text(["__gen__ alpha"], 2, top_k=1) == ["alpha alpha"]
    assert backbone.sample_text(["__gen__ alpha"], 2, top_k=1, repetition_penalty=100.0) == ["alpha beta"]


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_prompt_text_is_the_prompt_as_the_model_reads_it(family):
    from rkif.data import Example

    backbone = family()
    short = Example("t", "one two three\nAnswer:", "yes", "Pick yes or no.\n")
    long = Example("t", " ".join(f"word{i}" for i in range(200)) + "\nAnswer:", "yes", "Pick yes or no.\n")
    tok = backbone.tokenizer
    assert tok.decode(tok(backbone.prompt_text(short), add_special_tokens=False)["input_ids"]) == tok.decode(
        tok(short.prompt, add_special_tokens=False)["input_ids"])                      # nothing cut
    cut = backbone.prompt_text(long)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= backbone.config.max_length < len(
        tok(long.prompt, add_special_tokens=False)["input_ids"])
    if family is tiny_llama:                            # the causal cut keeps the instruction and the "Answer:" cue
        assert cut.lower().startswith("pick yes or no") and cut.lower().rstrip().endswith("answer :")
