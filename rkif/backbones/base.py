"""The backbone protocol: a LoRA-wrapped model that gives a loss on a batch and answers for examples.

Every family implements ``collate`` (examples -> tensors), ``forward`` (tensors -> ``{"loss"}``, so
``transformers.Trainer`` trains it as any model) and ``predict`` (examples -> answer strings).
The LoRA weights are the trainable parameters; ``trainable_parameters`` is the one place that
selects them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from rkif.backbones.sources import infer_family
from rkif.data import Example, Task
from rkif.sharding import as_forward, full


@dataclass
class BackboneConfig:
    """Which model to load and how to adapt it."""

    model: str = "minilm"            # "minilm"/"smollm2" (offline packages), a .gguf file, a local path or a hub name
    family: str = "auto"             # encoder | seq2seq | causal | auto (from the model: sources.infer_family)
    max_length: int = 128            # max source tokens
    max_target_length: int = 16      # max answer tokens (generative families)
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None   # None: q and v of the family (peft's mapping)
    answer_space: str = "all"        # encoder: "all" labels of the run, or the task's "task" options
    logit_scale: float = 20.0        # encoder: cosine-similarity temperature
    eval_batch_size: int = 64
    prompt_format: str = "raw"       # causal: "raw" instruction+input, or the tokenizer's "chat" template
    answer_mode: str = "generate"    # causal: greedy "generate" (+ exact match), or "rank" the candidate labels
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family == "auto":
            self.family = infer_family(self.model)


def named_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The trainable (LoRA) parameters of ``model``, with stable names: the only selector in rkif."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def lora_config(cfg: BackboneConfig, task_type: str | None = None) -> LoraConfig:
    """The paper's LoRA (r 8, alpha 32, dropout 0.05 on q and v unless configured)."""
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, task_type=task_type)


class Backbone(nn.Module):
    """Base class: holds the peft model and the tokenizer; subclasses define the family's I/O."""

    family: str = ""
    length_sorted_prediction = False     # predict() batches examples of similar prompt length together

    def __init__(self, peft_model: PeftModel, tokenizer, config: BackboneConfig):
        super().__init__()
        self.model = peft_model
        self.tokenizer = tokenizer
        self.config = config
        # the pretrained weights that stay frozen; everything else (every adapter a method adds) is saved
        self.frozen_base = {n for n, p in self.named_parameters() if not p.requires_grad}

    @staticmethod
    def wrap(model: nn.Module, cfg: BackboneConfig, task_type: str | None = None,
             peft_config: PeftConfig | None = None) -> PeftModel:
        """Attach the adapter: the paper's LoRA unless a method asks for another peft config."""
        if peft_config is None:
            peft_config = lora_config(cfg, task_type)
        elif task_type is not None and getattr(peft_config, "task_type", None) is None:
            peft_config.task_type = task_type
        return get_peft_model(model, peft_config)

    # -- the protocol ---------------------------------------------------------------------------
    def set_answer_space(self, tasks: list[Task]) -> None:
        """Tell the model every task of the run (the encoder scores over their labels)."""

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict_batch(self, examples: list[Example]) -> list[str]:
        raise NotImplementedError

    def prompt_length(self, ex: Example) -> int:
        """Size of an example's prompt (what length-sorted prediction sorts by): characters unless overridden."""
        return len(ex.prompt)

    def example_length(self, ex: Example) -> int:
        """Size of one training example (what length-grouped batching sorts by)."""
        return self.prompt_length(ex) + len(ex.output)

    # -- shared ---------------------------------------------------------------------------------
    @property
    def _no_split_modules(self) -> list[str] | None:
        """The model's layer classes: FSDP (accelerate's default policy) shards each layer as one unit."""
        return getattr(self.model, "_no_split_modules", None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable (LoRA) parameters (``named_trainable`` above)."""
        return named_trainable(self)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_trainable())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not a frozen pretrained weight (all adapters, trainable or not), on CPU.

        Sharded parameters (FSDP2) are gathered whole: call it on every process."""
        return {n: full(p).detach().cpu().clone() for n, p in self.named_parameters() if n not in self.frozen_base}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise KeyError(f"checkpoint has adapter tensors this model lacks: {missing[:3]}...")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))

    @torch.no_grad()
    def predict(self, examples: list[Example], desc: str = "eval") -> list[str]:
        """Answers for every example, in batches, in eval mode (restores the previous mode)."""
        was_training = self.training
        self.eval()
        order = list(range(len(examples)))
        if self.length_sorted_prediction:
            order.sort(key=lambda i: self.prompt_length(examples[i]))
        out: list[str | None] = [None] * len(examples)
        bs = self.config.eval_batch_size
        as_forward(self, "predict_batch")      # sharded (FSDP2): predict_batch gathers the parameters as forward does
        try:
            with self.prediction_context():
                for start in tqdm(range(0, len(order), bs), desc=desc, leave=False):
                    batch = order[start:start + bs]
                    for i, answer in zip(batch, self.predict_batch([examples[i] for i in batch])):
                        out[i] = answer
        finally:
            self.train(was_training)
        return out

    @contextmanager
    def prediction_context(self) -> Iterator[None]:
        """Entered once per ``predict`` call, in eval mode with fixed weights: a family caches here
        what every batch of the call shares (the encoder: its candidate-label embeddings)."""
        yield

    def tokenize(self, texts: list[str], max_length: int, **kw) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, max_length=max_length, truncation=True, padding=True,
                              return_tensors="pt", return_token_type_ids=False, **kw)
