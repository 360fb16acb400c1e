"""The backbone protocol: a LoRA-wrapped model that gives a loss on a batch and answers for examples.

Every family implements ``collate`` (examples -> tensors), ``forward`` (tensors -> ``{"loss"}``, so
``transformers.Trainer`` trains it as any model) and ``predict`` (examples -> answer strings).
The LoRA weights are the trainable parameters; ``trainable_parameters`` is the one place that
selects them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from rkif.backbones.config import BackboneConfig
from rkif.console import progress_options
from rkif.data import Example, Task
from rkif.sharding import as_forward, full

# hook(embeddings [B, T, d], prompt_mask [B, T] bool) -> prefix embeddings [B, P, d], or None when P = 0
InputHook = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def call_input_hook(hook: InputHook, embeds: torch.Tensor, prompt_mask: torch.Tensor,
                    prefix_length: int) -> torch.Tensor | None:
    """Run ``hook`` and check that its prefix is [B, prefix_length, d] (None when ``prefix_length`` is 0)."""
    prefix = hook(embeds, prompt_mask)
    if not prefix_length:
        if prefix is not None:
            raise ValueError("an input hook added with prefix_length=0 returned a prefix")
        return None
    expected = (embeds.shape[0], prefix_length, embeds.shape[2])
    if prefix is None or tuple(prefix.shape) != expected:
        raise ValueError(f"input hook returned a prefix of shape {None if prefix is None else tuple(prefix.shape)}, "
                         f"expected {expected}")
    return prefix.to(embeds.dtype)


def prepend(value: float | int, x: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T] -> [B, length + T]: ``length`` columns of ``value`` before ``x``."""
    return torch.cat([x.new_full((x.shape[0], length), value), x], dim=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, d], [B, T] -> [B, d]: the mean of ``x`` over the positions where ``mask`` is true (0 where none is)."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


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

    def add_input_hook(self, hook: InputHook, prefix_length: int = 0) -> list:
        """Show ``hook`` the prompt of every new sequence, and let it prepend ``prefix_length`` embeddings.

        A new sequence is a training forward, the first (prefill) pass of generation or the prompt pass of
        rank mode; the later passes over the same sequences (decoding steps with a key/value cache) reuse it.
        ``hook(embeddings, prompt_mask)`` gets the frozen input-token embeddings [B, T, d] and the prompt's
        positions [B, T] (padding and answer tokens excluded, so training and generation see the same prompt)
        and returns the prefix [B, prefix_length, d] (or None when ``prefix_length`` is 0). The family extends
        the attention mask, labels and positions by the prefix. Returns the torch hook handles.
        Generative families only: the others refuse, naming the family.
        """
        raise ValueError(f"the {self.family or type(self).__name__} family has no input hook "
                         "(prompt and routing methods need a generative family: causal or seq2seq)")

    # -- free text (methods with a generator stream: lfpt5, sapt) ---------------------------------
    def text_batch(self, sources: list[str], targets: list[str], max_target_tokens: int) -> dict[str, torch.Tensor]:
        """A batch for the LM loss of plain-text ``targets`` (then EOS, at most ``max_target_tokens``) given
        plain-text ``sources`` (no instruction layout, no chat template), in the family's ``forward`` layout,
        on the CPU. Generative families only."""
        raise self._no_free_text()

    def _no_free_text(self) -> ValueError:
        return ValueError(f"the {self.family or type(self).__name__} family cannot generate text "
                          "(generative replay needs a causal or seq2seq backbone)")

    @torch.no_grad()
    def sample_text(self, sources: list[str], max_new_tokens: int, num_return_sequences: int = 1,
                    **sampling) -> list[str]:
        """Sampled continuations of each plain-text source (``num_return_sequences`` each, source by source),
        stopped at EOS or ``max_new_tokens``, decoded and stripped; in eval mode, batches of
        ``eval_batch_size`` sources. ``sampling``: ``generate``'s sampling options (``top_k``, ``temperature``,
        ``repetition_penalty``: on the generated tokens only, never the source's, in every family). Draws from
        torch's global generator: seed it for reproducible samples."""
        if not sources:
            return []
        was_training = self.training
        self.eval()
        out: list[str] = []
        try:
            for start in range(0, len(sources), self.config.eval_batch_size):
                out += self.sample_batch(sources[start:start + self.config.eval_batch_size], max_new_tokens,
                                         num_return_sequences, sampling)
        finally:
            self.train(was_training)
        return out

    def sample_batch(self, sources: list[str], max_new_tokens: int, num_return_sequences: int,
                     sampling: dict) -> list[str]:
        raise self._no_free_text()

    def prompt_text(self, ex: Example) -> str:
        """An example's prompt as the model reads it (cut to ``max_length`` as the family cuts it), as text."""
        return ex.prompt

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
    def sharded(self) -> bool:
        """Whether the parameters are split over processes (FSDP2): generation must then run in step on every
        rank (``synced_gpus``), since each forward gathers the parameters."""
        from rkif.sharding import sharding_of

        return sharding_of(self).sharded

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
                for start in tqdm(range(0, len(order), bs), desc=desc, leave=False, **progress_options()):
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
