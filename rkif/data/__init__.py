"""Benchmark data: tasks, splits, label sets, task orders, subsampling and the replay memory.

Benchmarks (``--benchmark``): ``standard`` and ``long`` read the layout below; ``superni`` reads a user's
SuperNI copy in SAPT's layout (``rkif.data.superni``). Every loader returns the same ``Task``/``Example``
objects; a task names the metric it is scored with (``Task.metric``, see ``rkif.metrics``).

Layout of a data root (the Long Sequence benchmark's, also accepted for a user's own tasks)::

    ROOT/{train,dev,test}/<task>.json    # or <task>.jsonl; under ROOT/long_sequence/ if that folder exists
    ROOT/orders.json                     # optional (needed for --order only): {"1": ["dbpedia", ...], ...}

A split file is a JSON list (``.json``) or one object per line (``.jsonl``) of
``{"instruction"?: str, "input": str, "output": str}``; other keys are ignored (``id`` names a record in
errors). The label set of a task is the set of ``output`` values in its train split.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
STANDARD_ORDERS = (1, 2, 3)
LONG_ORDERS = (4, 5, 6)
BENCHMARKS = ("standard", "long", "superni")
# Run settings a benchmark implies on the command line (explicit options win; they win over MODEL_DEFAULTS):
# SuperNI's published lengths (max source 512, max generation 50 tokens).
BENCHMARK_DEFAULTS: dict[str, dict[str, object]] = {"superni": {"max_length": 512, "max_target_length": 50}}


class DataError(ValueError):
    """Bad benchmark input; the message names the file, record, task or order at fault."""


@dataclass(frozen=True)
class Example:
    """One instruction-following example: ``output`` is the training target.

    ``references`` holds every acceptable answer when there are several (SuperNI); empty means the
    single reference ``output``. Scores are the maximum over ``answers``.
    """

    task: str
    input: str
    output: str
    instruction: str = ""
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "references", tuple(self.references))   # a JSON list (memory state) too

    @property
    def prompt(self) -> str:
        """The source text a model reads: instruction followed by input."""
        return self.instruction + self.input

    @property
    def answers(self) -> tuple[str, ...]:
        """The reference answers a prediction is scored against."""
        return self.references or (self.output,)


@dataclass
class Task:
    """A task: its name, its splits, the label strings of its train split and how it is scored."""

    name: str
    splits: dict[str, list[Example]] = field(default_factory=dict)
    label_set: list[str] | None = None   # fixed from the full train split, before any subsampling
    metric: str = "exact_match"          # a name in rkif.metrics.SCORERS
    free_text: bool = False              # answers are free text, not a closed label set: generation only

    @property
    def labels(self) -> list[str]:
        """Sorted label set of the train split (the answer space of this task)."""
        if self.label_set is not None:
            return self.label_set
        return sorted({ex.output for ex in self.splits["train"]})

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise DataError(f"task {self.name!r} has no {name!r} split")
        return self.splits[name]


def default_data_root() -> Path:
    """``$RKIF_DATA`` if set, else ``../shared/data`` relative to the working directory."""
    return Path(os.environ.get("RKIF_DATA", "../shared/data"))


def _task_dir(root: Path) -> Path:
    nested = root / "long_sequence"
    return nested if nested.is_dir() else root


def _split_file(root: Path, split: str, task: str) -> Path:
    base = _task_dir(root) / split
    found = [base / f"{task}{suffix}" for suffix in (".json", ".jsonl") if (base / f"{task}{suffix}").is_file()]
    if len(found) > 1:
        raise DataError(f"task {task!r}: both {found[0]} and {found[1]} exist; keep one of them")
    if not found:
        raise DataError(f"task {task!r}: no {split} split: expected {base / task}.json or {task}.jsonl")
    return found[0]


def read_records(path: Path) -> list[dict]:
    """Read a JSON list or a JSONL file of records, with errors naming file and record."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from err
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def parse_examples(task: str, path: Path, records: list) -> list[Example]:
    """Validate records into Examples; an empty split or a record without input/output fails."""
    if not records:
        raise DataError(f"{path}: split is empty (task {task!r})")
    examples = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is not an object")
        for key in ("input", "output"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{path}: record {i} (id {rec.get('id', '?')}) has no string {key!r}")
        if not rec["output"].strip():
            raise DataError(f"{path}: record {i} (id {rec.get('id', '?')}) has an empty 'output' (its answer)")
        instruction = rec.get("instruction") or ""
        if not isinstance(instruction, str):
            raise DataError(f"{path}: record {i} has a non-string 'instruction'")
        examples.append(Example(task, rec["input"], rec["output"], instruction))
    return examples


def load_task(root: Path, name: str, splits: tuple[str, ...] = ("train", "test")) -> Task:
    """Load the named splits of one task from a data root."""
    task = Task(name)
    for split in splits:
        path = _split_file(root, split, name)
        task.splits[split] = parse_examples(name, path, read_records(path))
    if "train" in task.splits:
        task.label_set = sorted({ex.output for ex in task.splits["train"]})
    return task


def available_tasks(root: Path) -> list[str]:
    train = _task_dir(root) / "train"
    if not train.is_dir():
        raise DataError(f"no train/ folder under {_task_dir(root)} (set --data or RKIF_DATA)")
    return sorted({p.stem for p in train.iterdir() if p.suffix in (".json", ".jsonl")})


def load_orders(root: Path) -> dict[int, list[str]]:
    path = root / "orders.json"
    if not path.is_file():
        raise DataError(f"no task orders at {path}")
    try:
        orders = {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as err:
        raise DataError(f"{path}: expected {{\"1\": [task, ...], ...}} ({err})") from err
    for k, names in orders.items():
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"{path}: order {k} must be a non-empty list of task names, got {names!r}")
    return orders


def resolve_task_names(root: Path, benchmark: str = "standard", order: int = 1,
                       tasks: list[str] | None = None) -> list[str]:
    """The task sequence: an explicit list, or order N of the standard (1-3) / long (4-6) / superni (1-2)
    benchmark.

    For ``long`` an order of 1-3 is read as the benchmark's 1st-3rd long order (4-6).
    """
    if benchmark == "superni":
        from rkif.data import superni
        names = superni.resolve_task_names(Path(root), order, tasks)
    else:
        names = _layout_task_names(root, benchmark, order, tasks)
    if len(set(names)) != len(names):
        raise DataError(f"task list repeats a task: {names}")
    return names


def _layout_task_names(root: Path, benchmark: str, order: int, tasks: list[str] | None) -> list[str]:
    """The Standard/Long layout's task list (explicit or order N); every task must have files."""
    known = available_tasks(root)
    if tasks:
        names = list(tasks)
    else:
        orders = load_orders(root)
        if benchmark == "long" and order in STANDARD_ORDERS:
            order += 3
        allowed = {"standard": STANDARD_ORDERS, "long": LONG_ORDERS}.get(benchmark)
        if allowed is None:
            raise DataError(f"unknown benchmark {benchmark!r}: use one of {', '.join(BENCHMARKS)}")
        if order not in allowed or order not in orders:
            raise DataError(f"unknown order {order} for the {benchmark} benchmark "
                            f"(known: {sorted(set(allowed) & set(orders))})")
        names = orders[order]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"unknown task(s) {unknown} under {_task_dir(root)} (known: {known})")
    return names


def stratified_subsample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """A deterministic class-stratified sample of ``size`` examples (all of them if None or larger).

    Each label gets a share proportional to its frequency (largest remainders break rounding),
    so small classes keep at least their proportional place.
    """
    if size is None or size >= len(examples):
        return list(examples)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex.output].append(ex)
    labels = sorted(by_label)
    quotas = {lab: size * len(by_label[lab]) / len(examples) for lab in labels}
    counts = {lab: int(quotas[lab]) for lab in labels}
    left = size - sum(counts.values())
    for lab in sorted(labels, key=lambda lab: (counts[lab] - quotas[lab], lab))[:left]:
        counts[lab] += 1
    rng = random.Random(seed)
    picked = []
    for lab in labels:
        picked.extend(rng.sample(by_label[lab], counts[lab]))
    rng.shuffle(picked)
    return picked


def read_task(root: Path, name: str, splits: tuple[str, ...], benchmark: str = "standard") -> Task:
    """One task's splits in its benchmark's layout (SuperNI's task JSON, or the classification files)."""
    if benchmark == "superni":
        from rkif.data import superni
        return superni.load_task(Path(root), name, splits)
    return load_task(Path(root), name, splits)


def load_benchmark(root: Path, names: list[str], train_size: int | None = None,
                   test_size: int | None = None, eval_split: str = "test",
                   seed: int = 42, benchmark: str = "standard") -> list[Task]:
    """Load and subsample every task of a run. Subsampling depends only on (seed, task name)."""
    root = Path(root)
    if benchmark == "superni":
        from rkif.data import superni
        return superni.load_benchmark(root, names, train_size, test_size, eval_split, seed)
    tasks = []
    for name in names:
        task = load_task(root, name, ("train", eval_split))
        task_seed = seed + sum(map(ord, name))
        task.splits["train"] = stratified_subsample(task.splits["train"], train_size, task_seed)
        task.splits[eval_split] = stratified_subsample(task.splits[eval_split], test_size, task_seed + 1)
        outside = sorted({ex.output for ex in task.splits[eval_split]} - set(task.labels))
        if outside:
            n = sum(ex.output in outside for ex in task.splits[eval_split])
            logger.warning("task %s: %d %s example(s) have labels outside the train label set %s; label-scoring "
                           "models (encoder, --answer-mode rank) cannot answer them", name, n, eval_split, outside)
        tasks.append(task)
    return tasks


class ReplayMemory:
    """Class-balanced random sample of every finished task (paper: int(0.02 * N) examples).

    Per task: ``max(1, int(fraction * N))`` examples; labels (in random order) take one example each
    per pass until the budget is spent, so label counts differ by at most one (a label with too few
    examples gives all it has). Deterministic in (seed, task).
    """

    def __init__(self, fraction: float = 0.02, seed: int = 42):
        if not 0 < fraction <= 1:
            raise ValueError(f"memory fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.seed = seed
        self.by_task: dict[str, list[Example]] = {}

    def add(self, task: str, examples: list[Example]) -> list[Example]:
        """Store a class-balanced sample of ``examples``: labels take turns, in random order."""
        if not examples:
            raise DataError(f"task {task!r}: no examples to store in the replay memory")
        n = max(1, int(self.fraction * len(examples)))
        rng = random.Random(f"{self.seed}:{task}")
        by_label: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(examples):
            by_label[ex.output].append(i)
        queues = [rng.sample(idx, len(idx)) for _, idx in sorted(by_label.items())]
        rng.shuffle(queues)  # when n < #labels, which labels get a slot is random, not alphabetical
        chosen: list[int] = []
        while len(chosen) < n:          # one per label per pass: counts differ by at most one
            for queue in queues:
                if queue and len(chosen) < n:
                    chosen.append(queue.pop())
        self.by_task[task] = [examples[i] for i in chosen]
        return self.by_task[task]

    def examples(self) -> list[Example]:
        """All stored examples, pooled over tasks in insertion order."""
        return [ex for exs in self.by_task.values() for ex in exs]

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_task.values())

    def state_dict(self) -> dict:
        return {"fraction": self.fraction, "seed": self.seed,
                "by_task": {t: [asdict(ex) for ex in exs] for t, exs in self.by_task.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.fraction, self.seed = state["fraction"], state["seed"]
        self.by_task = {t: [Example(**ex) for ex in exs] for t, exs in state["by_task"].items()}
