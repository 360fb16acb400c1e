"""SAPT: a LoRA per task, mixed by a shared attentive selection; generated pseudo-prompts keep old selections.

Zhao et al., "SAPT: A Shared Attentive Learning Framework for Parameter-Efficient Continual Learning of
Large Language Models", ACL 2024; official code ``circle-hit/SAPT@52a52b9203`` (``src/t5_prompt.py``,
``src/cl_trainer.py``, ``src/run_t5.py``, ``gen_script_*_t5.py``, generators in ``pseudo_data/``).
BASELINES.md section 10. With task LoRAs 0..k learned so far (stage k trains the last one):

    x_bar = max over the prompt's token positions of the frozen input embeddings        [B, d]
    q     = LayerNorm(SiLU(W2 W1 x_bar))          (W1: d -> 100, W2: 100 -> d, no bias; the official order)
    a     = softmax(K q / sqrt(d))                (K: one learnable key per task, [k+1, d])         [B, k+1]
    h     = W0 x + sum_t a_t * (alpha / r) B_t A_t x            in every target layer, training and test

No task id anywhere: the attention picks the mixture. Attentive Reflection: after stage t the mean of a
over the stage's training prompts is recorded (m_t). In a later stage k, pseudo-prompts of each earlier
task t pass through the selection only (pooled embeddings -> q -> a, no LM forward), and

    L_reflect = kl_ratio * sum_{t<k} KL(m_t padded with zeros to k+1 || a(pseudo-prompts of t))   (batch mean)

which is exactly zero when their attention equals the recorded one. Pseudo-prompts come from a generator:
one extra LoRA per task (``generator_<t>``, official: r 8, alpha 32, dropout 0.1) trained as a language
model on source ``"__gen__"`` -> target ``"{instruction} __inp__ {input}"`` of the task's training
examples. Before stage k > 0 each earlier generator, alone in the forward pass, samples
``max(1, int(memory_fraction * n_t))`` texts (top-k 20; seeded with ``run.seed + k`` under
``torch.random.fork_rng``); a text with one ``__inp__`` and a non-empty input after it is kept (at most
``sample_rounds`` draws of the missing count). They are never taken from stored data.

What trains in stage k (as ``run_t5.py`` marks it): the task LoRA k, the key k, the query MLP (shared, every
stage) and the generator k; earlier LoRAs, keys and generators are frozen. Stage 0 has one key, so a = 1.

Implementation: the task LoRAs are IncLoRA's adapters (``default``, ``task_1``, ...; subclassed), the
generators peft adapters beside them, all active; a forward hook on every adapter's ``lora_B`` multiplies
its output by its weight (a_t for a task LoRA, 0 for the generators; in a generator pass 1 for that
generator and 0 for every other adapter). The selection (``backbone.sapt``: MLP and keys) reads the prompt
through ``Backbone.add_input_hook``, once per new sequence, so a generated answer keeps its prompt's
weights. All of it is saved by the runner with the adapters; adapters and keys are recreated on resume.

Hooks: ``families`` (generative only), ``peft_config`` (the task LoRA), ``before_task`` (new adapters and key,
pseudo-prompts), ``on_train_begin`` (seeded draws), ``extra_loss`` (``sapt_generator``: the generator's LM
loss on a seeded draw of the stage's training examples; ``sapt_kl``: the reflection term on a seeded draw of
pseudo-prompts, up to ``batch_size`` per earlier task and step: the Trainer's batch does not say which rows
are which task, so the reflection never reads it), ``after_task`` (m_t), ``state_dict`` (adapter names,
m_t, pseudo-prompts, the per-stage log), ``diagnostics``.

Defaults are the official Long-benchmark T5 script's (``gen_script_long_t5.py``: LoRA r 8, alpha 32,
dropout 0, ``kl_ratio`` 0.1, the value BASELINES.md reads in the paper's text); its SuperNI script: r 4,
``kl_ratio`` 0.5 (``-O lora_r=4 -O kl_ratio=0.5``; ``run_t5.py``'s default is 0.5). Both use lr 3e-4,
constant schedule, bf16 (10 epochs at batch 16 x 2 on Long, 100 epochs at 8 x 4 on SuperNI), best
checkpoint on dev: set the run's options; no dev selection here (dev = test in its data).

Deviations from the official code:
- one run: the generator trains in the same Trainer steps, with the run's optimizer and learning rate
  (weighted by ``generator_weight``), instead of a separate run per task (lr 1e-3, 5000 steps, batch 16)
  from the base model; its passes leave every task LoRA out (gate 0) and the task passes leave it out.
  The last task's generator is not trained: nothing samples it (the official trains one per task).
- the markers ``__gen__`` / ``__inp__`` are plain text, not added vocabulary tokens (the embeddings stay
  frozen); a tokenizer that does not decode them back verbatim yields no pseudo-prompts (a warning says so).
  Pseudo-prompts are re-sampled from every earlier generator before each stage (the official samples once
  per task, about one text per training example, and keeps 2 %); texts with ``__ans__`` are not expected.
- m_t is the mean over the stage's training prompts (official: over its dev prompts, batch by batch).
- the query pools the prompt's tokens only (official: every position, padding and, for LLaMA, the answer).
- the reflection term is added to the loss the Trainer divides by ``grad_accum`` (official: backpropagated
  per micro-batch, undivided; equal for ``grad_accum`` 1); a pseudo-prompt is read as the text
  ``instruction + "\\n" + input``.
- the softmax is always over every key learned so far, stage 0 included (the official Long script runs
  stage 0 without the selection, ``--run_single``, which its stage-1 command then cannot load).
- one process only (``require_one_process``): each process would sample its own pseudo-prompts.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from peft import LoraConfig
from torch import nn

from rkif.checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Rule
from rkif.data import Example, Task
from rkif.methods.base import GENERATIVE_FAMILIES, MethodConfig, require_one_process, scale_rows, task_count
from rkif.methods.inclora import BASE_ADAPTER, IncLoRA
from rkif.methods.registry import register

logger = logging.getLogger(__name__)

GEN = "__gen__"          # the generator's source
INP = "__inp__"          # between a generated instruction and its input
PROBABILITY = Rule(lambda v: 0 <= v < 1, "expected a probability in [0, 1)")


@dataclass
class SAPTConfig(MethodConfig):
    lora_r: int = 8                  # task LoRA rank (official Long script; its SuperNI script: 4)
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    query_hidden: int = 100          # width of the query MLP's bottleneck
    kl_ratio: float = 0.1            # weight of the reflection term (Long script, paper; SuperNI script: 0.5)
    generator_r: int = 8             # the generator LoRA (official pseudo_data/src/run_uie_lora.py)
    generator_alpha: int = 32
    generator_dropout: float = 0.1
    generator_weight: float = 1.0    # weight of the generator's LM loss in the shared step
    top_k: int = 20                  # top-k sampling of pseudo-prompts (official transfer_generate_sh.py)
    sample_rounds: int = 3           # draws of the missing pseudo-prompts before giving up on the rest

    method: ClassVar[str] = "sapt"

    def check(self) -> None:
        super().check()
        self.check_ranges({"lora_r": AT_LEAST_ONE, "lora_alpha": AT_LEAST_ONE, "lora_dropout": PROBABILITY,
                           "query_hidden": AT_LEAST_ONE, "kl_ratio": NON_NEGATIVE, "generator_r": AT_LEAST_ONE,
                           "generator_alpha": AT_LEAST_ONE, "generator_dropout": PROBABILITY,
                           "generator_weight": POSITIVE, "top_k": AT_LEAST_ONE, "sample_rounds": AT_LEAST_ONE})
        reflecting = (self.kl_ratio > 0, "with kl_ratio > 0 (the generators serve the reflection term)")
        self.check_unused({name: reflecting for name in ("generator_r", "generator_alpha", "generator_dropout",
                                                         "generator_weight", "top_k", "sample_rounds")})

    def check_run(self, run) -> None:
        require_one_process(self.method)


# -- the paper's pieces, pure torch -------------------------------------------------------------
def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, d], [B, T] -> [B, d]: the maximum over the positions where ``mask`` is true (0 where none is)."""
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    return torch.where(mask.any(1, keepdim=True), filled, torch.zeros_like(filled))


class Selection(nn.Module):
    """The shared query MLP and one key per task: ``logits`` are K q / sqrt(d), [B, tasks]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.query = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False),
                                   nn.SiLU(), nn.LayerNorm(dim))
        self.keys = nn.ParameterList()

    def add_key(self) -> None:
        """A new task key, uniform in [-1, 1] as the official ``prompt_key``."""
        weight = self.query[0].weight
        self.keys.append(nn.Parameter(torch.empty(self.dim, device=weight.device, dtype=weight.dtype).uniform_(-1, 1)))

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, d] pooled prompt embeddings -> [B, tasks] attention logits (float32)."""
        q = self.query(pooled.to(self.query[0].weight.dtype))
        keys = torch.stack(tuple(self.keys))
        return (q @ keys.T.to(q.dtype)).float() / math.sqrt(self.dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, tasks]: the attention weights, each row summing to 1."""
        return torch.softmax(self.logits(pooled), dim=-1)


def reflection_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) averaged over the rows ([B, K] logits, [K] recorded mean attention, zeros
    for the keys added after it): the official ``KLDivLoss(reduction="batchmean")``. Computed from the
    probabilities, so it is exactly 0 where softmax(logits) equals the target."""
    p = torch.softmax(logits.float(), dim=-1)
    target = target.to(p).expand_as(p)
    seen = target > 0
    log_ratio = torch.log(target.where(seen, 1.0)) - torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
    return (target * log_ratio).where(seen, 0.0).sum(-1).mean()


def padded(attention: list[float], size: int) -> torch.Tensor:
    """A recorded mean attention over the keys of its stage, zero for the ``size - len`` keys added since."""
    return torch.tensor(attention + [0.0] * (size - len(attention)))


def generator_target(ex: Example) -> str:
    """What the generator learns to write from ``__gen__``: the example's instruction and input."""
    return f"{ex.instruction.strip()} {INP} {ex.input.strip()}"


def parse_pseudo(text: str) -> tuple[str, str] | None:
    """(instruction, input) of a generated text with one ``__inp__`` and a non-empty input; else None."""
    if text.count(INP) != 1:
        return None
    instruction, inp = (part.strip() for part in text.split(INP))
    return (instruction, inp) if inp else None


def pseudo_example(task: str, instruction: str, inp: str) -> Example:
    """A pseudo-prompt as an example without answer: instruction, newline, input, all as the input, so that a
    long generated instruction is cut like any long input (``max_length``) rather than refused."""
    return Example(task, f"{instruction}\n{inp}" if instruction else inp, "")


class Draws:
    """Seeded indices into n items, a fresh random order each pass: the reproducible draws of ``extra_loss``."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator, self.order = n, generator, []

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(min(k, self.n)):
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
            out.append(self.order.pop())
        return out


def generator_name(stage: int) -> str:
    return f"generator_{stage}"


# -- the method ---------------------------------------------------------------------------------
@register
class SAPT(IncLoRA):
    name = "sapt"
    config_class = SAPTConfig
    families = GENERATIVE_FAMILIES

    @classmethod
    def peft_config(cls, config: SAPTConfig, backbone) -> LoraConfig:
        return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=backbone.lora_targets)

    def __init__(self, config: SAPTConfig, backbone, run):
        super().__init__(config, backbone, run)
        embedding = backbone.model.get_base_model().get_input_embeddings().weight
        backbone.sapt = Selection(embedding.shape[1], config.query_hidden).to(embedding.device)
        self.selection: Selection = backbone.sapt
        self.generators: list[str] = []
        self.weights: torch.Tensor | None = None      # [B, tasks] of the current sequences
        self._generator: str | None = None            # the adapter a generator pass runs alone
        self._hook_adapter(BASE_ADAPTER)
        self._add_stage_modules(0)
        backbone.add_input_hook(self._select)
        self.stage = 0
        self.last_stage = task_count(run) - 1          # its generator would never be sampled: not trained
        self.recorded: list[list[float]] = []          # m_t per finished stage
        self.train_sizes: list[int] = []
        self.stage_names: list[str] = []
        self.pseudo: dict[int, list[list[str]]] = {}   # earlier stage -> [instruction, input] for this stage
        self.log: list[dict] = []
        self._train: list[Example] = []
        self._draws: dict = {}
        self._pooled: dict[int, torch.Tensor] | None = None
        self._sums: dict[str, list[float]] = {}

    # -- adapters and keys --------------------------------------------------------------------------
    def _hook_adapter(self, name: str) -> None:
        for _, layer in self.lora_layers():
            if name in layer.lora_B:
                layer.lora_B[name].register_forward_hook(partial(self._gate, name))

    def add_adapter(self, name: str) -> None:
        """IncLoRA's new task LoRA, plus its output gate."""
        super().add_adapter(name)
        self._hook_adapter(name)

    def _add_stage_modules(self, stage: int) -> None:
        """The generator and the key of ``stage`` (the task LoRA is IncLoRA's)."""
        if len(self.generators) == stage:
            model, cfg = self.backbone.model, self.config
            gen = copy.deepcopy(model.peft_config[BASE_ADAPTER])
            gen.r, gen.lora_alpha, gen.lora_dropout = cfg.generator_r, cfg.generator_alpha, cfg.generator_dropout
            model.add_adapter(generator_name(stage), gen)
            self.generators.append(generator_name(stage))
            self._hook_adapter(generator_name(stage))
        if len(self.selection.keys) == stage:
            self.selection.add_key()
        self.activate()

    def activate(self) -> None:
        """Every adapter in the forward pass; trainable: the newest task LoRA, its key and generator, the MLP."""
        model, stage = self.backbone.model, len(self.adapters) - 1
        model.base_model.set_adapter(self.adapters + self.generators)     # marks every active adapter trainable
        trained_gen = generator_name(stage) if self.config.kl_ratio and len(self.generators) > stage else None
        frozen = self.adapters[:-1] + [g for g in self.generators if g != trained_gen]
        if frozen:
            model.base_model.set_requires_grad(frozen, requires_grad=False)
        for i, key in enumerate(self.selection.keys):
            key.requires_grad_(i == stage)
        markers = [f".{self.current}."] + ([f".{trained_gen}."] if trained_gen else [])
        expected = {n for n, _ in self.backbone.named_parameters()
                    if any(m in n for m in markers) or n.startswith("sapt.query.") or n == f"sapt.keys.{stage}"}
        trainable = set(self.backbone.trainable_parameters())
        if trainable != expected:
            raise RuntimeError(f"{self.name}: trainable set is not stage {stage}'s modules: "
                               f"{sorted(trainable ^ expected)[:3]}")

    # -- the forward pass -----------------------------------------------------------------------------
    def _select(self, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Input hook: the attention weights of each new sequence (none in a generator pass)."""
        self.weights = None if self._generator else self.selection(masked_max(embeds.detach(), prompt_mask))

    def _gate(self, name: str, module, args, out: torch.Tensor) -> torch.Tensor | None:
        """Forward hook of an adapter's ``lora_B``: its output times its weight in this pass."""
        if self._generator is not None or name in self.generators:
            return None if name == self._generator else torch.zeros_like(out)
        if self.weights is None:
            raise RuntimeError(f"{self.name}: a LoRA layer ran before the input hook saw a prompt")
        return scale_rows(out, self.weights[:, self.adapters.index(name)], self.name)

    @contextmanager
    def generating(self, name: str) -> Iterator[None]:
        """Within: ``name`` (a generator adapter) is the only adapter in the forward pass."""
        self._generator = name
        try:
            yield
        finally:
            self._generator = None

    def pooled_prompts(self, examples: list[Example]) -> torch.Tensor:
        """[N, d]: the max-pooled prompt embeddings of ``examples``, as the input hook pools them."""
        embed = self.backbone.model.get_base_model().get_input_embeddings()
        out = []
        for start in range(0, len(examples), self.backbone.config.eval_batch_size):
            batch = self.backbone.collate(examples[start:start + self.backbone.config.eval_batch_size])
            prompt = batch["attention_mask"].bool()
            if self.backbone.family == "causal":       # one row holds prompt and answer: the answer is not the prompt
                prompt = prompt & (batch["labels"] == -100)
            with torch.no_grad():
                embeds = embed(batch["input_ids"].to(embed.weight.device))
            out.append(masked_max(embeds, prompt.to(embeds.device)))
        return torch.cat(out)

    # -- pseudo-prompts -------------------------------------------------------------------------------
    def sample_pseudo(self, stage: int) -> dict[int, list[list[str]]]:
        """Per earlier stage t: ``max(1, int(memory_fraction * n_t))`` (instruction, input) pairs from its generator."""
        pseudo = {}
        with torch.random.fork_rng():
            torch.manual_seed(self.run.seed + stage)
            for t in range(stage):
                want, kept = max(1, int(self.run.memory_fraction * self.train_sizes[t])), []
                for _ in range(self.config.sample_rounds):
                    if len(kept) >= want:
                        break
                    with self.generating(self.generators[t]):
                        texts = self.backbone.sample_text([GEN] * (want - len(kept)), self.backbone.config.max_length,
                                                          top_k=self.config.top_k)
                    kept += [list(pair) for pair in map(parse_pseudo, texts) if pair]
                if len(kept) < want:
                    logger.warning("%s stage %d: %d of %d pseudo-prompts of %s well-formed after %d draws", self.name,
                                   stage, len(kept), want, self.stage_names[t], self.config.sample_rounds)
                pseudo[t] = kept[:want]
        return pseudo

    # -- runner hooks ---------------------------------------------------------------------------------
    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        super().before_task(stage, tasks, train)       # the stage's task LoRA
        self._add_stage_modules(stage)
        self.stage, self._train = stage, list(train)
        self.pseudo = self.sample_pseudo(stage) if stage and self.config.kl_ratio else {}
        if self.pseudo:
            logger.info("%s stage %d: pseudo-prompts %s", self.name, stage,
                        {self.stage_names[t]: len(p) for t, p in self.pseudo.items()})
        return train

    def on_train_begin(self, trainer) -> None:
        generator = torch.Generator().manual_seed(self.run.seed + self.stage)
        self._draws = {"train": Draws(len(self._train), generator)}
        self._draws.update({t: Draws(len(p), generator) for t, p in self.pseudo.items()})
        self._pooled, self._sums = None, {}

    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        """The generator's LM loss and the reflection term (the Trainer's batch is not read)."""
        cfg, terms = self.config, {}
        if not cfg.kl_ratio:
            return terms
        size, device = self.run.batch_size, self.backbone.device
        if self.stage < self.last_stage:
            examples = [self._train[i] for i in self._draws["train"].take(size)]
            batch = self.backbone.text_batch([GEN] * len(examples), [generator_target(ex) for ex in examples],
                                             self.backbone.config.max_length)
            with self.generating(self.generators[self.stage]):
                loss = self.backbone(**{k: v.to(device) for k, v in batch.items()})["loss"]
            terms["sapt_generator"] = cfg.generator_weight * loss
        if self.pseudo:
            if self._pooled is None:
                self._pooled = {t: self.pooled_prompts([pseudo_example(self.stage_names[t], *p) for p in pairs])
                                for t, pairs in self.pseudo.items() if pairs}
            keys = self.stage + 1
            kl = [reflection_kl(self.selection.logits(pooled[self._draws[t].take(size)]),
                                padded(self.recorded[t], keys).to(device)) for t, pooled in self._pooled.items()]
            if kl:
                terms["sapt_kl"] = cfg.kl_ratio * torch.stack(kl).sum()
        for name, term in terms.items():
            total = self._sums.setdefault(name, [0.0, 0])
            total[0] += term.detach().item()
            total[1] += 1
        return terms

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        with torch.no_grad():
            attention = self.selection(self.pooled_prompts(train)).mean(0).tolist()
        self.recorded.append(attention)
        self.train_sizes.append(len(train))
        self.stage_names.append("+".join(t.name for t in tasks))
        entry = {"stage": stage, "mean_attention": [round(a, 4) for a in attention],
                 "pseudo_prompts": {self.stage_names[t]: len(p) for t, p in self.pseudo.items()}}
        entry.update({f"mean_{name}": round(s / n, 6) for name, (s, n) in sorted(self._sums.items())})
        self.log.append(entry)
        logger.info("%s after stage %d: mean attention %s", self.name, stage, entry["mean_attention"])

    # -- state ----------------------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        return {"adapters": list(self.adapters), "generators": list(self.generators), "stages": list(self.log)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Adapters, MLP and keys are adapter tensors (the runner saves them); here, their layout and the record."""
        return {}, {"adapters": list(self.adapters), "generators": list(self.generators),
                    "keys": len(self.selection.keys), "recorded": self.recorded, "train_sizes": self.train_sizes,
                    "stage_names": self.stage_names, "log": self.log,
                    "pseudo_prompts": {str(t): p for t, p in self.pseudo.items()}}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Recreate the saved adapters, generators and keys in order (the runner then loads their weights)."""
        super().load_state_dict(tensors, meta)
        if meta["generators"][:len(self.generators)] != self.generators:
            raise ValueError(f"saved generators {meta['generators']} do not extend {self.generators}")
        for stage in range(len(self.generators), len(meta["generators"])):
            self._add_stage_modules(stage)
        if len(self.selection.keys) != meta["keys"]:
            raise ValueError(f"{self.name} state: {meta['keys']} saved keys, {len(self.selection.keys)} rebuilt")
        self.recorded, self.train_sizes = meta["recorded"], meta["train_sizes"]
        self.stage_names, self.log = meta["stage_names"], meta["log"]
        self.pseudo = {int(t): p for t, p in meta["pseudo_prompts"].items()}
