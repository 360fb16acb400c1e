"""``Backbone.add_input_hook`` (what MoELoRA routes on and L2P prefixes through), on the tiny LLaMA and T5.

Generation with a key/value cache must match teacher forcing: the same prompt, the same prefix and gate,
the same positions; and the prompt a hook sees in training equals the one it sees at generation.
"""

import pytest
import torch
from transformers import set_seed

from rkif.backbones import BackboneConfig
from rkif.backbones.base import masked_mean
from rkif.config import RunConfig
from rkif.data import Example
from rkif.methods import parse_options, resolve
from tests.test_backbones import EXAMPLES, minilm, tiny_llama, tiny_t5

# two prompts of different lengths, so that both padding layouts (right in training, left in generation) occur
PAIR = [EXAMPLES[0],
        Example("t", "Sentence 12: it is really quite good, honestly.\nAnswer:", "good", "Is it good or bad?\n")]
FAMILY = {tiny_llama: "causal", tiny_t5: "seq2seq"}
OPTIONS = {"moelora": {"experts": 3}, "l2p": {"pool_size": 4, "prompt_length": 2, "top_n": 2}}


def build(method: str, family_builder, **options):
    """A tiny backbone with ``method`` attached, as the runner builds it (peft config, then the method)."""
    cls, opts = resolve(method, {**OPTIONS[method], **options})
    config = parse_options(cls.config_class, opts)
    peft = cls.peft_config(config, BackboneConfig(model="tiny", family=FAMILY[family_builder]))
    set_seed(0)
    backbone = family_builder(peft)
    return backbone, cls(config, backbone, RunConfig(tasks=["a", "b"]))


def nonzero_adapters(backbone, seed: int = 1) -> None:
    """Random non-zero LoRA B weights (peft starts them at 0, where every expert's output is 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_masked_mean_ignores_masked_positions():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(masked_mean(x, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(masked_mean(x, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_the_hook_sees_the_same_prompt_in_training_and_generation(family):
    backbone = family()
    seen = []
    backbone.add_input_hook(lambda embeds, mask: seen.append(masked_mean(embeds, mask)))
    backbone.eval()
    backbone.length_sorted_prediction = False      # rows in the same order in both calls
    examples = PAIR
    with torch.no_grad():
        backbone(**backbone.collate(examples))     # training layout: right padding, answer in the sequence
    backbone.predict(examples)                     # generation: left padding (causal), then decoding steps
    assert len(seen) == 2                          # one call per new batch: decoding steps reuse it
    assert torch.allclose(seen[0], seen[1], atol=1e-6)
    embed = backbone.model.get_base_model().get_input_embeddings()
    if family is tiny_llama:
        prompt = torch.tensor(backbone.prompt_ids(examples[0]))
    else:
        prompt = backbone.tokenize([examples[0].prompt], backbone.config.max_length)["input_ids"][0]
    assert torch.allclose(seen[0][0], embed(prompt).mean(0), atol=1e-6)


def _generated_logits(backbone, examples, steps=3):
    """Greedy generation with a cache: per step logits [B, V] and the generated tokens [B, steps]."""
    if backbone.family == "causal":
        ids, mask = backbone._pad([backbone.prompt_ids(ex) for ex in examples], left=True)
    else:
        src = backbone.tokenize([ex.prompt for ex in examples], backbone.config.max_length)
        ids, mask = src["input_ids"], src["attention_mask"]
    out = backbone.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                  do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True,
                                  pad_token_id=backbone.tokenizer.pad_token_id)
    new = out.sequences[:, -steps:]
    return torch.stack(out.logits, 1), new


def _teacher_forced_logits(backbone, ex, answer: torch.Tensor) -> torch.Tensor:
    """One example alone, no cache: the logits that predict each answer token [steps, V]."""
    steps = len(answer)
    if backbone.family == "causal":
        prompt = torch.tensor([backbone.prompt_ids(ex)])
        ids = torch.cat([prompt, answer[None]], 1)
        labels = torch.cat([torch.full_like(prompt, -100), answer[None]], 1)    # the answer is not the prompt
        logits = backbone.model(input_ids=ids, labels=labels).logits
        return logits[0, -steps - 1:-1]
    src = backbone.tokenize([ex.prompt], backbone.config.max_length)
    start = torch.tensor([[backbone.model.get_base_model().config.decoder_start_token_id]])
    decoder = torch.cat([start, answer[None, :-1]], 1)
    return backbone.model(**src, decoder_input_ids=decoder).logits[0]


@pytest.mark.parametrize("method", ["moelora", "l2p"])
@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_cached_generation_matches_teacher_forcing(method, family):
    backbone, _ = build(method, family)
    nonzero_adapters(backbone)
    backbone.eval()
    examples = PAIR
    with torch.no_grad():
        logits, answers = _generated_logits(backbone, examples)
        for row, ex in enumerate(examples):
            expected = _teacher_forced_logits(backbone, ex, answers[row])
            assert torch.allclose(logits[row], expected, atol=1e-4), (method, family.__name__, row)


def test_encoder_family_has_no_input_hook():
    with pytest.raises(ValueError, match="encoder family"):
        minilm().add_input_hook(lambda e, m: None)


@pytest.mark.parametrize("method", ["moelora", "l2p"])
def test_rank_mode_scores_match_teacher_forcing(method):
    """Rank mode repeats each prompt's cache for the candidates: the hook's gate and prefix follow the rows."""
    backbone, _ = build(method, tiny_llama)
    nonzero_adapters(backbone)
    backbone.eval()
    answers = [backbone.answer_ids(label) for label in ("good", "bad", "maybe so")]
    prompts = [backbone.prompt_ids(ex) for ex in PAIR]
    with torch.no_grad():
        scores = backbone.candidate_log_likelihoods(prompts, answers)          # [2 prompts, 3 answers]
        for i, prompt in enumerate(prompts):
            for j, answer in enumerate(answers):
                ids = torch.tensor([prompt + answer])
                labels = torch.tensor([[-100] * len(prompt) + answer])
                expected = -backbone.model(input_ids=ids, labels=labels).loss * len(answer)
                assert scores[i, j].item() == pytest.approx(expected.item(), abs=1e-4), (i, j)
