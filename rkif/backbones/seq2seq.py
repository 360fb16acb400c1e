"""Encoder-decoder backbone (T5 family): loss on the answer tokens, greedy generation to answer."""

from __future__ import annotations

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from rkif.backbones.base import Backbone, BackboneConfig
from rkif.backbones.sources import loading, resolve_model
from rkif.data import Example, Task


class Seq2SeqBackbone(Backbone):
    family = "seq2seq"
    length_sorted_prediction = True

    def __init__(self, cfg: BackboneConfig, model=None, tokenizer=None, peft_config=None):
        source = resolve_model(cfg.model)
        with loading(cfg.model):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(source.path, **source.kwargs())
            model = model or AutoModelForSeq2SeqLM.from_pretrained(source.path, **source.kwargs())
        super().__init__(self.wrap(model, cfg, "SEQ_2_SEQ_LM", peft_config), tokenizer, cfg)
        self.answer_limit = cfg.max_target_length          # set_answer_space: the longest label + EOS

    def set_answer_space(self, tasks: list[Task]) -> None:
        """Stop generation after the longest answer of the run's tasks (its tokens + EOS)."""
        labels = sorted({label for t in tasks for label in t.labels})
        if labels:
            longest = max(len(ids) for ids in self.tokenizer(labels)["input_ids"])   # includes EOS
            self.answer_limit = min(self.config.max_target_length, longest)

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        src = self.tokenize([ex.prompt for ex in examples], self.config.max_length)
        tgt = self.tokenize([ex.output for ex in examples], self.config.max_target_length)
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
        return {"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": labels}

    def forward(self, input_ids, attention_mask, labels) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return {"loss": out.loss}

    def predict_batch(self, examples: list[Example]) -> list[str]:
        src = self.tokenize([ex.prompt for ex in examples], self.config.max_length).to(self.device)
        ids = self.model.generate(**src, max_new_tokens=self.answer_limit, do_sample=False,
                                  num_beams=1)
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
