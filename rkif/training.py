"""The stock ``transformers.Trainer``, extended (not copied) to call a method's hooks.

``ContinualTrainer`` adds the method's extra loss terms in ``compute_loss`` and logs them in
``log``; ``ConsoleCallback`` draws the stage's progress bar and writes the log dicts to ``log.jsonl``;
``MethodCallback`` forwards the Trainer's events to the method together with the trainer,
so methods see the accelerator, the optimizer and the wrapped model. Gradient accumulation, mixed
precision and distributed training are the Trainer's and keep working; before the first step,
``rkif.sharding.check_distribution`` stops a method that cannot run on the Trainer's FSDP or DeepSpeed.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from rkif.backbones import Backbone
from rkif.config import RunConfig
from rkif.console import TRAINER_LOG, progress_options
from rkif.data import Example
from rkif.methods import Method
from rkif.precision import resolve_precision
from rkif.sharding import check_distribution, prepare_again


def training_device() -> torch.device:
    """Where the Trainer trains in this process: accelerate's device (``cuda:LOCAL_RANK`` under torchrun; the
    CPU without an accelerator or with ``ACCELERATE_USE_CPU=1``, as the Trainer reads it)."""
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)           # also joins torchrun's process group, as the Trainer will
    return torch.device("cpu") if cpu else state.device     # the CPU decided here, not by an earlier run's state


class ConsoleCallback(TrainerCallback):
    """A progress bar over the stage's optimizer steps and the Trainer's logs written to ``log.jsonl``.

    Each record is ``{"stage_index", "tasks", "step", **logs}``: ``step`` restarts with every stage, so
    ``stage_index`` (0-based, as ``checkpoints/stage_<j>`` and results.json's ``stage_log``; the terminal's
    ``train <j + 1>``) and ``tasks`` (the stage's task names joined by ``+``) tell the stages apart.
    """

    def __init__(self, desc: str, stage_index: int = 0, tasks: str | None = None):
        self.desc = desc
        self.stage = {"stage_index": stage_index, "tasks": tasks}
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kw):
        self.log_path = Path(args.output_dir) / "log.jsonl"
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True,
                        disable=not state.is_local_process_zero, **progress_options())

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps({**self.stage, "step": state.global_step, **logs}) + "\n")
        if "loss" in logs:
            self.postfix["loss"] = f"{float(logs['loss']):.3f}"
        for key, value in logs.items():
            if key.endswith("/round"):
                self.postfix[key.rsplit("/", 1)[0] + " round"] = str(value)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            if TRAINER_LOG.isEnabledFor(logging.INFO):
                self.bar.write(json.dumps(logs))       # through tqdm, so the bar is redrawn below it

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MethodCallback(TrainerCallback):
    """Forwards Trainer events to ``method.on_<event>(trainer)``.

    A Trainer does not tell its callbacks who it is, and a method needs it (the accelerator, the
    optimizer, ``log``): pass the Trainer here, or ``attach`` the callback to a Trainer built without it.
    """

    def __init__(self, method: Method, trainer: Trainer | None = None):
        self.method = method
        self.trainer = trainer

    def attach(self, trainer: Trainer) -> Trainer:
        """Add this callback to ``trainer`` (once) and forward that Trainer's events; returns the Trainer."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        prepare_again(trainer)                  # its model may be sharded (FSDP2) by the previous task's Trainer
        self.trainer = trainer
        return trainer

    def check_attached(self, state) -> None:
        """Refuse to follow a Trainer this callback was not given (``state`` is the training Trainer's)."""
        if self.trainer is None or state is not self.trainer.state:
            raise RuntimeError(f"{type(self).__name__} is not attached to the Trainer that trains: "
                               "call callback.attach(trainer) before trainer.train()")

    def on_train_begin(self, args, state, control, **kw):
        self.check_attached(state)
        check_distribution(self.method, self.trainer)      # FSDP, DeepSpeed: before the first step
        self.method.on_train_begin(self.trainer)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.method.on_pre_optimizer_step(self.trainer)

    def on_optimizer_step(self, args, state, control, **kw):
        self.method.on_optimizer_step(self.trainer)

    def on_step_end(self, args, state, control, **kw):
        self.method.on_step_end(self.trainer)

    def on_train_end(self, args, state, control, **kw):
        self.method.on_train_end(self.trainer)


class ContinualTrainer(Trainer):
    """A Trainer that lets a continual-learning method add loss terms and follow every step."""

    def __init__(self, *args, method: Method, **kwargs):
        super().__init__(*args, **kwargs)
        prepare_again(self)                     # a model sharded (FSDP2) by the previous stage's Trainer
        self.method = method
        self._extra_logs: dict[str, list[float]] = defaultdict(list)
        self.add_callback(MethodCallback(method, self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        for name, term in self.method.extra_loss(model, inputs).items():
            loss = loss + term
            self._extra_logs[name].append(term.detach().item())
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches from the backbone's token counts (the stock sampler needs dict items)."""
        grouped = (getattr(self.args, "train_sampling_strategy", None) == "group_by_length"
                   or getattr(self.args, "group_by_length", False))        # the name before transformers 5
        if not grouped:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        lengths = [self.model.example_length(ex) for ex in dataset]
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=lengths)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        for name, values in self._extra_logs.items():
            logs[name] = sum(values) / len(values)
        self._extra_logs.clear()
        super().log(logs, *args, **kwargs)


def training_arguments(run: RunConfig, stage: int, workdir: str) -> TrainingArguments:
    """TrainingArguments of one stage; the seed depends only on (run seed, stage) for resumability."""
    precision = resolve_precision(run.precision)
    return TrainingArguments(
        output_dir=workdir,
        per_device_train_batch_size=run.batch_size,
        gradient_accumulation_steps=run.grad_accum,
        learning_rate=run.lr,
        num_train_epochs=run.epochs,
        max_steps=run.max_steps or -1,
        lr_scheduler_type=run.lr_scheduler,
        warmup_steps=run.warmup_steps,
        weight_decay=run.weight_decay,
        max_grad_norm=run.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **_length_grouping(run.group_by_length),
        seed=run.seed + stage,
        data_seed=run.seed + stage,
        save_strategy="no",
        report_to=run.report_to,
        logging_steps=5,                                # the progress bar's live loss
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.accelerator.is_available(),   # CPU-only: lets torchrun/accelerate run DDP on gloo
        disable_tqdm=False,
    )


def _length_grouping(on: bool) -> dict:
    """The TrainingArguments setting for length-grouped batches, under its current or its older name."""
    if "train_sampling_strategy" in {f.name for f in fields(TrainingArguments)}:
        return {"train_sampling_strategy": "group_by_length" if on else "random"}
    return {"group_by_length": on}


def train_stage(backbone: Backbone, data: list[Example], method: Method, run: RunConfig,
                stage: int, workdir: str, desc: str | None = None, tasks: str | None = None) -> dict:
    """Train one stage with a fresh optimizer and schedule (as every reference code does); the terminal
    shows one progress bar (``desc``), the Trainer's logs go to ``workdir/log.jsonl`` (``rkif.console``),
    each record with the stage's 0-based index and ``tasks`` (its task names joined by ``+``)."""
    trainer = ContinualTrainer(model=backbone, args=training_arguments(run, stage, workdir),
                               train_dataset=data, data_collator=backbone.collate, method=method)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ConsoleCallback(desc or f"train stage {stage + 1}", stage, tasks))
    result = trainer.train()
    return {"steps": result.global_step, "train_loss": result.training_loss,
            "train_seconds": result.metrics.get("train_runtime")}

