"""Command line: ``rkif run`` (one experiment), ``rkif report`` (tables and plots)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import MISSING, fields
from importlib import metadata
from pathlib import Path

from rkif import console
from rkif.backbones import FAMILY_NAMES, BackboneConfig
from rkif.backbones.sources import MODEL_DEFAULTS
from rkif.config import RunConfig
from rkif.data import BENCHMARK_DEFAULTS, BENCHMARKS, DataError, default_data_root

DEFAULT_OUTPUT = "runs/main"
# what a user can cause (bad input, files, models, checkpoints): one line; anything else keeps its traceback
USER_ERRORS = (DataError, OSError, ValueError, KeyError, ImportError)
DEBUG_ENV = "RKIF_DEBUG"


def size(text: str) -> int | None:
    """An example count: a number (checked >= 1 with the other settings) or ``all`` for every example."""
    return None if text.strip().lower() in ("all", "none") else int(text)


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in out:
            raise ValueError(f"--option {key}: given twice ({out[key]!r} and {value.strip()!r}); give it once")
        out[key] = value.strip()
    return out


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list (``--tasks``, ``--lora-targets``); an empty entry stays, for the check to refuse."""
    return None if text is None else [t.strip() for t in text.split(",")]


def comma_ints(text: str) -> list[int]:
    """``--orders 1,2`` / ``--seeds 42,43``: whole numbers separated by commas."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers separated by commas, e.g. 1,2") from None


USER_MODULE_HELP = ("a .py file or a dotted module to import first, whose @register lines add your own methods "
                    "(repeatable; recorded in results.json, so a resumed run imports it again)")


def add_user_module_argument(p: argparse.ArgumentParser) -> None:
    """``--user-module PATH_OR_MODULE`` (repeatable), as ``rkif run``, ``bench`` and ``methods`` take it."""
    p.add_argument("--user-module", action="append", default=[], dest="user_modules", metavar="PATH_OR_MODULE",
                   help=USER_MODULE_HELP)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless there is none to show (None: unset or the model's own;
    a flag's False; no values) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default, text = action.default, action.help or ""
        switch = isinstance(action, argparse.BooleanOptionalAction)        # --x / --no-x: either may be the default
        unset = default is None or default == [] or default is False and not switch
        return action.help if unset or "default" in text else super()._get_help_string(action)


def version() -> str:
    """The installed package's version (the source tree's where rkif runs uninstalled)."""
    try:
        return metadata.version("rkif")
    except metadata.PackageNotFoundError:
        import rkif

        return rkif.__version__


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    d, b = RunConfig(), BackboneConfig()
    p.add_argument("--method", default=d.method, help="method or preset name (see `rkif methods`)")
    add_user_module_argument(p)
    p.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. -O inner_steps=4 (repeatable; `rkif methods` lists them)")
    p.add_argument("--model", default=b.model,
                   help="'minilm' (offline encoder), 'smollm2' (offline generative LM), a .gguf file, a local path "
                        "or a hub name")
    p.add_argument("--family", default="auto", choices=["auto", *sorted(FAMILY_NAMES)],
                   help="model family; auto: inferred from the model")
    p.add_argument("--data", default=None,
                   help=f"data root (default: $RKIF_DATA or {default_data_root()}, relative to the current folder); "
                   "for superni, your copy's folder of task folders (<task>/{train,dev,test}.json)")
    p.add_argument("--benchmark", default=d.benchmark, choices=list(BENCHMARKS),
                   help="standard / long (classification, exact match) or superni (generation, ROUGE-L)")
    p.add_argument("--order", type=int, default=d.order,
                   help="task order: 1-3 standard, 4-6 long (1-3 read as 4-6), 1-2 superni")
    p.add_argument("--tasks", default=None, help="explicit comma-separated task list (overrides the order)")
    p.add_argument("--epochs", type=float, default=d.epochs, help="training epochs per task")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per task (overrides --epochs)")
    p.add_argument("--train-size", type=size, default=d.train_size,
                   help="training examples per task, a sample, class-stratified on classification tasks "
                        "('all' for every one)")
    p.add_argument("--test-size", type=size, default=d.test_size,
                   help="examples per task of --eval-split scored, sampled as --train-size ('all' for every one)")
    p.add_argument("--eval-split", default=d.eval_split, choices=["test", "dev"],
                   help="split scored after each task; in the shipped benchmark dev overlaps test, so never tune "
                        "on it (hold out part of train instead, as benchmarks/heldout_select.py does)")
    p.add_argument("--eval-scope", default=d.eval_scope, choices=["all", "seen+next"],
                   help="tasks evaluated after each task: all (full heatmap) or the seen ones and the next "
                        "(same OP/BWT/FWT; 134 of 225 evaluations on 15 tasks)")
    p.add_argument("--memory-fraction", type=float, default=d.memory_fraction,
                   help="replay memory kept of each finished task, as a fraction of its training examples "
                        "(rkif, replay, vrmcl; sapt generates as many pseudo-samples)")
    p.add_argument("--max-length", type=int, default=b.max_length, help="prompt tokens kept (longer are cut)")
    p.add_argument("--max-target-length", type=int, default=b.max_target_length,
                   help="cap on answer tokens trained and generated (causal and seq2seq models; generation "
                        "also stops at EOS and at the longest answer of the run's tasks)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training examples per device and step")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="batches per optimizer step")
    p.add_argument("--eval-batch-size", type=int, default=b.eval_batch_size, help="examples per evaluation batch")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate (linear schedule, restarted for each task)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="optimizer steps of linear learning-rate warm-up at the start of each task")
    p.add_argument("--lora-r", type=int, default=b.lora_r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=b.lora_alpha, help="LoRA scaling numerator (scale alpha/r)")
    p.add_argument("--lora-dropout", type=float, default=b.lora_dropout, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: q,v of the family)")
    p.add_argument("--answer-space", default=b.answer_space, choices=["all", "task"],
                   help="labels the encoder (and causal --answer-mode rank) scores: all labels of the run, "
                        "or only the task's own")
    p.add_argument("--prompt-format", default=b.prompt_format, choices=["raw", "chat"],
                   help="causal: instruction+input as is (raw) or inside the tokenizer's chat template")
    p.add_argument("--answer-mode", default=b.answer_mode, choices=["generate", "rank"],
                   help="causal: greedy generation + exact match, or rank classification over the candidate labels")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp16", "auto"],
                   help="autocast for training and evaluation; auto: bf16 where the hardware has it, else fp32; "
                        "fp16 needs a GPU")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=d.group_by_length,
                   help="training batches of similar length")
    p.add_argument("--report-to", default=d.report_to, help="Trainer integration, e.g. tensorboard")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data sample, the adapter and the training")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="folder of results.json, checkpoints, table and plots")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output after its last finished task; options not given here are "
                        "the saved run's, those given must match it")


def config_from_args(a: argparse.Namespace) -> RunConfig:
    backbone = BackboneConfig(
        model=a.model, family=a.family, max_length=a.max_length, max_target_length=a.max_target_length,
        lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
        lora_targets=_names(a.lora_targets),
        answer_space=a.answer_space, eval_batch_size=a.eval_batch_size, prompt_format=a.prompt_format,
        answer_mode=a.answer_mode)
    return RunConfig(
        method=a.method, method_options=_options(a.option), user_modules=a.user_modules, backbone=backbone,
        data=str(default_data_root()) if a.data is None else a.data, benchmark=a.benchmark, order=a.order,
        tasks=_names(a.tasks), train_size=a.train_size, test_size=a.test_size,
        eval_split=a.eval_split, eval_scope=a.eval_scope, memory_fraction=a.memory_fraction, epochs=a.epochs,
        max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
        warmup_steps=a.warmup_steps,
        precision=a.precision, group_by_length=a.group_by_length, seed=a.seed, output=a.output, resume=a.resume,
        report_to=a.report_to)


class _NoDefaults(argparse.ArgumentParser):
    """A parser whose namespace holds only the options given: every default suppressed."""

    def __init__(self) -> None:
        super().__init__(add_help=False, argument_default=argparse.SUPPRESS)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        kwargs.pop("default", None)
        return super().add_argument(*args, **kwargs)


def given_settings(argv: list[str]) -> set[str]:
    """The settings (RunConfig and BackboneConfig field names) that ``rkif run``'s arguments ``argv`` give
    explicitly (one given at its default counts)."""
    p = _NoDefaults()
    add_run_arguments(p)
    given, _ = p.parse_known_args(argv)           # --debug, --verbose: not settings
    return {"method_options" if dest == "option" else dest for dest in vars(given)}


def resumed(config: RunConfig, given: set[str]) -> RunConfig:
    """``config`` with every setting not in ``given`` taken from the run saved in its output folder, so
    ``--resume`` needs only ``--output``; unchanged without ``resume`` or a saved run. Given settings stay,
    and the runner refuses those that differ from the saved ones. Given ``-O`` options add to the saved ones."""
    from rkif import io
    from rkif.runner import RESULTS, with_defaults

    path = config.output_dir / RESULTS
    if not config.resume or not path.is_file():
        return config
    saved = with_defaults(io.read_results(path)["config"])      # a setting newer than the run: its default then
    saved = {**{k: v for k, v in saved.items() if k != "backbone"}, **saved["backbone"]}
    known = {f.name for f in fields(RunConfig)} | {f.name for f in fields(BackboneConfig)}
    settings = {k: v for k, v in saved.items() if k in known and k not in given | {"output", "resume"}}
    if "method" in given and config.method != saved.get("method"):
        settings.pop("method_options", None)      # another method's options: the runner names the method change
    elif "method_options" in given:
        settings["method_options"] = {**saved.get("method_options", {}), **config.method_options}
    return config.with_settings(**settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkif", description="Continual learning of language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (also: {DEBUG_ENV}=1); errors are one line otherwise, "
                             "except those raised by a --user-module's own code")
    common.add_argument("--verbose", action="store_true",
                        help="also print the Trainer's log dicts and the dependencies' warnings (always in "
                             "each run's trainer/log.jsonl, and in rkif run's --report-to integration)")
    profiles = "; ".join(f"--{kind} {m}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                         for kind, table in (("model", MODEL_DEFAULTS), ("benchmark", BENCHMARK_DEFAULTS))
                         for m, d in table.items())
    run_p = sub.add_parser("run", parents=[common], help="run one continual-learning experiment",
                           formatter_class=HelpFormatter,
                           epilog=f"Defaults a model or benchmark implies (explicit options win, then the "
                                  f"benchmark's): {profiles}")
    add_run_arguments(run_p)
    parser.set_defaults(run_parser=run_p)
    rep = sub.add_parser("report", parents=[common], help="markdown table and plots from run folders")
    rep.add_argument("dirs", nargs="+", help="run folders (or results.json files)")
    rep.add_argument("--out", default=None,
                     help="where to write table.md and PNGs (default: reports/<run names>; never a run folder "
                          "unless given here)")
    rep.add_argument("--html", action="store_true",
                     help="also report.html: one self-contained page (table, every plot, each run's settings)")
    bench_p = sub.add_parser("bench", parents=[common],
                             help="run a grid (methods x orders x seeds) into one table, resumably")
    bench_p.add_argument("config", help="grid file (TOML), e.g. benchmarks/standard.toml")
    bench_p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<name>)")
    bench_p.add_argument("--data", default=None, help="data root (default: the grid's, $RKIF_DATA or ../shared/data)")
    bench_p.add_argument("--report", action="store_true", help="only write the table and plots of finished runs")
    bench_p.add_argument("--html", action="store_true",
                         help="also report.html beside table.md: one self-contained page, readable offline")
    bench_p.add_argument("--methods", default=None, type=_names,
                         help="comma-separated subset of the grid's methods to run (the table covers the whole grid)")
    bench_p.add_argument("--orders", default=None, type=comma_ints,
                         help="comma-separated subset of the grid's orders to run")
    bench_p.add_argument("--seeds", default=None, type=comma_ints,
                         help="comma-separated subset of the grid's seeds to run")
    add_user_module_argument(bench_p)
    methods_p = sub.add_parser("methods", help="list the methods (summary, -O options and defaults) and presets")
    add_user_module_argument(methods_p)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` (options without a command are ``run``'s; no argument at all is no command);
    ``--model NAME`` with MODEL_DEFAULTS and ``--benchmark NAME`` with BENCHMARK_DEFAULTS set their defaults
    (the benchmark's win over the model's)."""
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run", *argv]
    if argv and argv[0] == "run":
        run_p = parser.get_default("run_parser")
        known, _ = run_p.parse_known_args([a for a in argv[1:] if a not in ("-h", "--help")])  # help: these defaults
        run_p.set_defaults(**MODEL_DEFAULTS.get(known.model, {}))
        run_p.set_defaults(**BENCHMARK_DEFAULTS.get(known.benchmark, {}))
    args = parser.parse_args(argv)
    if args.command == "run":
        args.given = given_settings(argv[1:])     # what --resume keeps; the rest comes from the saved run
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(parser, argv)
    if args.command is None:       # a bare `rkif`: what it can do, and a failure for a script that forgot the command
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    console.log_once()
    log = logging.getLogger("rkif")
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    verbose = getattr(args, "verbose", False)
    console.show_trainer_logs(verbose)
    if not verbose:
        console.quiet_dependencies()
    try:
        return _command(args)
    except KeyboardInterrupt:
        log.error("interrupted; %s", _how_to_continue(args, argv))
        return 130
    except USER_ERRORS as err:
        # the traceback with --debug, or of an error from a --user-module's own code (its author needs the line)
        registry = sys.modules.get("rkif.methods.registry")      # imported before any --user-module
        if debug or (registry is not None and registry.raised_in_user_module(err)):
            log.exception("%s", _one_line(err))
        else:
            log.error("%s", _one_line(err))
        return 2


def _one_line(err: BaseException) -> str:
    """An error's message on one line (a KeyError's without its quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def _how_to_continue(args: argparse.Namespace, argv: list[str]) -> str:
    """The command that continues an interrupted ``run`` (or ``bench``): the same one with --resume."""
    if args.command == "bench":
        return "the finished runs are kept; continue with: rkif " + shlex.join(argv)
    if args.command != "run":
        return "run the same command again to finish it"
    again = argv if argv and argv[0] == "run" else ["run", *argv]
    if "--resume" not in again:
        again = [*again, "--resume"]
    if not any(a == "--output" or a.startswith("--output=") for a in again):
        again = [*again, "--output", args.output]
    return f"the finished tasks are saved in {args.output}; continue with: rkif {shlex.join(again)}"


def _command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors propagate to ``main``."""
    if args.command == "run":
        return _run(resumed(config_from_args(args), args.given))
    if args.command == "bench":
        from rkif.bench import bench
        table, failed = bench(Path(args.config), Path(args.out) if args.out else None, args.data, args.report,
                              args.methods, args.orders, args.html, args.user_modules, args.seeds)
        print(table)
        return 1 if failed else 0
    if args.command == "report":
        from rkif.report import default_report_dir, report
        dirs = [Path(d) for d in args.dirs]
        out = Path(args.out) if args.out else default_report_dir(dirs)
        print(report(dirs, out, args.html))
        print(f"\ntable.md{', report.html' if args.html else ''} and plots written to {out}")
        return 0
    print(methods_listing(getattr(args, "user_modules", [])))
    return 0


def methods_listing(user_modules: Sequence[str] = ()) -> str:
    """``rkif methods``: each method with its summary (its module's first docstring line) and options with
    their defaults, then each preset with the options it fixes; ``user_modules`` imported first."""
    from rkif.methods import METHODS, PRESETS, import_user_modules

    import_user_modules(list(user_modules))
    width = max(map(len, [*METHODS, *PRESETS])) + 2
    lines = []
    for name, cls in sorted(METHODS.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        lines.append(f"{name:<{width}}{doc.splitlines()[0] if doc else ''}")
        if cls.families is not None:
            needs = " or ".join(cls.families)
            lines.append(" " * width + f"needs a {needs} backbone (--model smollm2, or another such model)")
        options = " ".join(f"{f.name}={f.default_factory() if f.default is MISSING else f.default}"
                           for f in fields(cls.config_class))
        if options:
            lines.append(textwrap.fill(options, 100, initial_indent=" " * width + "-O ",
                                       subsequent_indent=" " * (width + 3), break_on_hyphens=False))
    lines.append("")
    for name, (base, options) in sorted(PRESETS.items()):
        lines.append(f"{name:<{width}}{base} with " + " ".join(f"{k}={v}" for k, v in options.items()))
    return "\n".join(lines)


def settings_config(**settings) -> RunConfig:
    """The RunConfig ``rkif run`` makes of its options, given as RunConfig and BackboneConfig field names
    (``--max-steps 5`` -> ``max_steps=5``, ``-O k=v`` -> ``method_options={"k": v}``), with the command's
    defaults: those ``--model NAME`` implies (``MODEL_DEFAULTS``) and the output folder ``runs/main``."""
    backbone_fields = {f.name for f in fields(BackboneConfig)}
    run_fields = {f.name for f in fields(RunConfig)} - {"backbone"}
    unknown = sorted(set(settings) - backbone_fields - run_fields)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}: use the field names of RunConfig and BackboneConfig")
    model = settings.get("model", BackboneConfig.model)
    benchmark = settings.get("benchmark", RunConfig.benchmark)
    merged = {"output": DEFAULT_OUTPUT, **MODEL_DEFAULTS.get(model, {}), **BENCHMARK_DEFAULTS.get(benchmark, {}),
              **settings}                              # as the command: explicit, then the benchmark's, the model's
    for key in ("tasks", "lora_targets"):               # comma-separated, as on the command line
        if isinstance(merged.get(key), str):
            merged[key] = merged[key].split(",")
    backbone = BackboneConfig(**{k: v for k, v in merged.items() if k in backbone_fields})
    return RunConfig(backbone=backbone, **{k: v for k, v in merged.items() if k in run_fields})


def run(**settings) -> dict:
    """``rkif run`` from Python, e.g. ``rkif.run(method="rkif", order=2, method_options={"inner_steps": 4})``.

    The settings and their defaults are the command's (``settings_config``). Like the command, it
    refuses an output folder another process is writing, resumes with ``resume=True`` (the settings not
    given taken from the saved run), writes
    results.json, the checkpoints, the table and the plots into the output folder, and returns the
    results (what results.json holds).
    """
    return run_and_report(resumed(settings_config(**settings), set(settings)))


def run_and_report(config: RunConfig) -> dict:
    """Run (or resume) ``config`` as ``rkif run`` does, write its table and plots, return its results."""
    from rkif import io
    from rkif.bench import claim
    from rkif.report import report
    from rkif.runner import is_main_process, prepare, run_experiment

    tasks = prepare(config)        # every setting and data file checked before the output folder is touched
    if is_main_process():          # one writer per output folder (DDP ranks share their rank 0's claim)
        # a run that fails before it writes anything (e.g. its model does not load) leaves no empty folder behind
        with io.removed_if_failed_empty(config.output_dir):
            io.check_output_dir(config.output_dir)      # a file or a read-only folder: refused before the model loads
            with claim(config.output_dir) as mine:
                if not mine:
                    raise FileExistsError(f"{config.output_dir} is being written by another rkif process (see "
                                          f"{config.output_dir / '.lock'}); wait for it or choose another --output")
                results = run_experiment(config, tasks)
    else:
        results = run_experiment(config, tasks)
    if is_main_process():          # one writer of the table and plots
        report([config.output_dir], config.output_dir)
    return results


def _run(config: RunConfig) -> int:
    from rkif.distributed import leave_process_group
    from rkif.report import matrix_table
    from rkif.runner import is_main_process

    try:
        results = run_and_report(config)
    except BaseException:
        leave_process_group(wait=False)      # torn down on an error too, without waiting for ranks that may not come
        raise
    leave_process_group()          # under torchrun: every rank done, gloo/nccl torn down before exit
    if not is_main_process():
        return 0
    print(matrix_table(results))
    print(f"\nresults, checkpoints and plots in {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
