"""``rkif bench CONFIG``: a grid of runs (methods x orders x seeds), resumable, into one table.

A grid is a small TOML file::

    name = "standard"                 # results go to benchmarks/results/<name>/ (or --out)
    benchmark = "standard"
    orders = [1, 2, 3]
    seeds = [42]
    methods = ["seqlora", "replay", "rkif"]
    user_modules = ["my_method.py"]   # optional: .py files or dotted modules registering your own methods
                                      # (paths relative to the working directory, as --user-module's)
    reference = "rkif"                # optional: the table adds paired differences to this entry (or to
                                      # each of a list: ["rkif", "rkif-ki"])
    [run]                             # RunConfig fields shared by every run
    train_size = 500                  # or "all" (every example), as test_size
    [backbone]                        # BackboneConfig fields
    max_length = 128
    [method_options.ewc]              # options of one method
    ewc_lambda = 1000.0
    [variants.rkif-random]            # a named configuration, listed in `methods` like a method
    method = "rkif"                   # a method or preset
    options = { mask_source = "random" }
    run = { epochs = 3.0 }            # optional: RunConfig fields of this variant's runs only
    paper = "rkif"                    # optional: the row of the paper's table the variant is read against

Each run lives in ``<out>/runs/<name>/order<o>-seed<s>/`` (``<name>``: the method's or the
variant's, also its name in the table); a finished run is skipped, a
half-finished one resumes after its last finished task, a failed one is reported and the grid
goes on. At the end ``table.md`` and the plots are written from every finished run.

Every run of the grid is checked when the grid is loaded (value types, orders, ranges, method
options: ``RunConfig.check``), and its data before the first run starts, so a bad grid fails in
one line naming the file, the run and the setting, never hours in.

Several ``rkif bench`` processes may share one grid (e.g. one per GPU, or ``--methods`` to split
it): each run is claimed with a lock file (``<run>/.lock``, holding host and pid) and a run locked
by a live process is left to it; a lock left by a dead process on this host is taken over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

from rkif import io
from rkif.backbones import BackboneConfig
from rkif.checks import check_types
from rkif.config import BENCHMARK_ORDERS, RunConfig
from rkif.console import progress_options
from rkif.data import BENCHMARK_DEFAULTS, read_task, resolve_task_names
from rkif.methods import available, import_user_modules
from rkif.report import PAPER_TABLE1, grid_report

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)
DEFAULT_SEEDS = [42]         # a grid without a ``seeds`` key
GRID_KEYS = {"name", "benchmark", "orders", "seeds", "methods", "run", "backbone", "method_options", "variants",
             "reference", "user_modules"}
VARIANT_KEYS = {"method", "options", "run", "paper"}
RESERVED_RUN_KEYS = {"method", "method_options", "backbone", "order", "seed", "benchmark", "tasks", "resume", "output",
                     "user_modules"}
ALL_EXAMPLES = ("train_size", "test_size")       # "all" in a grid: every example (TOML has no null)


def load_grid(path: Path, user_modules: Sequence[str] = ()) -> dict:
    """Read and validate a grid file; errors name the file and the key at fault. The grid's ``user_modules``
    and the given ones (``--user-module``) are imported first, so their methods count as the grid's."""
    try:
        grid = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: cannot read grid ({err})") from err
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
    for key in ("name", "methods", "orders"):
        if key not in grid:
            raise ValueError(f"{path}: missing {key!r}")
    for key, kind in (("methods", str), ("orders", int), ("seeds", int)):
        value = grid.get(key, DEFAULT_SEEDS)
        if not isinstance(value, list) or not value or not all(isinstance(v, kind) for v in value):
            raise ValueError(f"{path}: {key!r} must be a non-empty list of {kind.__name__}")
    modules = grid.get("user_modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) and m.strip() for m in modules):
        raise ValueError(f"{path}: 'user_modules' must be a list of .py files or dotted module names")
    grid["user_modules"] = list(dict.fromkeys([*modules, *user_modules]))
    try:
        import_user_modules(grid["user_modules"])
    except (ImportError, OSError) as err:
        raise ValueError(f"{path}: {err}") from err
    for section, cls in (("run", RunConfig), ("backbone", BackboneConfig), ("method_options", None)):
        table = grid.get(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [{section}] must be a table")
        if cls is None:
            continue
        bad = set(table) - {f.name for f in fields(cls)}
        if bad:
            raise ValueError(f"{path}: [{section}] has unknown field(s) {sorted(bad)}")
    reserved = set(grid.get("run", {})) & RESERVED_RUN_KEYS
    if reserved:
        raise ValueError(f"{path}: [run] may not set {sorted(reserved)}: the grid sets them (top-level keys)")
    _check_variants(path, grid)
    for section in ("method_options", "variants"):
        stray = set(grid.get(section, {})) - set(grid["methods"])
        if stray:
            raise ValueError(f"{path}: [{section}] for methods not in the grid: {sorted(stray)}")
    grid["reference"] = _references(path, grid)
    _check_values(grid, path)               # every run's settings and method options: fail now, not hours in
    return grid


def _references(path: Path, grid: dict) -> list[str]:
    """The grid's ``reference``: one entry or a list of them, each a name in ``methods``, as a list."""
    refs = grid.get("reference", [])
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs) or len(set(refs)) < len(refs):
        raise ValueError(f"{path}: 'reference' must be an entry of 'methods' or a list of distinct ones")
    for ref in refs:
        if ref not in grid["methods"]:
            raise ValueError(f"{path}: reference {ref!r} is not in the grid's methods {grid['methods']}")
    return refs


def _check_variants(path: Path, grid: dict) -> None:
    """Each [variants.NAME]: a new name, a ``method``, optional ``options`` and ``run`` tables and ``paper``."""
    variants = grid.get("variants", {})
    if not isinstance(variants, dict):
        raise ValueError(f"{path}: [variants] must be a table")
    run_fields = {f.name for f in fields(RunConfig)}
    for name, variant in variants.items():
        where = f"{path}: [variants.{name}]"
        if not isinstance(variant, dict):
            raise ValueError(f"{where} must be a table")
        if name in available():
            raise ValueError(f"{where}: {name!r} is already a method or preset; choose another name")
        unknown = set(variant) - VARIANT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(VARIANT_KEYS)}")
        if not isinstance(variant.get("method"), str):
            raise ValueError(f"{where}: needs method = \"<a method or preset>\"")
        for key in ("options", "run"):
            if not isinstance(variant.get(key, {}), dict):
                raise ValueError(f"{where}: {key} must be a table")
        rows = sorted({m for table in PAPER_TABLE1.values() for m in table})
        if "paper" in variant and variant["paper"] not in rows:
            raise ValueError(f"{where}: paper = {variant['paper']!r}: expected the method whose row of the paper's "
                             f"tables this variant is read against, one of {rows}")
        run = variant.get("run", {})
        bad = set(run) - run_fields
        if bad:
            raise ValueError(f"{where}: run has unknown field(s) {sorted(bad)}")
        reserved = set(run) & RESERVED_RUN_KEYS
        if reserved:
            raise ValueError(f"{where}: run may not set {sorted(reserved)}: the grid sets them")


def _entry(grid: dict, name: str) -> tuple[str, dict, dict]:
    """The method, its options and the run settings of one entry of ``methods`` (a method or a variant)."""
    variant = grid.get("variants", {}).get(name, {})
    options = {**variant.get("options", {}), **grid.get("method_options", {}).get(name, {})}
    return variant.get("method", name), options, {**grid.get("run", {}), **variant.get("run", {})}


def run_label(run: RunConfig) -> str:
    """The grid's name of a run's configuration: its folder under ``runs/`` (a variant's or the method's name)."""
    return run.output_dir.parent.name


def _check_values(grid: dict, path: Path) -> None:
    """The grid's name, benchmark and orders, the types of its [run] and [backbone] values, then every run."""
    if not isinstance(grid["name"], str) or not grid["name"].strip():
        raise ValueError(f"{path}: 'name' must be a non-empty string (the results folder's name)")
    benchmark = grid.get("benchmark", "standard")
    if benchmark not in BENCHMARK_ORDERS:
        raise ValueError(f"{path}: benchmark {benchmark!r}: choose from {', '.join(BENCHMARK_ORDERS)}")
    bad = sorted(set(grid["orders"]) - set(BENCHMARK_ORDERS[benchmark]))
    if bad:
        raise ValueError(f"{path}: orders {bad}: the {benchmark} benchmark has orders "
                         f"{list(BENCHMARK_ORDERS[benchmark])}")
    tables = [grid.setdefault("run", {})] + [v.get("run", {}) for v in grid.get("variants", {}).values()]
    for table in tables:                   # the grid's [run] and each variant's run table
        for key in ALL_EXAMPLES:
            if isinstance(table.get(key), str) and table[key].strip().lower() == "all":
                table[key] = None
    for section, cls in (("run", RunConfig), ("backbone", BackboneConfig)):
        try:
            check_types(cls, grid.get(section, {}), lambda name, s=section: f"[{s}] {name} = ")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    for run in grid_runs(grid, Path(grid["name"])):
        try:
            run.check()
        except ValueError as err:
            raise ValueError(f"{path}: {_run_name(run)}: {err}") from err


def _run_name(run: RunConfig) -> str:
    return f"run {run_label(run)} order {run.order} seed {run.seed}"


def check_data(runs: list[RunConfig], path: Path) -> None:
    """The task names and data files of every run (each file read once): bad data fails before the first run."""
    seen: set[tuple] = set()
    for run in runs:
        try:
            names = resolve_task_names(Path(run.data), run.benchmark, run.order, run.tasks)
            for name in names:
                if (run.data, name, run.eval_split) not in seen:
                    seen.add((run.data, name, run.eval_split))
                    read_task(Path(run.data), name, ("train", run.eval_split), run.benchmark)
        except ValueError as err:
            raise ValueError(f"{path}: {_run_name(run)}: {err}") from err


def grid_runs(grid: dict, out: Path, data: str | None = None) -> list[RunConfig]:
    """Every RunConfig of the grid, methods outermost (so a method's orders finish together). The settings
    its benchmark implies (BENCHMARK_DEFAULTS) apply where the grid's [run] and [backbone] leave them."""
    benchmark = grid.get("benchmark", "standard")
    given = {**grid.get("run", {}), **grid.get("backbone", {})}
    implied = {k: v for k, v in BENCHMARK_DEFAULTS.get(benchmark, {}).items() if k not in given}
    runs = []
    for name in grid["methods"]:
        method, options, run_settings = _entry(grid, name)
        for order in grid["orders"]:
            for seed in grid.get("seeds", DEFAULT_SEEDS):
                settings = {**run_settings, "method": method, "order": order, "seed": seed,
                            "benchmark": benchmark, "resume": True, "user_modules": list(grid.get("user_modules", [])),
                            "method_options": dict(options),
                            "backbone": BackboneConfig(**grid.get("backbone", {})),
                            "output": str(out / "runs" / name / f"order{order}-seed{seed}")}
                if data:
                    settings["data"] = data
                runs.append(RunConfig(**settings).with_settings(**implied))
    return runs


def is_finished(run: RunConfig) -> bool:
    path = run.output_dir / "results.json"
    return path.exists() and io.read_json(path).get("complete", False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def claim(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir/.lock`` while the block runs; yields False if another live process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, _, pid = lock.read_text().partition(" ")
            except FileNotFoundError:      # released between our open and our read: try again
                continue
            if host == socket.gethostname() and pid.strip().isdigit() and not _alive(int(pid)):
                logger.warning("%s: taking over the lock of dead process %s", run_dir, pid.strip())
                lock.unlink(missing_ok=True)
                continue
            yield False
            return
        with os.fdopen(fd, "w") as f:
            f.write(me)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def bench(config_path: Path, out: Path | None = None, data: str | None = None,
          report_only: bool = False, methods: list[str] | None = None,
          orders: list[int] | None = None, html: bool = False,
          user_modules: Sequence[str] = (), seeds: list[int] | None = None) -> tuple[str, list[str]]:
    """Run every unfinished run of the grid (none with ``report_only``), then write the table and plots
    (with ``html``, also the page report.html). ``user_modules``: imported first, with the grid's own
    (``--user-module``), and recorded in each run's config.

    ``methods``, ``orders`` and ``seeds`` restrict the runs to part of the grid (e.g. one order and seed
    of every method first, or a share for another process); the table still covers every finished run.
    Returns the markdown table and the output folders of the runs that failed.
    """
    from rkif.runner import run_experiment

    grid = load_grid(config_path, user_modules)
    out = out or Path("benchmarks/results") / grid["name"]
    runs = grid_runs(grid, out, data)
    for key, chosen, of_run in (("method", methods, run_label), ("order", orders, lambda r: r.order),
                                ("seed", seeds, lambda r: r.seed)):
        grid_has = list(dict.fromkeys(map(of_run, runs)))         # in the grid's order
        strangers = sorted(set(chosen or []) - set(grid_has))
        if strangers:
            raise ValueError(f"{config_path}: {key}(s) {strangers} are not in the grid; it has {grid_has}")
    selected = [r for r in runs
                if (methods is None or run_label(r) in methods) and (orders is None or r.order in orders)
                and (seeds is None or r.seed in seeds)]
    todo = [] if report_only else [r for r in selected if not is_finished(r)]
    check_data(todo, config_path)
    done = sum(is_finished(r) for r in runs)
    logger.info("grid %s: %d runs, %d finished, %d to run", grid["name"], len(runs), done, len(todo))
    failed = []
    for run in tqdm(todo, desc=f"grid {grid['name']}", unit="run", **progress_options()):
        with claim(run.output_dir) as mine:
            if not mine or is_finished(run):     # another process holds it, or finished it meanwhile
                logger.info("run %s: %s", run.output, "finished" if mine else "locked by another process, left")
                continue
            logger.info("run %s order %d seed %d -> %s", run_label(run), run.order, run.seed, run.output)
            try:
                run_experiment(run)
            except Exception:  # one failed run must not stop the grid; it is reported below
                failed.append(run.output)
                logger.error("run %s failed:\n%s", run.output, traceback.format_exc())
    io.write_json(out / "grid.json", {**grid, "config_file": str(config_path)})
    finished = [r for r in runs if is_finished(r)]
    paper_rows = {name: v["paper"] for name, v in grid.get("variants", {}).items() if "paper" in v}
    table = grid_report(out, finished, grid.get("benchmark", "standard"), [run_label(r) for r in finished],
                        grid.get("reference"), html, grid["name"], paper_rows)
    if len(finished) < len(runs):
        table += f"\n\n{len(finished)} of {len(runs)} runs finished; `rkif bench {config_path}` resumes the rest."
    if failed:
        table += "\n\nFailed runs (see the log): " + ", ".join(failed)
    return table, failed
