"""The method interface: a plain object whose hooks the runner and the Trainer call at named moments.

Every hook is a documented no-op, so a method overrides only the moments it needs:

=========================  =====================================================================
``peft_config`` (class)     the adapter to attach (default: the backbone's LoRA)
``stages(tasks)``           how the sequence is trained: one stage per task (default) or fewer
``before_task``             before a stage trains; returns the training examples (replay mixes here)
``on_train_begin``          Trainer built, optimizer ready (``trainer.optimizer``)
``extra_loss``              added to the task loss in ``ContinualTrainer.compute_loss``
``on_pre_optimizer_step``   gradients accumulated, clipped and unscaled; weights not yet stepped
``on_optimizer_step``       weights stepped, gradients still present
``on_step_end``             after the scheduler step and ``zero_grad``
``on_train_end``            training of the stage is over
``after_task``              after training, before evaluation (memory, Fisher, snapshots)
``state_dict``              what resuming after this stage needs (tensors + JSON meta)
=========================  =====================================================================

``parameter_access`` (class) says where the method can run (checked by ``rkif.sharding`` before the
first step): ``"loss"`` (data and loss only), ``"shards"`` (correct on FSDP2's local shards) or
``"whole"`` (the default: whole parameters on every process, so not under FSDP or DeepSpeed).
``families`` (class) names the backbone families the method applies to (default None: every one); the
runner refuses another before the model loads, and ``rkif methods`` lists it.

``PromptMethod`` is the base of the methods that train prompt embeddings on a frozen generative backbone
(L2P, LFPT5): a frozen placeholder LoRA that never runs, and a check that only their prompt tensors train.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft import LoraConfig

from rkif.checks import Rule, check_choice, check_rules, check_type, check_types, describe, fail, field_types
from rkif.data import Example, ReplayMemory, Task, resolve_task_names

if TYPE_CHECKING:
    from transformers import Trainer

    from rkif.backbones import Backbone, BackboneConfig
    from rkif.config import RunConfig


@dataclass
class MethodConfig:
    """Options shared by every method (none); subclasses add their own fields and their ranges in ``check``.

    A config checks itself when built (``__post_init__``), so a bad option is refused before a model loads.
    """

    method: ClassVar[str] = ""           # the method's name, for messages

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse a field of the wrong type; a subclass adds its ranges (``check_ranges``) and choices."""
        check_types(type(self), vars(self), self.label)

    def check_run(self, run: RunConfig) -> None:
        """Refuse options inconsistent with the run's settings (process count, backbone); none by default."""

    def check_ranges(self, rules: dict[str, Rule]) -> None:
        """Refuse a field outside its rule (``rkif.checks``), naming the method and the option."""
        check_rules(self, rules, self.label)

    def check_unused(self, used: dict[str, tuple[bool, str]]) -> None:
        """Refuse an option set away from its default where the other options make it unused
        (``used``: option -> (used?, when it is used)), rather than ignore it silently."""
        for name, (is_used, when) in used.items():
            default = type(self).__dataclass_fields__[name].default
            if not is_used and getattr(self, name) != default:
                raise fail(self.label(name), getattr(self, name), f"used only {when}; leave it out")

    @classmethod
    def label(cls, name: str) -> str:
        """How messages name an option: ``rkif option top_fraction=``."""
        return f"{cls.method or cls.__name__} option {name}="


def _kinds(hint: Any) -> tuple:
    """The types a field's hint allows: ``float | None`` -> (float, NoneType)."""
    return typing.get_args(hint) or (hint,)


def _from_text(label: str, text: str, hint: Any) -> Any:
    """A ``-O KEY=VALUE`` string as the field's type: bool (true/false, yes/no, 1/0), int, float or none."""
    allowed = _kinds(hint)
    if str in allowed:
        return text
    if type(None) in allowed and text.lower() in ("none", "null"):
        return None
    if bool in allowed:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise fail(label, text, "expected true or false")
        return text.lower() in ("true", "1", "yes")
    kind = int if int in allowed else float
    try:
        return kind(text)
    except ValueError:
        raise fail(label, text, f"expected {describe(hint)}") from None


def parse_options(config_cls: type[MethodConfig], options: dict[str, Any]) -> MethodConfig:
    """Build (and so check) a method config from ``{field: value}``; strings are read as the field's type."""
    hints = field_types(config_cls)
    unknown = sorted(set(options) - set(hints))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {config_cls.__name__}; known: {sorted(hints)}")
    values = {}
    for key, value in options.items():
        label = config_cls.label(key)
        if isinstance(value, str):
            value = _from_text(label, value.strip(), hints[key])
        check_type(label, value, hints[key])
        if type(value) is int and int not in _kinds(hints[key]):
            value = float(value)                    # a float option given as 2 is 2.0
        values[key] = value
    return config_cls(**values)


def check_choices(method: str, config: Any, choices: dict[str, tuple]) -> None:
    """Refuse a string option outside its allowed values, naming the method and the option."""
    for field_name, allowed in choices.items():
        check_choice(f"{method} option {field_name}=", getattr(config, field_name), allowed)


GENERATIVE_FAMILIES = ("causal", "seq2seq")


def require_family(method: str, family: str, allowed: tuple[str, ...] = GENERATIVE_FAMILIES) -> None:
    """Refuse a backbone family the method cannot apply to, naming both (before the model loads)."""
    if family not in allowed:
        raise ValueError(f"method {method} cannot run on the {family} family: it needs a "
                         f"{' or '.join(allowed)} backbone")


def scale_rows(out: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """``out`` [R, ...] times one weight per sequence, ``weights`` [B] (an adapter's gate): R is B, or a multiple
    of it where rank mode and sampling repeat each prompt's rows (prompt b's rows are next to each other)."""
    rows, sequences = out.shape[0], weights.shape[0]
    if rows != sequences:
        if rows % sequences:
            raise RuntimeError(f"{method}: batch of {rows} rows for {sequences} prompts")
        weights = weights.repeat_interleave(rows // sequences)
    return out * weights.view(-1, *[1] * (out.dim() - 1)).to(out.dtype)


def task_count(run: RunConfig) -> int:
    """K, the number of tasks of the run (its explicit list, or its benchmark order)."""
    return len(run.tasks) if run.tasks else len(resolve_task_names(Path(run.data), run.benchmark, run.order))


def require_one_process(method: str) -> None:
    """Refuse a multi-process run for a method that samples its own training data (generative replay):
    each process would sample different pseudo-samples and train on different lists."""
    from rkif.config import process_count

    if process_count() > 1:
        raise ValueError(f"method {method} runs on one process (its pseudo-samples are sampled where "
                         f"they are trained), got {process_count()}; run it without torchrun")


class Method:
    """Base class of every continual-learning method (see the module docstring for the hooks)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = MethodConfig
    parameter_access: ClassVar[str] = "whole"     # "loss" | "shards" | "whole": rkif.sharding.check_distribution
    families: ClassVar[tuple[str, ...] | None] = None   # the backbone families it applies to; None: every one

    def __init__(self, config: MethodConfig, backbone: Backbone, run: RunConfig):
        if self.families is not None:        # a backbone built by hand (the Trainer callback's has no family)
            self.check_family(backbone.family)
        self.config = config
        self.backbone = backbone
        self.run = run

    @classmethod
    def check_family(cls, family: str) -> None:
        """Refuse a backbone family outside ``families``, naming both (the runner calls it before the model
        loads)."""
        if cls.families is not None:
            require_family(cls.name, family, cls.families)

    @classmethod
    def peft_config(cls, config: MethodConfig, backbone: BackboneConfig):
        """The adapter this method trains: None means the backbone's LoRA (r, alpha, targets)."""
        return None

    # -- runner hooks ---------------------------------------------------------------------------
    def stages(self, tasks: list[Task]) -> list[list[Task]]:
        return [[t] for t in tasks]

    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        return train

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        pass

    # -- trainer hooks --------------------------------------------------------------------------
    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        return {}

    def on_train_begin(self, trainer: Trainer) -> None:
        pass

    def on_pre_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def on_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass

    # -- state and reporting --------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (saved as safetensors) and JSON-able meta needed to resume after a stage."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass

    def diagnostics(self) -> dict:
        """JSON-able per-run diagnostics written into results.json (empty by default)."""
        return {}


class MemoryMethod(Method):
    """A method with a replay memory of every finished task (class-balanced, ``run.memory_fraction``)."""

    def __init__(self, config: MethodConfig, backbone: Backbone, run: RunConfig):
        super().__init__(config, backbone, run)
        self.memory = ReplayMemory(run.memory_fraction, run.seed)

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        for task in tasks:
            self.memory.add(task.name, task.split("train"))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {"memory": self.memory.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.memory.load_state_dict(meta["memory"])


class PromptMethod(Method):
    """A method whose only trainable tensors are prompt embeddings prepended to a frozen generative backbone.

    peft needs an adapter to wrap the model: ``peft_config`` gives a frozen rank-1 LoRA (B = 0, no effect),
    and ``__init__`` disables it, so it never runs. Generative families only.
    """

    families = GENERATIVE_FAMILIES

    @classmethod
    def peft_config(cls, config: MethodConfig, backbone: BackboneConfig) -> LoraConfig:
        return LoraConfig(r=1, lora_alpha=1, target_modules=backbone.lora_targets, inference_mode=True)

    def __init__(self, config: MethodConfig, backbone: Backbone, run: RunConfig):
        super().__init__(config, backbone, run)
        backbone.model.base_model.disable_adapter_layers()              # the placeholder never runs

    @property
    def embedding(self) -> torch.Tensor:
        """The frozen input-embedding matrix [V, d] (prompts are initialised from its rows)."""
        return self.backbone.model.get_base_model().get_input_embeddings().weight.detach()

    def check_frozen(self, expected: list[str]) -> None:
        """Refuse a backbone whose trainable parameters are not exactly ``expected`` (the method's prompts)."""
        trainable = sorted(self.backbone.trainable_parameters())
        if trainable != sorted(expected):
            raise RuntimeError(f"{self.name}: the backbone is not frozen, trainable: {trainable[:4]}")
