"""Each backbone family trains a step and predicts, on a tiny model built offline."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from rkif.backbones import BackboneConfig, CausalBackbone, EncoderBackbone, Seq2SeqBackbone, minilm_path
from rkif.config import RunConfig
from rkif.data import Example, Task
from rkif.methods import resolve
from rkif.methods.base import parse_options
from rkif.training import train_stage

EXAMPLES = [Example("t", f"Sentence {i}: it is {lab}.\nAnswer:", lab, "Is it good or bad?\n")
            for i, lab in enumerate(["good", "bad"] * 4)]


def tokenizer():
    tok = AutoTokenizer.from_pretrained(minilm_path())       # an offline WordPiece tokenizer
    tok.eos_token = "[SEP]"
    return tok


def tiny_t5(peft_config=None):
    tok = tokenizer()
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                   decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    return Seq2SeqBackbone(BackboneConfig(model="tiny-t5", family="seq2seq", max_length=32, max_target_length=4),
                           model=T5ForConditionalGeneration(cfg), tokenizer=tok, peft_config=peft_config)


def tiny_llama(peft_config=None):
    tok = tokenizer()
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    return CausalBackbone(BackboneConfig(model="tiny-llama", family="causal", max_length=32, max_target_length=4),
                          model=LlamaForCausalLM(cfg), tokenizer=tok, peft_config=peft_config)


def minilm():
    torch.manual_seed(0)
    backbone = EncoderBackbone(BackboneConfig(max_length=32))
    backbone.set_answer_space([Task("t", {"train": EXAMPLES}), Task("u", {"train": [Example("u", "x", "maybe")]})])
    return backbone


@pytest.mark.parametrize("build, targets", [(tiny_t5, ("q", "v")), (tiny_llama, ("q_proj", "v_proj")),
                                            (minilm, ("query", "value"))])
def test_family_trains_a_step_and_predicts(tmp_path, build, targets):
    backbone = build()
    names = list(backbone.trainable_parameters())
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == set(targets)                # LoRA on q and v only
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in backbone.trainable_parameters().items()}
    run = RunConfig(batch_size=4, epochs=1, lr=1e-2)
    cls, opts = resolve("seqlora")
    train_stage(backbone, EXAMPLES, cls(parse_options(cls.config_class, opts), backbone, run), run, 0,
                str(tmp_path))
    after = backbone.trainable_parameters()
    assert any(not torch.equal(before[n], after[n]) for n in before)       # LoRA moved
    assert all(torch.equal(frozen[n], p) for n, p in backbone.named_parameters() if n in frozen)
    answers = backbone.predict(EXAMPLES[:3])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_generative_loss_is_on_answer_tokens_only():
    backbone = tiny_llama()
    batch = backbone.collate(EXAMPLES[:2])
    for row, ex in zip(range(2), EXAMPLES[:2]):
        answer = batch["labels"][row][batch["labels"][row] != -100].tolist()
        expected = backbone.tokenizer(" " + ex.output, add_special_tokens=False)["input_ids"]
        assert answer == expected + [backbone.tokenizer.eos_token_id]
    t5 = tiny_t5().collate(EXAMPLES[:2])
    assert (t5["labels"] == -100).any() or t5["labels"].shape[1] > 0


def test_encoder_scores_over_all_labels_or_task_options():
    backbone = minilm()
    assert backbone.candidates == ["bad", "good", "maybe"]
    batch = backbone.collate(EXAMPLES[:2])
    assert batch["option_mask"].all()                                       # every label of the run
    backbone.config.answer_space = "task"
    batch = backbone.collate(EXAMPLES[:2])
    assert batch["option_mask"].tolist() == [[True, True, False]] * 2      # only the task's own labels
    assert set(backbone.predict(EXAMPLES[:4])) <= {"good", "bad"}


def test_encoder_predict_embeds_candidates_once_and_answers_as_per_batch_scoring(monkeypatch):
    backbone = minilm().eval()
    with torch.no_grad():                    # the reference: every batch embeds the candidates again
        batch = backbone.collate(EXAMPLES)
        expected = backbone.logits(batch["input_ids"], batch["attention_mask"], batch["option_mask"]).argmax(-1)
    calls = []
    real = backbone.embed
    monkeypatch.setattr(backbone, "embed", lambda ids, mask: calls.append(len(ids)) or real(ids, mask))
    backbone.config.eval_batch_size = 5
    assert backbone.predict(EXAMPLES) == [backbone.candidates[i] for i in expected.tolist()]
    assert calls == [3, 5, 3] and backbone._frozen_cands is None    # 3 candidates once, then 8 inputs as 5 + 3
    batch = backbone.collate(EXAMPLES[:2])                    # after predict, training scores embed them again
    backbone.logits(batch["input_ids"], batch["attention_mask"], batch["option_mask"])
    assert calls[3:] == [2, 3]


def test_minilm_cannot_be_generative():
    from rkif.backbones import build_backbone
    with pytest.raises(ValueError, match="encoder"):
        build_backbone(BackboneConfig(model="minilm", family="seq2seq"))


def test_the_family_names_the_parser_offers_are_the_families_that_load():
    """``FAMILY_NAMES`` (torch-free, for ``--family``) names exactly the classes ``families()`` loads."""
    import rkif.backbones as backbones

    assert tuple(backbones.families()) == backbones.FAMILY_NAMES
    assert backbones.FAMILIES["causal"] is CausalBackbone and backbones.Seq2SeqBackbone is Seq2SeqBackbone
