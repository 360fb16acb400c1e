"""LFPT5: one soft prompt learns the tasks and to generate them; generated pseudo-samples are replayed.

Qin and Joty, "LFPT5: A Unified Framework for Lifelong Few-shot Language Learning Based on Prompt Tuning
of T5", ICLR 2022 (official ``qcwthu/Lifelong-Fewshot-Language-Learning``, ``Classification/``).
BASELINES.md section 10. One prompt P of L virtual tokens is prepended to every input of a frozen
backbone; only P trains. Every step adds two terms to the task loss (the Trainer's CE):

    loss = CE(x -> y) + lm_weight * LM(cue(t) -> "x __ans__ y") + kl_weight * KL          (official 0.25, 0.01)
    KL   = sum over pseudo rows and answer positions of KL(p(. | P_prev) || p(. | P))     (reduction "sum")

The LM stream trains P as a generator of the task's examples: given a per-task cue text
(``"__gen__ <task>"``) it predicts the whole prompt (instruction included; cut to ``--max-length`` as the
backbone cuts a prompt, so the separator and answer always fit), the separator and the answer.
Before each stage k > 0 it samples pseudo-samples of every earlier task with the current prompt (top-k 64,
repetition penalty 2.5 on the generated tokens, not the cue: the official settings), keeps those that parse
as ``prompt __ans__ answer`` with a non-empty prompt and answer and, for a closed label set, an answer inside
it (the official drops the others), up to 2 per class (free-text tasks: 4 per task, the official
summarization count), drawing again for the missing ones for a bounded number of rounds. They are replayed
as ordinary examples (CE and LM stream) and distilled: P_prev is a snapshot of P taken before the stage.

Prompt initialisation: L rows drawn (seeded, without replacement) from the embeddings of the first
``init_vocab`` (5000) non-special token ids (BPE merge order and sentencepiece score order approximate
frequency; the official draws from a T5 token-frequency table we do not have); before stage 0 the first
rows become the mean embedding of the first task's name and of each of its labels, as in the official (which
also puts the phrase "sentence classification" first: not every task here is a classification).

Hooks: ``families`` (generative only), ``peft_config`` (``PromptMethod``'s frozen placeholder LoRA), the
backbone input hook (the prefix), ``before_task`` (snapshot, pseudo-samples, the stage's stream),
``extra_loss`` (``lfpt5_lm``, ``lfpt5_kl``), ``after_task`` (the finished-task registry),
``state_dict`` (previous prompt, pseudo-samples, registry, counts), ``diagnostics`` (kept, drawn and
why rejected, with a few rejected texts, per task and stage). The prompt is a submodule of the backbone
(``soft_prompt.weight``), saved with the adapters.

Deviations from the official code:
- The Trainer's batch does not say which task a row comes from, so the LM stream's rows are drawn (seeded,
  with replacement, ``batch_size`` a step) from the stage's training list, where the official pairs every
  task row with the LM row of the same example.
- KL runs on its own seeded draw of ``batch_size`` pseudo-samples each step, over the answer positions
  only, with dropout off in both passes (so it is exactly 0 when P = P_prev); the official takes the
  pseudo rows that fall in the task batch, sums over every target position, padding included, and runs
  in training mode.
- The losses are added: the official scales (CE + LM) by (1 - kl_weight), 0.99 at its default.
- Cue and separator are plain text: the official adds one new vocabulary token per task and ``__ans__``;
  here the vocabulary and the embeddings stay untouched.
- The prompt is a prefix (the house input hook; a decoder-only model reads nothing placed after the
  text); the official appends it after the input in T5's encoder.
- Sampling draws ``oversample`` (3) sequences per missing pseudo-sample for up to ``sample_rounds`` (2) rounds;
  the official draws 3 sequences per test-set row once (the test inputs are never read, only counted) and
  samples 2 per class among the valid ones. Generation and LM targets are capped at ``max_gen_tokens``
  (default ``--max-length`` + ``--max-target-length`` + 8); the official caps generation at 128 tokens and
  LM targets at 256, with inputs of at most 128.
- The optimiser and schedule are the run's (the Trainer's AdamW); the official uses Adafactor, lr 0.5,
  weight decay 1e-5, clipping 1.0, and keeps each task's best checkpoint on pseudo + real dev data.
- One process only: pseudo-samples must be identical on every process (refused in ``check_run``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from rkif.checks import AT_LEAST_ONE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE
from rkif.data import Example, Task
from rkif.methods.base import MethodConfig, PromptMethod, require_one_process
from rkif.methods.registry import register

logger = logging.getLogger(__name__)

CUE = "__gen__"          # the LM stream's source: CUE + " " + task name
SEPARATOR = "__ans__"    # between a generated prompt and its answer
SEPARATOR_TOKENS = 8     # room for the separator's tokens in the default token cap
REJECTS_SHOWN = 3        # rejected pseudo-samples kept per task and stage in the diagnostics, to see why
REJECT_CHARS = 300       # ... each cut to this many characters


@dataclass
class LFPT5Config(MethodConfig):
    prompt_length: int = 300          # L virtual tokens (official)
    lm_weight: float = 0.25           # weight of the LM stream (official lm_lambda)
    kl_weight: float = 0.01           # weight of the KL distillation (official kd_lamda)
    pseudo_per_class: int = 2         # pseudo-samples kept per label of a closed-label task (official)
    pseudo_per_task: int = 4          # pseudo-samples kept per free-text task (official summarization)
    oversample: int = 3               # sequences drawn per missing pseudo-sample in a round (official: 3 a row)
    sample_rounds: int = 2            # rounds of drawing before giving up on the missing ones
    top_k: int = 64                   # sampling (official)
    repetition_penalty: float = 2.5   # sampling (official)
    max_gen_tokens: int = 0           # tokens of a "prompt __ans__ answer" (LM target, sampling); 0: the
                                      # backbone's max_length + max_target_length + SEPARATOR_TOKENS
    init_vocab: int = 5000            # P's rows are drawn from the first init_vocab non-special token ids
    task_init: bool = True            # before stage 0 P's first rows embed the first task's name and labels

    method: ClassVar[str] = "lfpt5"

    def check(self) -> None:
        super().check()
        self.check_ranges({"prompt_length": AT_LEAST_ONE, "lm_weight": NON_NEGATIVE, "kl_weight": NON_NEGATIVE,
                           "pseudo_per_class": NON_NEGATIVE_INT, "pseudo_per_task": NON_NEGATIVE_INT,
                           "oversample": AT_LEAST_ONE, "sample_rounds": AT_LEAST_ONE, "top_k": AT_LEAST_ONE,
                           "repetition_penalty": POSITIVE, "max_gen_tokens": NON_NEGATIVE_INT,
                           "init_vocab": AT_LEAST_ONE})

    def check_run(self, run) -> None:
        require_one_process(self.method)


class SoftPrompt(nn.Module):
    """The prompt P [L, d], one row per virtual token."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(rows)


# -- pure functions ------------------------------------------------------------------------------
def cue(task: str) -> str:
    """The LM stream's source for ``task``."""
    return f"{CUE} {task}"


def lm_target(prompt: str, answer: str) -> str:
    """What the LM stream learns to generate for an example: its prompt (as the model reads it: cut to
    ``--max-length`` as the backbone cuts it, so the separator and answer always fit), the separator, its answer."""
    return f"{prompt} {SEPARATOR} {answer}"


def parse_pseudo(text: str, task: str) -> Example | None:
    """A generated ``prompt __ans__ answer`` as an example of ``task`` (the prompt as its input); None unless
    the text holds exactly one separator with a non-empty prompt before it and a non-empty answer after."""
    parts = text.split(SEPARATOR)
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        return None
    return Example(task, parts[0].strip(), parts[1].strip())


def frequent_ids(tokenizer, vocab_size: int, count: int) -> list[int]:
    """The first ``count`` token ids that are not special tokens (a proxy for the most frequent tokens)."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(vocab_size) if i not in special][:count]


def answer_logits(backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, V]: the logits that predict each answer token of ``batch`` (``collate`` layout), input hooks applied.

    A causal model computes the logits of the batch's own columns only, none for the prefix's (SmolLM2-135M
    spends a fifth of a position's forward in its 49k-row output layer, and 300 of about 450 positions are
    prefix), and no loss; its input hook then sees the whole row as the prompt (LFPT5's prefix ignores it)."""
    labels = batch["labels"]
    if backbone.family == "causal":          # token t + 1 is predicted at t; the prefix adds columns in front
        logits = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                logits_to_keep=labels.shape[1]).logits
        logits, labels = logits[:, :-1], labels[:, 1:]
    else:
        logits = backbone.model(**batch).logits
    return logits[labels != -100]


def answer_kl(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """sum_positions KL(softmax(previous) || softmax(current)) over the vocabulary: the official
    ``kl_div(current.log(), previous, reduction='sum')``, computed in log space (float32)."""
    return nn.functional.kl_div(torch.log_softmax(current.float(), -1), torch.log_softmax(previous.float(), -1),
                                reduction="sum", log_target=True)


@register
class LFPT5(PromptMethod):
    name = "lfpt5"
    config_class = LFPT5Config

    def __init__(self, config: LFPT5Config, backbone, run):
        super().__init__(config, backbone, run)                         # frozen backbone, placeholder LoRA off
        embedding = self.embedding
        pool = torch.tensor(frequent_ids(backbone.tokenizer, embedding.shape[0], config.init_vocab))
        g = torch.Generator().manual_seed(run.seed)
        pick = (torch.randperm(len(pool), generator=g)[:config.prompt_length] if config.prompt_length <= len(pool)
                else torch.randint(len(pool), (config.prompt_length,), generator=g))
        backbone.soft_prompt = SoftPrompt(embedding[pool[pick].to(embedding.device)].clone())
        self.check_frozen(["soft_prompt.weight"])
        self.prompt: SoftPrompt = backbone.soft_prompt
        backbone.add_input_hook(self._prefix, prefix_length=config.prompt_length)
        self.previous: torch.Tensor | None = None       # P_prev [L, d], from stage 1 on
        self.finished: list[dict] = []                  # {"name", "labels", "free_text"} of each finished task
        self.pseudo: list[Example] = []                 # the current stage's pseudo-samples
        self.pseudo_log: list[dict] = []                # per stage: kept / drawn / wanted per earlier task
        self.stream: list[Example] = []                 # the stage's training list (LM rows are drawn from it)
        self._draws: torch.Generator | None = None
        self._use_previous = False

    @property
    def gen_tokens(self) -> int:
        """Tokens of a generated (or LM-trained) ``prompt __ans__ answer``."""
        cfg = self.backbone.config
        return self.config.max_gen_tokens or cfg.max_length + cfg.max_target_length + SEPARATOR_TOKENS

    # -- the prompt -----------------------------------------------------------------------------
    def _prefix(self, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Input hook: P (or, inside the KL's teacher pass, P_prev) before every sequence [B, L, d]."""
        prompt = self.previous if self._use_previous else self.prompt.weight
        return prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1)

    def init_from_tasks(self, tasks: list[Task]) -> None:
        """The first rows of P: the mean embedding of each task's name and of each of its labels (official)."""
        texts = [t for task in tasks for t in [task.name.replace("_", " ")] + ([] if task.free_text else task.labels)]
        rows = []
        for text in texts[:self.config.prompt_length]:
            ids = self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                rows.append(self.embedding[torch.tensor(ids, device=self.embedding.device)].mean(0))
        if rows:
            with torch.no_grad():
                self.prompt.weight[:len(rows)] = torch.stack(rows)

    # -- pseudo-samples -------------------------------------------------------------------------
    def sample_task(self, task: dict) -> tuple[list[Example], dict]:
        """Pseudo-samples of a finished task from the current prompt, and what was drawn: ``drawn``, the
        rejected ``malformed`` (not one separator with text on both sides) and ``off_label`` (an answer
        outside the task's labels), and up to ``REJECTS_SHOWN`` rejected texts (``rejected``)."""
        closed = not task["free_text"]
        room = ({label: self.config.pseudo_per_class for label in task["labels"]} if closed
                else {None: self.config.pseudo_per_task})
        kept, tally = [], {"drawn": 0, "malformed": 0, "off_label": 0, "rejected": []}
        for _ in range(self.config.sample_rounds):
            missing = sum(room.values())
            if not missing:
                break
            texts = self.backbone.sample_text([cue(task["name"])] * (missing * self.config.oversample),
                                              self.gen_tokens, top_k=self.config.top_k,
                                              repetition_penalty=self.config.repetition_penalty)
            tally["drawn"] += len(texts)
            for text in texts:
                ex = parse_pseudo(text, task["name"])
                slot = None if ex is None or not closed else ex.output
                if ex is None or slot not in room:            # an answer outside the label set has no room
                    tally["malformed" if ex is None else "off_label"] += 1
                    if len(tally["rejected"]) < REJECTS_SHOWN:
                        tally["rejected"].append(text[:REJECT_CHARS])
                elif room[slot] > 0:
                    room[slot] -= 1
                    kept.append(ex)
        return kept, tally

    def generate(self, stage: int) -> list[Example]:
        """Pseudo-samples of every finished task, sampled with the seed ``run.seed + stage``."""
        pseudo, counts = [], {}
        with torch.random.fork_rng():
            torch.manual_seed(self.run.seed + stage)
            for task in self.finished:
                kept, tally = self.sample_task(task)
                wanted = (self.config.pseudo_per_task if task["free_text"]
                          else self.config.pseudo_per_class * len(task["labels"]))
                counts[task["name"]] = {"kept": len(kept), "wanted": wanted, **tally}
                logger.info("%s stage %d: kept %d of %d sampled pseudo-samples of %s (wanted %d; rejected: %d "
                            "malformed, %d with an answer outside its labels)%s", self.name, stage, len(kept),
                            tally["drawn"], task["name"], wanted, tally["malformed"], tally["off_label"],
                            f"; e.g. {tally['rejected'][0]!r}" if tally["rejected"] else "")
                pseudo += kept
        self.pseudo_log.append({"stage": stage, "tasks": counts})
        return pseudo

    # -- runner hooks ---------------------------------------------------------------------------
    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        if stage == 0 and self.config.task_init:
            self.init_from_tasks(tasks)
        self.pseudo = []
        if stage > 0:
            self.previous = self.prompt.weight.detach().clone()
            self.pseudo = self.generate(stage)
        self.stream = train + self.pseudo
        self._draws = torch.Generator().manual_seed(self.run.seed + stage)
        return self.stream

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        known = {t["name"] for t in self.finished}
        self.finished += [{"name": t.name, "labels": [] if t.free_text else list(t.labels), "free_text": t.free_text}
                          for t in tasks if t.name not in known]

    # -- losses ---------------------------------------------------------------------------------
    def _draw(self, pool: list[Example]) -> list[Example]:
        idx = torch.randint(len(pool), (self.run.batch_size,), generator=self._draws)
        return [pool[i] for i in idx.tolist()]

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.backbone.device) for k, v in batch.items()}

    def lm_loss(self, rows: list[Example]) -> torch.Tensor:
        """The LM stream's loss on ``rows``: each row's ``prompt __ans__ answer`` given its task's cue."""
        targets = [lm_target(self.backbone.prompt_text(ex), ex.output) for ex in rows]
        batch = self.backbone.text_batch([cue(ex.task) for ex in rows], targets, self.gen_tokens)
        return self.backbone(**self._on_device(batch))["loss"]

    def distillation(self, rows: list[Example]) -> torch.Tensor:
        """KL(P_prev || P) summed over the answer positions of ``rows``; dropout off, P_prev without grad."""
        batch = self._on_device(self.backbone.collate(rows))
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                self._use_previous = True
                previous = answer_logits(self.backbone, batch)
            self._use_previous = False
            current = answer_logits(self.backbone, batch)
        finally:
            self._use_previous = False
            self.backbone.train(was_training)
        return answer_kl(current, previous)

    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        """lm_weight * the LM stream on drawn rows; kl_weight * KL on drawn pseudo-samples (from stage 1)."""
        terms = {}
        if self.stream and self.config.lm_weight:
            terms["lfpt5_lm"] = self.config.lm_weight * self.lm_loss(self._draw(self.stream))
        if self.pseudo and self.previous is not None and self.config.kl_weight:
            terms["lfpt5_kl"] = self.config.kl_weight * self.distillation(self._draw(self.pseudo))
        return terms

    # -- state ----------------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        return {"pseudo_samples": list(self.pseudo_log)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """P is an adapter tensor (the runner saves it); here P_prev, the pseudo-samples and the registry."""
        tensors = {} if self.previous is None else {"previous_prompt": self.previous.detach().cpu()}
        return tensors, {"finished": list(self.finished), "pseudo": [asdict(ex) for ex in self.pseudo],
                         "pseudo_log": list(self.pseudo_log)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        previous = tensors.get("previous_prompt")
        self.previous = None if previous is None else previous.to(self.prompt.weight.device)
        self.finished = [dict(t) for t in meta["finished"]]
        self.pseudo = [Example(**ex) for ex in meta["pseudo"]]
        self.pseudo_log = list(meta.get("pseudo_log", []))
