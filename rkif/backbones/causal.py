"""Decoder-only backbone (LLaMA/GPT family): prompt masked from the loss; greedy generation or rank classification.

Token layout of one example (``prompt_format``):

- ``raw`` (the paper's LLaMA setting): ``instruction + input`` then ``" " + label + EOS``;
- ``chat``: the tokenizer's chat template around ``instruction + input`` as the user turn
  (generation prompt included), then ``label + EOS`` as the assistant's answer.

In ``raw`` a prompt that ends in a space (SuperNI's ``"Output: "``) leaves that space to the answer, whose
tokens start with it: the model reads ``"Output: answer"`` tokenized as a BPE tokenizer writes it.

A prompt longer than ``max_length`` tokens keeps its instruction (the options), the head of its input
and the input's last ``TAIL_TOKENS`` tokens (the benchmark's "Answer:" cue), cutting the middle.

Answers (``answer_mode``):

- ``generate`` (default, the paper's protocol): greedy decoding, stopped at EOS and after the longest
  answer of the run's tasks (its tokens + EOS, at most ``max_target_length`` + 1), so an answer cannot
  run away; the task's metric (exact match, ROUGE-L) scores the decoded string. Batches are sorted by
  prompt length, so little padding is decoded.
- ``rank``: rank classification, the candidate with the highest log-likelihood (answer tokens + EOS,
  summed) given the prompt; candidates are every label of the run (``answer_space="all"``) or the
  example's task's labels (``"task"``). The prompt runs once; its key/value cache is repeated for the
  candidates, so C candidates cost one prompt pass and C short answer passes. Tasks with free-text
  answers (SuperNI) have no candidates to rank: refused.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from rkif.backbones.base import Backbone, BackboneConfig, InputHook, call_input_hook, prepend
from rkif.backbones.config import ANSWER_MODES, PROMPT_FORMATS
from rkif.backbones.sources import loading, resolve_model
from rkif.data import Example, Task

TAIL_TOKENS = 8            # the end of an input kept when its middle is cut
RANK_ROWS = 256            # rank mode: at most this many (example, candidate) rows share one prompt cache
_SLOT = "\x00RKIF_PROMPT\x00"


def load_tokenizer(model: str):
    """The tokenizer of ``--model`` (hub name, folder, GGUF file or ``smollm2``)."""
    source = resolve_model(model)
    with loading(model):
        return AutoTokenizer.from_pretrained(source.path, **source.kwargs())


def load_causal_lm(model: str):
    """The causal LM of ``--model``; a GGUF file is dequantised to float32 by transformers."""
    source = resolve_model(model)
    with loading(model):
        return AutoModelForCausalLM.from_pretrained(source.path, **source.kwargs())


class CausalBackbone(Backbone):
    family = "causal"
    length_sorted_prediction = True

    def __init__(self, cfg: BackboneConfig, model=None, tokenizer=None, peft_config=None):
        for key, allowed in (("prompt_format", PROMPT_FORMATS), ("answer_mode", ANSWER_MODES)):
            if getattr(cfg, key) not in allowed:
                raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)!r}: choose from {', '.join(allowed)}")
        tokenizer = tokenizer or load_tokenizer(cfg.model)
        model = model or load_causal_lm(cfg.model)
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {cfg.model!r} has no eos token; a causal backbone needs one")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(self.wrap(model, cfg, "CAUSAL_LM", peft_config), tokenizer, cfg)
        self.prefix, self.suffix = self._template(cfg.prompt_format)
        self.answer_limit = cfg.max_target_length + 1     # new tokens generated; set_answer_space tightens it
        self.candidates: list[str] = []
        self.task_candidates: dict[str, list[int]] = {}
        self._prompt_cache: dict[tuple[str, str, int], list[int]] = {}     # (instruction, input, max_length)

    # -- tokens -----------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _template(self, fmt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the prompt text: none for ``raw``, the chat template's for ``chat``."""
        if fmt == "raw":
            return [], []
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"--prompt-format chat: the tokenizer of {self.config.model!r} has no chat template")
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], tokenize=False,
                                                  add_generation_prompt=True)
        before, after = text.split(_SLOT)
        return self._encode(before), self._encode(after)

    def prompt_ids(self, ex: Example) -> list[int]:
        """The prompt's tokens, at most ``max_length``: the middle of a long input is cut (see module doc)."""
        key = (ex.instruction, ex.input, self.config.max_length)
        if key not in self._prompt_cache:
            text = ex.input.removesuffix(" ") if self.config.prompt_format == "raw" else ex.input
            instruction, text = self._encode(ex.instruction), self._encode(text)
            budget = self.config.max_length - len(self.prefix) - len(self.suffix) - len(instruction)
            if len(text) > budget:
                if budget < 2 * TAIL_TOKENS:
                    raise ValueError(f"--max-length {self.config.max_length} leaves {budget} tokens for an input of "
                                     f"task {ex.task!r} after its instruction and template; raise it")
                text = text[:budget - TAIL_TOKENS] + text[-TAIL_TOKENS:]
            self._prompt_cache[key] = self.prefix + instruction + text + self.suffix
        return self._prompt_cache[key]

    def prompt_text(self, ex: Example) -> str:
        """The cut prompt (``prompt_ids``) decoded, without the chat template's tokens."""
        ids = self.prompt_ids(ex)
        return self.tokenizer.decode(ids[len(self.prefix):len(ids) - len(self.suffix)])

    def answer_ids(self, label: str) -> list[int]:
        """The answer's tokens (at most ``max_target_length``) followed by EOS."""
        text = label if self.config.prompt_format == "chat" else " " + label
        return self._encode(text)[:self.config.max_target_length] + [self.tokenizer.eos_token_id]

    def set_answer_space(self, tasks: list[Task]) -> None:
        """Cap generation at the longest answer of the run (tokens + EOS); rank mode's candidate labels."""
        free = [t.name for t in tasks if t.free_text]
        if free and self.config.answer_mode == "rank":
            raise ValueError(f"--answer-mode rank ranks a closed label set; task(s) {free[:3]} have free-text "
                             "answers: use --answer-mode generate")
        self.candidates = sorted({label for t in tasks for label in t.labels})
        index = {c: i for i, c in enumerate(self.candidates)}
        self.task_candidates = {t.name: [index[label] for label in t.labels] for t in tasks}
        if self.candidates:
            self.answer_limit = max(len(self.answer_ids(c)) for c in self.candidates)

    # -- training ---------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Right-padded prompt + answer + EOS; labels are -100 on the prompt and the padding."""
        rows, targets = [], []
        for ex in examples:
            prompt, answer = self.prompt_ids(ex), self.answer_ids(ex.output)
            rows.append(prompt + answer)
            targets.append([-100] * len(prompt) + answer)
        input_ids, mask = self._pad(rows, left=False)            # on the CPU: the DataLoader pins and moves them
        labels, _ = self._pad(targets, left=False, value=-100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def prompt_length(self, ex: Example) -> int:
        return len(self.prompt_ids(ex))

    def example_length(self, ex: Example) -> int:
        return len(self.prompt_ids(ex)) + len(self.answer_ids(ex.output))

    def forward(self, input_ids, attention_mask, labels) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return {"loss": out.loss}

    def _pad(self, rows: list[list[int]], left: bool, value: int | None = None,
             device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and attention mask (on ``device``, default CPU)."""
        value = self.tokenizer.pad_token_id if value is None else value
        width = max(map(len, rows))
        padded = [[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r))
                for r in rows]
        return torch.tensor(padded, device=device), torch.tensor(mask, device=device)

    # -- free text (generator streams) -------------------------------------------------------------
    def _source_ids(self, text: str) -> list[int]:
        if not text:
            raise ValueError("a causal free-text source must not be empty (the first target token needs context)")
        return self._encode(text)[-self.config.max_length:]

    def text_batch(self, sources: list[str], targets: list[str], max_target_tokens: int) -> dict[str, torch.Tensor]:
        """See ``Backbone.text_batch``: ``source + " " + target + EOS``, right-padded, labels -100 on the source."""
        rows, labels = [], []
        for source, target in zip(sources, targets, strict=True):
            src = self._source_ids(source)
            tgt = self._encode(" " + target)[:max_target_tokens] + [self.tokenizer.eos_token_id]
            rows.append(src + tgt)
            labels.append([-100] * len(src) + tgt)
        input_ids, mask = self._pad(rows, left=False)
        labels, _ = self._pad(labels, left=False, value=-100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def sample_batch(self, sources: list[str], max_new_tokens: int, num_return_sequences: int,
                     sampling: dict) -> list[str]:
        """See ``Backbone.sample_text``. ``generate`` would apply a ``repetition_penalty`` to the source's tokens
        too (they are in ``input_ids`` here): it runs as a processor that skips them, so only generated tokens
        are penalised, as an encoder-decoder does."""
        input_ids, mask = self._pad([self._source_ids(s) for s in sources], left=True, device=self.device)
        sampling, processors = dict(sampling), LogitsProcessorList()
        penalty = sampling.pop("repetition_penalty", None)
        if penalty is not None and penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=input_ids.shape[1]))
            sampling["repetition_penalty"] = 1.0                # no second, source-reading processor
        ids = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=True, num_beams=1, num_return_sequences=num_return_sequences,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                  synced_gpus=self.sharded, logits_processor=processors, **sampling)
        return [s.strip() for s in self.tokenizer.batch_decode(ids[:, input_ids.shape[1]:], skip_special_tokens=True)]

    # -- input hook (prompt and routing methods) -------------------------------------------------
    def add_input_hook(self, hook: InputHook, prefix_length: int = 0) -> list:
        """See ``Backbone.add_input_hook``: a forward pre-hook on the language model. A call without a filled
        key/value cache starts new sequences (the prompt: attention mask and, in training, labels == -100);
        one with a filled cache continues them (its mask and positions shift by the prefix)."""
        lm = self.model.get_base_model()
        embed = lm.get_input_embeddings()
        p = prefix_length

        def before_forward(module, args, kwargs):
            if args:
                raise ValueError("input hooks expect the language model to be called with keyword arguments")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))      # renamed in transformers 5
            mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
            if mask is not None and not torch.is_tensor(mask):
                raise ValueError(f"input hooks need a 2-D attention mask tensor, got {type(mask).__name__}")
            if cache is None or cache.get_seq_length() == 0:               # new sequences
                ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
                if ids is None:
                    raise ValueError("input hooks need input_ids (the model was called with embeddings)")
                embeds = embed(ids)                                         # [B, T, d], frozen
                prompt = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
                if labels is not None:
                    prompt = prompt & (labels == -100)                      # the answer is not the prompt
                prefix = call_input_hook(hook, embeds, prompt, p)
                if prefix is None:
                    return None
                kwargs.update(input_ids=None, inputs_embeds=torch.cat([prefix, embeds], dim=1))
                if labels is not None:
                    kwargs["labels"] = prepend(-100, labels, p)
                if positions is not None:
                    kwargs["position_ids"] = torch.cat([torch.arange(p, device=positions.device).expand(
                        positions.shape[0], p), positions + p], dim=1)
            elif p:                                                         # decoding after a prefix
                if positions is not None:
                    kwargs["position_ids"] = positions + p
            else:
                return None
            if mask is not None:
                kwargs["attention_mask"] = prepend(1, mask, p)
            return args, kwargs

        return [lm.register_forward_pre_hook(before_forward, with_kwargs=True)]

    # -- answers ----------------------------------------------------------------------------------
    def predict_batch(self, examples: list[Example]) -> list[str]:
        if self.config.answer_mode == "rank":
            return self._rank(examples)
        input_ids, mask = self._pad([self.prompt_ids(ex) for ex in examples], left=True, device=self.device)
        ids = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.answer_limit,
                                  do_sample=False, num_beams=1, eos_token_id=self.tokenizer.eos_token_id,
                                  pad_token_id=self.tokenizer.pad_token_id, synced_gpus=self.sharded)
        answers = ids[:, input_ids.shape[1]:]
        return [s.strip() for s in self.tokenizer.batch_decode(answers, skip_special_tokens=True)]

    def candidate_log_likelihoods(self, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
        """[len(prompts), len(answers)] sums of answer-token log-probabilities, every answer after every prompt.

        The prompts run once (left-padded) and their key/value cache is repeated for the answers, so ranking C
        candidates costs one prompt pass plus C short answer passes instead of C full passes.
        """
        n, c = len(prompts), len(answers)
        ids, mask = self._pad(prompts, left=True, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)                    # [n, V]: answer token 0
        cache = out.cache if hasattr(out, "cache") else out.past_key_values           # renamed in transformers 5
        cache.batch_repeat_interleave(c)                                               # row i*c + j: prompt i
        ans, ans_mask = self._pad(answers, left=False, device=self.device)             # [c, L]
        ans_ids, ans_mask = ans.repeat(n, 1), ans_mask.repeat(n, 1)
        starts = mask.sum(-1).repeat_interleave(c)                                     # prompt lengths
        positions = starts[:, None] + torch.arange(ans.shape[1], device=ans.device)[None, :]
        logits = self.model(input_ids=ans_ids, attention_mask=torch.cat([mask.repeat_interleave(c, 0), ans_mask], 1),
                            position_ids=positions, **{self._cache_kwarg: cache}).logits[:, :-1].float()
        rest = torch.log_softmax(logits, dim=-1).gather(-1, ans_ids[:, 1:, None]).squeeze(-1)   # answer tokens 1..
        head = first.repeat_interleave(c, 0).gather(-1, ans_ids[:, :1]).squeeze(-1)
        total = head + (rest * ans_mask[:, 1:]).sum(-1)
        return total.view(n, c)

    @property
    def _cache_kwarg(self) -> str:
        forward = inspect.signature(self.model.get_base_model().forward).parameters
        return "cache" if "cache" in forward else "past_key_values"

    def _rank(self, examples: list[Example]) -> list[str]:
        if not self.candidates:
            raise ValueError("answer_mode='rank' needs the run's labels: call set_answer_space first")
        answers = [self.answer_ids(c) for c in self.candidates]
        group = max(1, RANK_ROWS // len(answers))              # examples per prompt pass: bounded cache copies
        scores = torch.cat([self.candidate_log_likelihoods([self.prompt_ids(ex) for ex in examples[k:k + group]],
                                                           answers) for k in range(0, len(examples), group)])
        if self.config.answer_space == "task":
            allowed = torch.zeros_like(scores, dtype=torch.bool)
            for i, ex in enumerate(examples):
                allowed[i, self.task_candidates[ex.task]] = True
            scores = scores.masked_fill(~allowed, float("-inf"))
        return [self.candidates[k] for k in scores.argmax(-1).tolist()]
