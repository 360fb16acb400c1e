"""The backbone protocol: a LoRA-wrapped model that gives a loss on a batch and answers for examples.

Every family implements ``collate`` (examples -> tensors), ``forward`` (tensors -> ``{"loss"}``, so
``transformers.Trainer`` trains it as any model) and ``predict`` (examples -> answer strings).
The LoRA weights are the trainable parameters; ``trainable_parameters`` is the one place that
selects them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from rkif.backbones.sources import family_from_name, infer_family, position_limit
from rkif.checks import AT_LEAST_ONE, NOT_EMPTY, POSITIVE, Rule, check_choice, check_rules, check_types, fail, flag
from rkif.console import progress_options
from rkif.data import Example, Task
from rkif.sharding import as_forward, full

PROMPT_FORMATS = ("raw", "chat")
ANSWER_MODES = ("generate", "rank")
ANSWER_SPACES = ("all", "task")


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
        if self.family == "auto" and isinstance(self.model, str):
            self.family = infer_family(self.model)

    def check(self) -> None:
        """Refuse a setting of the wrong type, out of range or inconsistent with the model, naming it;
        reads at most the model's config.json (``sources.position_limit``), never its weights."""
        from rkif.backbones import FAMILIES

        check_types(BackboneConfig, vars(self), flag)
        check_rules(self, {"model": NOT_EMPTY, "max_length": AT_LEAST_ONE, "max_target_length": AT_LEAST_ONE,
                           "lora_r": AT_LEAST_ONE, "lora_alpha": AT_LEAST_ONE, "eval_batch_size": AT_LEAST_ONE,
                           "lora_dropout": Rule(lambda v: 0 <= v < 1, "expected a probability in [0, 1)"),
                           "logit_scale": POSITIVE}, flag)
        check_choice(flag("family"), self.family, sorted(FAMILIES))
        fixed = family_from_name(self.model)
        if fixed and self.family != fixed:
            raise fail(flag("family"), self.family, f"--model {self.model} is {fixed}; use --family {fixed} (or auto)")
        if self.lora_targets is not None and (not self.lora_targets or not all(t.strip() for t in self.lora_targets)):
            raise fail(flag("lora_targets"), ",".join(self.lora_targets),
                       "expected comma-separated module names, none empty")
        for name, allowed in (("prompt_format", PROMPT_FORMATS), ("answer_mode", ANSWER_MODES),
                              ("answer_space", ANSWER_SPACES)):
            check_choice(flag(name), getattr(self, name), allowed)
        self._check_family_options()
        self._check_length()

    def _check_family_options(self) -> None:
        """A setting that the model's family ignores is refused rather than silently dropped."""
        used = {"prompt_format": self.family == "causal", "answer_mode": self.family == "causal",
                "logit_scale": self.family == "encoder",
                "answer_space": self.family == "encoder" or (self.family == "causal" and self.answer_mode == "rank")}
        default = {f.name: f.default for f in fields(BackboneConfig)}
        for name, applies in used.items():
            if not applies and getattr(self, name) != default[name]:
                where = "the encoder family and causal --answer-mode rank" if name == "answer_space" else (
                    "the encoder family" if name == "logit_scale" else "the causal family")
                raise fail(flag(name), getattr(self, name),
                           f"applies to {where} only (--model {self.model} is {self.family})")

    def _check_length(self) -> None:
        """Prompt (and, for a causal model, answer + EOS) within the positions the model embeds, where known."""
        limit = position_limit(self.model)
        if limit is None:
            return
        need = self.max_length + (self.max_target_length + 1 if self.family == "causal" else 0)
        if need > limit:
            extra = (f" with --max-target-length {self.max_target_length} (prompt + answer + EOS: {need} tokens)"
                     if self.family == "causal" else "")
            raise fail(flag("max_length"), self.max_length,
                       f"--model {self.model} embeds at most {limit} token positions{extra}; lower it")


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
