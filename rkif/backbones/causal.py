"""Decoder-only backbone (LLaMA/GPT family): prompt masked from the loss, greedy generation."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rkif.backbones.base import Backbone, BackboneConfig
from rkif.data import Example


class CausalBackbone(Backbone):
    family = "causal"

    def __init__(self, cfg: BackboneConfig, model=None, tokenizer=None, peft_config=None):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.model)
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {cfg.model!r} has no eos token; a causal backbone needs one")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = model or AutoModelForCausalLM.from_pretrained(cfg.model)
        super().__init__(self.wrap(model, cfg, "CAUSAL_LM", peft_config), tokenizer, cfg)

    def _encode(self, text: str, limit: int) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Right-padded prompt+answer+eos; labels are -100 on the prompt and the padding."""
        rows, targets = [], []
        for ex in examples:
            prompt = self._encode(ex.prompt, self.config.max_length)
            answer = self._encode(" " + ex.output, self.config.max_target_length) + [self.tokenizer.eos_token_id]
            rows.append(prompt + answer)
            targets.append([-100] * len(prompt) + answer)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def forward(self, input_ids, attention_mask, labels) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return {"loss": out.loss}

    def predict_batch(self, examples: list[Example]) -> list[str]:
        self.tokenizer.padding_side = "left"
        try:
            src = self.tokenize([ex.prompt for ex in examples], self.config.max_length,
                                add_special_tokens=False).to(self.device)
        finally:
            self.tokenizer.padding_side = "right"
        ids = self.model.generate(**src, max_new_tokens=self.config.max_target_length, do_sample=False,
                                  num_beams=1, pad_token_id=self.tokenizer.pad_token_id)
        answers = ids[:, src["input_ids"].shape[1]:]
        return [s.strip() for s in self.tokenizer.batch_decode(answers, skip_special_tokens=True)]
