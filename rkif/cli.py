"""Command line: ``rkif run`` (one experiment), ``rkif report`` (tables and plots)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rkif.backbones import FAMILIES, BackboneConfig
from rkif.backbones.sources import MODEL_DEFAULTS
from rkif.config import RunConfig
from rkif.data import DataError, default_data_root

DEFAULT_OUTPUT = "runs/main"


def _size(text: str) -> int | None:
    return None if text.lower() in ("all", "none", "0") else int(text)


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--option {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    d, b = RunConfig(), BackboneConfig()
    p.add_argument("--method", default=d.method, help="method or preset name (see `rkif methods`)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. -O inner_steps=4 (repeatable)")
    p.add_argument("--model", default=b.model,
                   help="'minilm' (offline default), 'smollm2' (offline generative LM), a .gguf file, a local path "
                        "or a hub name")
    p.add_argument("--family", default="auto", choices=["auto", *sorted(FAMILIES)],
                   help="model family (default: inferred from the model)")
    p.add_argument("--data", default=None, help=f"data root (default: $RKIF_DATA or {default_data_root()})")
    p.add_argument("--benchmark", default=d.benchmark, choices=["standard", "long"])
    p.add_argument("--order", type=int, default=d.order, help="task order: 1-3 standard, 4-6 long")
    p.add_argument("--tasks", default=None, help="explicit comma-separated task list (overrides the order)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per task (overrides --epochs)")
    p.add_argument("--train-size", type=_size, default=d.train_size, help="examples per task ('all' for every one)")
    p.add_argument("--test-size", type=_size, default=d.test_size, help="test examples per task ('all')")
    p.add_argument("--eval-split", default=d.eval_split, choices=["test", "dev"])
    p.add_argument("--eval-scope", default=d.eval_scope, choices=["all", "seen+next"],
                   help="tasks evaluated after each task: all (full heatmap) or the seen ones and the next "
                        "(same OP/BWT/FWT; 134 of 225 evaluations on 15 tasks)")
    p.add_argument("--memory-fraction", type=float, default=d.memory_fraction)
    p.add_argument("--max-length", type=int, default=b.max_length)
    p.add_argument("--max-target-length", type=int, default=b.max_target_length)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--eval-batch-size", type=int, default=b.eval_batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--lora-r", type=int, default=b.lora_r)
    p.add_argument("--lora-alpha", type=int, default=b.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=b.lora_dropout)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: q,v of the family)")
    p.add_argument("--answer-space", default=b.answer_space, choices=["all", "task"],
                   help="encoder: score over all labels of the run (default) or the task's own")
    p.add_argument("--prompt-format", default=b.prompt_format, choices=["raw", "chat"],
                   help="causal: instruction+input as is (raw) or inside the tokenizer's chat template")
    p.add_argument("--answer-mode", default=b.answer_mode, choices=["generate", "rank"],
                   help="causal: greedy generation + exact match, or rank classification over the candidate labels")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp16", "auto"],
                   help="autocast for training and evaluation; auto: bf16 where the hardware has it, else fp32")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=d.group_by_length,
                   help="training batches of similar length")
    p.add_argument("--report-to", default=d.report_to, help="Trainer integration, e.g. tensorboard")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--resume", action="store_true", help="continue after the last finished task")


def config_from_args(a: argparse.Namespace) -> RunConfig:
    backbone = BackboneConfig(
        model=a.model, family=a.family, max_length=a.max_length, max_target_length=a.max_target_length,
        lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
        lora_targets=a.lora_targets.split(",") if a.lora_targets else None,
        answer_space=a.answer_space, eval_batch_size=a.eval_batch_size, prompt_format=a.prompt_format,
        answer_mode=a.answer_mode)
    return RunConfig(
        method=a.method, method_options=_options(a.option), backbone=backbone,
        data=a.data or str(default_data_root()), benchmark=a.benchmark, order=a.order,
        tasks=a.tasks.split(",") if a.tasks else None, train_size=a.train_size, test_size=a.test_size,
        eval_split=a.eval_split, eval_scope=a.eval_scope, memory_fraction=a.memory_fraction, epochs=a.epochs,
        max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
        warmup_steps=a.warmup_steps,
        precision=a.precision, group_by_length=a.group_by_length, seed=a.seed, output=a.output, resume=a.resume,
        report_to=a.report_to)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkif", description="Continual learning of language models.")
    sub = parser.add_subparsers(dest="command")
    profiles = "; ".join(f"--model {m}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                         for m, d in MODEL_DEFAULTS.items())
    run_p = sub.add_parser("run", help="run one continual-learning experiment (default command)",
                           epilog=f"Defaults an offline model implies (explicit options win): {profiles}")
    add_run_arguments(run_p)
    parser.set_defaults(run_parser=run_p)
    rep = sub.add_parser("report", help="markdown table and plots from run folders")
    rep.add_argument("dirs", nargs="+", help="run folders (or results.json files)")
    rep.add_argument("--out", default=None, help="where to write table.md and PNGs (default: the first folder)")
    bench_p = sub.add_parser("bench", help="run a grid (methods x orders x seeds) into one table, resumably")
    bench_p.add_argument("config", help="grid file (TOML), e.g. benchmarks/standard.toml")
    bench_p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<name>)")
    bench_p.add_argument("--data", default=None, help="data root (default: the grid's, $RKIF_DATA or ../shared/data)")
    bench_p.add_argument("--report", action="store_true", help="only write the table and plots of finished runs")
    bench_p.add_argument("--methods", default=None,
                         help="comma-separated subset of the grid's methods to run (the table covers the whole grid)")
    bench_p.add_argument("--orders", default=None, help="comma-separated subset of the grid's orders to run")
    sub.add_parser("methods", help="list the methods and presets")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` (``run`` is the default command); ``--model NAME`` with MODEL_DEFAULTS sets its defaults."""
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    if argv[0] == "run":
        run_p = parser.get_default("run_parser")
        known, _ = run_p.parse_known_args(argv[1:])
        run_p.set_defaults(**MODEL_DEFAULTS.get(known.model, {}))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "run":
            return _run(config_from_args(args))
        if args.command == "bench":
            from rkif.bench import bench
            only = args.methods.split(",") if args.methods else None
            orders = [int(o) for o in args.orders.split(",")] if args.orders else None
            table, failed = bench(Path(args.config), Path(args.out) if args.out else None, args.data, args.report,
                                  only, orders)
            print(table)
            return 1 if failed else 0
        if args.command == "report":
            from rkif.report import report
            print(report([Path(d) for d in args.dirs], Path(args.out) if args.out else None))
            return 0
        from rkif.methods import available
        print("\n".join(available()))
        return 0
    except (DataError, FileExistsError, FileNotFoundError, ValueError, KeyError, ImportError) as err:
        logging.getLogger("rkif").error("%s", err)
        return 2


def _run(config: RunConfig) -> int:
    from rkif.bench import claim
    from rkif.distributed import leave_process_group
    from rkif.report import matrix_table, report
    from rkif.runner import is_main_process, run_experiment

    if is_main_process():          # one writer per output folder (DDP ranks share their rank 0's claim)
        with claim(config.output_dir) as mine:
            if not mine:
                raise FileExistsError(f"{config.output_dir} is being written by another rkif process "
                                      f"(see {config.output_dir / '.lock'}); wait for it or choose another --output")
            results = run_experiment(config)
    else:
        results = run_experiment(config)
    leave_process_group()          # under torchrun: every rank done, gloo/nccl torn down before exit
    if not is_main_process():
        return 0
    print(matrix_table(results))
    report([config.output_dir], config.output_dir)
    print(f"\nresults, checkpoints and plots in {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
