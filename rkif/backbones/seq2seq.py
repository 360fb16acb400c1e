"""Encoder-decoder backbone (T5 family): loss on the answer tokens, greedy generation to answer."""

from __future__ import annotations

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from rkif.backbones.base import Backbone, BackboneConfig, InputHook, call_input_hook, prepend
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
                                  num_beams=1, synced_gpus=self.sharded)
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def prompt_text(self, ex: Example) -> str:
        """The prompt's first ``max_length`` tokens (the encoder's truncation) decoded."""
        ids = self.tokenizer(ex.prompt, max_length=self.config.max_length, truncation=True)["input_ids"]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text_batch(self, sources: list[str], targets: list[str], max_target_tokens: int) -> dict[str, torch.Tensor]:
        """See ``Backbone.text_batch``: the source through the encoder, the target (+ EOS) as the decoder's labels."""
        if len(sources) != len(targets):
            raise ValueError(f"text_batch: {len(sources)} sources for {len(targets)} targets")
        src = self.tokenize(list(sources), self.config.max_length)
        tgt = self.tokenize(list(targets), max_target_tokens)
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
        return {"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": labels}

    def sample_batch(self, sources: list[str], max_new_tokens: int, num_return_sequences: int,
                     sampling: dict) -> list[str]:
        src = self.tokenize(list(sources), self.config.max_length).to(self.device)
        ids = self.model.generate(**src, max_new_tokens=max_new_tokens, do_sample=True, num_beams=1,
                                  num_return_sequences=num_return_sequences, synced_gpus=self.sharded, **sampling)
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def add_input_hook(self, hook: InputHook, prefix_length: int = 0) -> list:
        """See ``Backbone.add_input_hook``: a forward pre-hook on the encoder, which reads every prompt once (in
        training and at the start of generation); with a prefix, one on the model too, so that the decoder's
        cross-attention mask covers the prefixed encoder states."""
        lm = self.model.get_base_model()
        embed = lm.get_input_embeddings()
        p = prefix_length

        def before_encoder(module, args, kwargs):
            ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            if args or ids is None:
                raise ValueError("input hooks need the encoder called with input_ids as a keyword argument")
            embeds = embed(ids)                                              # [B, T, d], frozen
            t = ids.shape[1]
            prompt = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[:, -t:].bool()
            prefix = call_input_hook(hook, embeds, prompt, p)
            if prefix is None:
                return None
            kwargs.update(input_ids=None, inputs_embeds=torch.cat([prefix, embeds], dim=1))
            if mask is not None and mask.shape[1] == t:                      # not yet extended by before_model
                kwargs["attention_mask"] = prepend(1, mask, p)
            return args, kwargs

        def before_model(module, args, kwargs):
            mask, ids, encoded = kwargs.get("attention_mask"), kwargs.get("input_ids"), kwargs.get("encoder_outputs")
            if mask is None:
                return None
            tokens = ids.shape[1] if ids is not None else encoded[0].shape[1] - p if encoded is not None else None
            if tokens != mask.shape[1]:
                return None                                                  # already covers the prefix
            kwargs["attention_mask"] = prepend(1, mask, p)
            return args, kwargs

        handles = [lm.get_encoder().register_forward_pre_hook(before_encoder, with_kwargs=True)]
        if p:
            handles.append(lm.register_forward_pre_hook(before_model, with_kwargs=True))
        return handles
