"""What a backbone is made of (``BackboneConfig``): importable without torch, so the CLI's parser and
``--help`` start at once; the families themselves are in ``base`` and the family modules."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from rkif.backbones.sources import family_from_name, infer_family, position_limit
from rkif.checks import AT_LEAST_ONE, NOT_EMPTY, POSITIVE, Rule, check_choice, check_rules, check_types, fail, flag

FAMILY_NAMES = ("encoder", "seq2seq", "causal")     # the keys of rkif.backbones.families()
PROMPT_FORMATS = ("raw", "chat")
ANSWER_MODES = ("generate", "rank")
ANSWER_SPACES = ("all", "task")


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
        check_types(BackboneConfig, vars(self), flag)
        check_rules(self, {"model": NOT_EMPTY, "max_length": AT_LEAST_ONE, "max_target_length": AT_LEAST_ONE,
                           "lora_r": AT_LEAST_ONE, "lora_alpha": AT_LEAST_ONE, "eval_batch_size": AT_LEAST_ONE,
                           "lora_dropout": Rule(lambda v: 0 <= v < 1, "expected a probability in [0, 1)"),
                           "logit_scale": POSITIVE}, flag)
        check_choice(flag("family"), self.family, sorted(FAMILY_NAMES))
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
