"""rkif.data: loading real and user tasks, input errors, task orders, subsampling and the replay memory."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from rkif.data import (
    DataError,
    Example,
    ReplayMemory,
    available_tasks,
    load_benchmark,
    load_orders,
    load_task,
    read_records,
    resolve_task_names,
    stratified_subsample,
)

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"

DBPEDIA_LABELS = [
    "Album", "Animal", "Artist", "Athlete", "Building", "Company", "Educational Institution", "Film",
    "Mean of Transportation", "Natural Place", "Office Holder", "Plant", "Village", "Written Work",
]


@pytest.fixture(scope="module")
def real_root() -> Path:
    if not (DATA_ROOT / "long_sequence" / "train").is_dir() or not (DATA_ROOT / "orders.json").is_file():
        pytest.skip(f"benchmark data not found at {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(scope="module")
def real_orders(real_root) -> dict[int, list[str]]:
    return {int(k): v for k, v in json.loads((real_root / "orders.json").read_text()).items()}


# --------------------------------------------------------------------------- helpers for tmp layouts


def record(i: int, label: str = "yes", instruction: str | None = "Answer yes or no.\n") -> dict:
    rec = {"id": f"t_{i}", "input": f"Question {i}?\nAnswer:", "output": label}
    if instruction is not None:
        rec["instruction"] = instruction
    return rec


def good_records(n: int = 4) -> list[dict]:
    return [record(i, "yes" if i % 2 else "no") for i in range(n)]


def write_split(root: Path, split: str, task: str, content, *, nested: bool = True, suffix: str = ".json") -> Path:
    """Write one split file; ``content`` is a str written as is, or an object dumped as JSON."""
    base = root / "long_sequence" if nested else root
    path = base / split / f"{task}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def write_task(root: Path, task: str, train=None, test=None, *, nested: bool = True, suffix: str = ".json"):
    """Write a train and a test split; a split left as None gets four good records in the file's format."""
    default = good_records()
    if suffix == ".jsonl":
        default = "".join(json.dumps(r) + "\n" for r in default)
    train_path = write_split(root, "train", task, default if train is None else train, nested=nested, suffix=suffix)
    test_path = write_split(root, "test", task, default if test is None else test, nested=nested, suffix=suffix)
    return train_path, test_path


def write_orders(root: Path, orders: dict[int, list[str]]) -> None:
    (root / "orders.json").write_text(json.dumps({str(k): v for k, v in orders.items()}))


def make_examples(counts: dict[str, int], task: str = "t") -> list[Example]:
    """Examples with the given label histogram, labels interleaved (not grouped) in the list."""
    pools = {lab: [Example(task, f"{lab} #{i}", lab) for i in range(n)] for lab, n in counts.items()}
    out: list[Example] = []
    while any(pools.values()):
        for lab in counts:
            if pools[lab]:
                out.append(pools[lab].pop(0))
    return out


# --------------------------------------------------------------------------- real data


def test_real_dbpedia_train_has_14_labels(real_root):
    task = load_task(real_root, "dbpedia", ("train",))
    assert task.name == "dbpedia"
    assert len(task.split("train")) == 1000
    assert len(task.labels) == 14
    assert task.labels == DBPEDIA_LABELS
    ex = task.split("train")[0]
    assert ex.task == "dbpedia" and ex.instruction and ex.input and ex.output in DBPEDIA_LABELS
    assert ex.prompt == ex.instruction + ex.input
    with pytest.raises(DataError, match="no 'test' split"):
        task.split("test")


def test_real_available_tasks(real_root):
    tasks = available_tasks(real_root)
    assert len(tasks) == 15
    assert {"dbpedia", "amazon", "yahoo", "agnews", "mnli", "cb", "copa", "sst-2"} <= set(tasks)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_real_standard_orders(real_root, real_orders, order):
    names = resolve_task_names(real_root, "standard", order)
    assert names == real_orders[order]
    assert len(names) == 4
    assert sorted(names) == ["agnews", "amazon", "dbpedia", "yahoo"]


@pytest.mark.parametrize("order", [4, 5, 6])
def test_real_long_orders(real_root, real_orders, order):
    names = resolve_task_names(real_root, "long", order)
    assert names == real_orders[order]
    assert len(names) == 15 and len(set(names)) == 15


@pytest.mark.parametrize("short, long", [(1, 4), (2, 5), (3, 6)])
def test_real_long_order_1_to_3_means_4_to_6(real_root, real_orders, short, long):
    assert resolve_task_names(real_root, "long", short) == real_orders[long]
    assert resolve_task_names(real_root, "long", short) != real_orders[short]


def test_real_long_order_1_starts_with_mnli(real_root):
    # orders.json "4" (Table 12): mnli, cb, wic, copa, ...
    assert resolve_task_names(real_root, benchmark="long", order=1)[:4] == ["mnli", "cb", "wic", "copa"]


def test_real_explicit_tasks(real_root):
    assert resolve_task_names(real_root, tasks=["cb", "copa"]) == ["cb", "copa"]
    # an explicit list wins over benchmark/order, and keeps the caller's order
    assert resolve_task_names(real_root, "long", 9, tasks=["yelp", "cb", "rte"]) == ["yelp", "cb", "rte"]


@pytest.mark.parametrize("benchmark, order", [("standard", 5), ("standard", 9), ("long", 9), ("standard", 0)])
def test_real_unknown_order(real_root, benchmark, order):
    with pytest.raises(DataError, match=rf"unknown order {order}\b.*{benchmark}"):
        resolve_task_names(real_root, benchmark, order)


def test_real_unknown_task_and_repeat(real_root):
    with pytest.raises(DataError, match="unknown task") as err:
        resolve_task_names(real_root, tasks=["cb", "nosuchtask"])
    assert "nosuchtask" in str(err.value)
    with pytest.raises(DataError, match="repeats"):
        resolve_task_names(real_root, tasks=["cb", "copa", "cb"])


def test_real_mnli_dev_warns_once_about_dash_labels(real_root, caplog):
    with caplog.at_level(logging.WARNING, logger="rkif.data"):
        tasks = load_benchmark(real_root, ["mnli"], train_size=30, test_size=None, eval_split="dev")
    assert len(tasks) == 1
    task = tasks[0]
    assert len(task.split("train")) == 30
    assert "-" not in task.labels and len(task.labels) == 3
    dev = task.split("dev")
    assert len(dev) == 500
    assert sum(ex.output == "-" for ex in dev) == 6
    warnings = [r for r in caplog.records if r.name == "rkif.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "mnli" in msg
    assert " 6 " in msg
    assert "'-'" in msg


# --------------------------------------------------------------------------- bad input (tmp layouts)


def test_malformed_json_names_the_file(tmp_path):
    path, _ = write_task(tmp_path, "x", train='[{"input": "a", "output": "b"},')
    with pytest.raises(DataError, match="not valid JSON") as err:
        load_task(tmp_path, "x")
    assert str(path) in str(err.value)


def test_json_not_a_list_names_the_file(tmp_path):
    path, _ = write_task(tmp_path, "x", train={"input": "a", "output": "b"})
    with pytest.raises(DataError, match="expected a JSON list") as err:
        load_task(tmp_path, "x")
    assert str(path) in str(err.value)
    assert "dict" in str(err.value)


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    lines = [json.dumps(record(0)), "", json.dumps(record(1)), '{"input": "broken", "output": ', json.dumps(record(3))]
    path, _ = write_task(tmp_path, "x", train="\n".join(lines) + "\n", suffix=".jsonl")
    with pytest.raises(DataError, match="line 4") as err:
        load_task(tmp_path, "x")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("missing", ["input", "output"])
def test_record_missing_field_names_file_and_record(tmp_path, missing):
    recs = good_records(5)
    del recs[3][missing]
    path, _ = write_task(tmp_path, "x", train=recs)
    with pytest.raises(DataError, match=rf"record 3\b.*'{missing}'") as err:
        load_task(tmp_path, "x")
    assert str(path) in str(err.value)
    assert "t_3" in str(err.value)  # the record's id


def test_record_with_non_string_output(tmp_path):
    recs = good_records(3)
    recs[1]["output"] = 1
    path, _ = write_task(tmp_path, "x", train=recs)
    with pytest.raises(DataError, match=r"record 1\b.*'output'") as err:
        load_task(tmp_path, "x")
    assert str(path) in str(err.value)


def test_record_not_an_object(tmp_path):
    recs = good_records(3)
    recs.insert(2, ["input", "output"])
    path, _ = write_task(tmp_path, "x", train=recs)
    with pytest.raises(DataError, match=r"record 2 is not an object") as err:
        load_task(tmp_path, "x")
    assert str(path) in str(err.value)


def test_record_with_non_string_instruction(tmp_path):
    recs = good_records(3)
    recs[2]["instruction"] = ["not", "a", "string"]
    path, _ = write_task(tmp_path, "x", train=recs)
    with pytest.raises(DataError, match=r"record 2\b.*instruction") as err:
        load_task(tmp_path, "x")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix, content", [(".json", "[]"), (".jsonl", "\n\n")])
def test_empty_split(tmp_path, suffix, content):
    _, path = write_task(tmp_path, "x", test=content, suffix=suffix)
    with pytest.raises(DataError, match="empty") as err:
        load_task(tmp_path, "x")
    assert str(path) in str(err.value)
    assert "'x'" in str(err.value)


def test_missing_split_file(tmp_path):
    write_split(tmp_path, "train", "x", good_records())
    with pytest.raises(DataError, match="no test split") as err:
        load_task(tmp_path, "x")
    assert "'x'" in str(err.value)
    assert str(err.value).endswith(f"{tmp_path / 'long_sequence' / 'test' / 'x'}.json or x.jsonl")   # both names


def test_unknown_task_is_listed(tmp_path):
    write_task(tmp_path, "x")
    write_task(tmp_path, "y")
    with pytest.raises(DataError, match="unknown task") as err:
        resolve_task_names(tmp_path, tasks=["x", "zeta", "y", "omega"])
    msg = str(err.value)
    assert "zeta" in msg and "omega" in msg
    assert "['x', 'y']" in msg  # the known tasks are listed too


def test_unknown_order_in_tmp_orders(tmp_path):
    write_task(tmp_path, "x")
    write_task(tmp_path, "y")
    write_orders(tmp_path, {1: ["x", "y"], 4: ["y", "x"]})
    assert resolve_task_names(tmp_path, "standard", 1) == ["x", "y"]
    assert resolve_task_names(tmp_path, "long", 1) == ["y", "x"]
    for benchmark, order in (("standard", 2), ("standard", 5), ("standard", 9), ("long", 5), ("long", 9)):
        with pytest.raises(DataError, match=rf"unknown order \d+ for the {benchmark} benchmark"):
            resolve_task_names(tmp_path, benchmark, order)


def test_unknown_benchmark(tmp_path):
    write_task(tmp_path, "x")
    write_orders(tmp_path, {1: ["x"]})
    with pytest.raises(DataError, match="unknown benchmark 'short'"):
        resolve_task_names(tmp_path, "short", 1)


def test_missing_orders_file(tmp_path):
    write_task(tmp_path, "x")
    with pytest.raises(DataError, match="orders.json") as err:
        resolve_task_names(tmp_path, "standard", 1)
    assert str(tmp_path) in str(err.value)


def test_order_with_unknown_task(tmp_path):
    write_task(tmp_path, "x")
    write_orders(tmp_path, {1: ["x", "ghost"]})
    with pytest.raises(DataError, match="ghost"):
        resolve_task_names(tmp_path, "standard", 1)


def test_repeated_task(tmp_path):
    write_task(tmp_path, "x")
    write_task(tmp_path, "y")
    with pytest.raises(DataError, match="repeats") as err:
        resolve_task_names(tmp_path, tasks=["x", "y", "x"])
    assert "'x'" in str(err.value)


def test_missing_train_folder(tmp_path):
    write_split(tmp_path, "test", "x", good_records())
    with pytest.raises(DataError, match="no train/ folder") as err:
        resolve_task_names(tmp_path, tasks=["x"])
    assert str(tmp_path / "long_sequence") in str(err.value)
    with pytest.raises(DataError, match="no train/ folder"):
        available_tasks(tmp_path / "does-not-exist")


# --------------------------------------------------------------------------- layouts and a user's own tasks


def test_nested_layout_loads(tmp_path):
    write_task(tmp_path, "x", train=good_records(6), test=good_records(2))
    assert available_tasks(tmp_path) == ["x"]
    task = load_task(tmp_path, "x")
    assert len(task.split("train")) == 6 and len(task.split("test")) == 2
    assert task.labels == ["no", "yes"]


def test_flat_layout_loads(tmp_path):
    write_task(tmp_path, "x", train=good_records(6), test=good_records(2), nested=False)
    write_task(tmp_path, "y", nested=False)
    assert not (tmp_path / "long_sequence").exists()
    assert available_tasks(tmp_path) == ["x", "y"]
    assert resolve_task_names(tmp_path, tasks=["y", "x"]) == ["y", "x"]
    task = load_task(tmp_path, "x")
    assert len(task.split("train")) == 6 and len(task.split("test")) == 2
    assert task.labels == ["no", "yes"]


def test_user_jsonl_tasks_with_and_without_instruction(tmp_path):
    with_instr = [record(i, lab) for i, lab in enumerate(["pos", "neg", "pos", "neutral"])]
    without = [record(i, lab, instruction=None) for i, lab in enumerate(["a", "b", "a"])]

    def jsonl(recs):
        return "".join(json.dumps(r) + "\n" for r in recs)

    write_task(tmp_path, "mine", train=jsonl(with_instr), test=jsonl(with_instr[:2]), nested=False, suffix=".jsonl")
    write_task(tmp_path, "bare", train=jsonl(without), test=jsonl(without), nested=False, suffix=".jsonl")
    assert available_tasks(tmp_path) == ["bare", "mine"]

    tasks = load_benchmark(tmp_path, resolve_task_names(tmp_path, tasks=["mine", "bare"]))
    assert [t.name for t in tasks] == ["mine", "bare"]
    mine, bare = tasks
    assert mine.labels == ["neg", "neutral", "pos"]
    assert len(mine.split("train")) == 4 and len(mine.split("test")) == 2
    assert all(ex.instruction == "Answer yes or no.\n" for ex in mine.split("train"))
    assert {ex.prompt for ex in mine.split("train")} == {f"Answer yes or no.\nQuestion {i}?\nAnswer:" for i in range(4)}

    assert bare.labels == ["a", "b"]
    assert all(ex.instruction == "" and ex.task == "bare" for ex in bare.split("train"))
    assert {ex.prompt for ex in bare.split("test")} == {f"Question {i}?\nAnswer:" for i in range(3)}


def test_a_split_in_both_json_and_jsonl_is_refused_naming_both(tmp_path):
    write_task(tmp_path, "x", train=good_records(4))
    write_split(tmp_path, "train", "x", json.dumps(record(0)) + "\n", suffix=".jsonl")
    with pytest.raises(DataError, match=r"both .*x\.json and .*x\.jsonl exist"):
        load_task(tmp_path, "x")


def test_load_benchmark_subsample_depends_only_on_seed_and_name(tmp_path):
    labels = ["a", "b", "c"]
    for name in ("x", "y"):
        recs = [record(i, labels[i % 3]) for i in range(30)]
        write_task(tmp_path, name, train=recs, test=recs)
    x_first = load_benchmark(tmp_path, ["x", "y"], train_size=9, test_size=6, seed=3)
    y_first = load_benchmark(tmp_path, ["y", "x"], train_size=9, test_size=6, seed=3)
    assert x_first[0].split("train") == y_first[1].split("train")
    assert x_first[0].split("test") == y_first[1].split("test")
    assert len(x_first[0].split("train")) == 9 and len(x_first[0].split("test")) == 6
    assert Counter(ex.output for ex in x_first[0].split("train")) == {"a": 3, "b": 3, "c": 3}
    other_seed = load_benchmark(tmp_path, ["x"], train_size=9, test_size=6, seed=4)
    assert other_seed[0].split("train") != x_first[0].split("train")


def test_load_benchmark_without_outside_labels_does_not_warn(tmp_path, caplog):
    write_task(tmp_path, "x")
    with caplog.at_level(logging.WARNING, logger="rkif.data"):
        load_benchmark(tmp_path, ["x"])
    assert not [r for r in caplog.records if r.name == "rkif.data"]


# --------------------------------------------------------------------------- stratified_subsample

SKEWED = {"a": 60, "b": 30, "c": 7, "d": 3}


def test_subsample_deterministic_for_a_seed():
    exs = make_examples(SKEWED)
    first = stratified_subsample(exs, 25, seed=11)
    second = stratified_subsample(exs, 25, seed=11)
    assert first == second
    assert stratified_subsample(exs, 25, seed=12) != first


def test_subsample_exact_size_no_duplicates_subset():
    exs = make_examples(SKEWED)
    for size in (1, 4, 10, 25, 50, 99):
        got = stratified_subsample(exs, size, seed=0)
        assert len(got) == size
        assert len(set(got)) == size
        assert set(got) <= set(exs)


@pytest.mark.parametrize("size", [4, 10, 17, 25, 50, 73, 99])
def test_subsample_keeps_class_proportions(size):
    exs = make_examples(SKEWED)
    total = sum(SKEWED.values())
    got = Counter(ex.output for ex in stratified_subsample(exs, size, seed=5))
    for label, n in SKEWED.items():
        assert abs(got[label] - size * n / total) <= 1, (label, got)
    assert sum(got.values()) == size


def test_subsample_largest_remainder():
    # quotas for size 25: a 15.0, b 7.5, c 1.75, d 0.75 -> floors 15, 7, 1, 0; 2 left go to c (.75) and d (.75)
    got = Counter(ex.output for ex in stratified_subsample(make_examples(SKEWED), 25, seed=0))
    assert got == {"a": 15, "b": 7, "c": 2, "d": 1}


def test_subsample_is_shuffled_across_labels():
    got = stratified_subsample(make_examples({"a": 50, "b": 50}), 40, seed=1)
    labels = [ex.output for ex in got]
    assert labels != sorted(labels)


@pytest.mark.parametrize("size", [None, 100, 101, 10_000])
def test_subsample_returns_everything(size):
    exs = make_examples(SKEWED)
    got = stratified_subsample(exs, size, seed=0)
    assert got == exs
    assert got is not exs  # a copy: the caller may shuffle it


# --------------------------------------------------------------------------- ReplayMemory

DBPEDIA_LIKE = dict(zip(DBPEDIA_LABELS, [56, 76, 75, 68, 73, 77, 74, 71, 53, 87, 74, 70, 83, 63]))
CB_LIKE = {"contradiction": 119, "entailment": 115, "neutral": 16}
COPA_LIKE = {"A": 195, "B": 205}


@pytest.mark.parametrize("counts, size", [(DBPEDIA_LIKE, 20), (CB_LIKE, 5), (COPA_LIKE, 8)])
def test_memory_size_is_two_percent(counts, size):
    exs = make_examples(counts)
    mem = ReplayMemory(0.02, seed=42)
    stored = mem.add("t", exs)
    assert len(stored) == size and len(mem) == size
    assert len(set(stored)) == size and set(stored) <= set(exs)
    hist = Counter(ex.output for ex in stored)
    assert set(hist) == set(counts)  # 14 labels into 20 slots, 3 into 5, 2 into 8: every label gets a slot


def test_memory_copa_like_is_exactly_balanced():
    for seed in range(5):
        stored = ReplayMemory(0.02, seed=seed).add("copa", make_examples(COPA_LIKE))
        assert Counter(ex.output for ex in stored) == {"A": 4, "B": 4}


@pytest.mark.parametrize("counts", [DBPEDIA_LIKE, CB_LIKE], ids=["dbpedia-like", "cb-like"])
def test_memory_label_histogram_balanced_within_one(counts):
    for seed in range(5):
        stored = ReplayMemory(0.02, seed=seed).add("t", make_examples(counts))
        hist = Counter(ex.output for ex in stored)
        values = [hist[lab] for lab in counts]
        assert max(values) - min(values) <= 1, (seed, sorted(values))


def test_memory_fewer_slots_than_labels():
    exs = make_examples({f"l{i}": 10 for i in range(10)})  # 100 examples, 10 labels, 2 slots
    stored = ReplayMemory(0.02, seed=0).add("t", exs)
    assert len(stored) == 2
    assert len({ex.output for ex in stored}) == 2  # two different labels, never the same one twice


def test_memory_at_least_one_example():
    stored = ReplayMemory(0.02, seed=0).add("tiny", make_examples({"a": 3, "b": 2}))
    assert len(stored) == 1


def test_memory_real_dbpedia(real_root):
    exs = load_task(real_root, "dbpedia", ("train",)).split("train")
    stored = ReplayMemory(0.02, seed=42).add("dbpedia", exs)
    assert len(stored) == 20
    assert set(Counter(ex.output for ex in stored)) == set(DBPEDIA_LABELS)


def test_memory_pools_tasks_in_insertion_order():
    mem = ReplayMemory(0.02, seed=1)
    first = mem.add("dbpedia", make_examples(DBPEDIA_LIKE, task="dbpedia"))
    second = mem.add("copa", make_examples(COPA_LIKE, task="copa"))
    assert len(mem) == 28
    assert mem.examples() == first + second
    assert [ex.task for ex in mem.examples()] == ["dbpedia"] * 20 + ["copa"] * 8
    assert list(mem.by_task) == ["dbpedia", "copa"]


def test_memory_deterministic():
    exs = make_examples(DBPEDIA_LIKE)
    a = ReplayMemory(0.02, seed=42).add("dbpedia", exs)
    b = ReplayMemory(0.02, seed=42).add("dbpedia", exs)
    assert a == b
    assert ReplayMemory(0.02, seed=43).add("dbpedia", exs) != a
    # the draw depends on the task name too
    assert ReplayMemory(0.02, seed=42).add("other", exs) != a


def test_memory_state_dict_round_trip():
    mem = ReplayMemory(0.05, seed=9)
    mem.add("cb", make_examples(CB_LIKE, task="cb"))
    mem.add("copa", make_examples(COPA_LIKE, task="copa"))
    state = json.loads(json.dumps(mem.state_dict()))  # must survive JSON
    restored = ReplayMemory()
    restored.load_state_dict(state)
    assert restored.fraction == 0.05 and restored.seed == 9
    assert restored.by_task == mem.by_task
    assert restored.examples() == mem.examples()
    assert len(restored) == len(mem) == 12 + 20
    # the restored memory draws like the original
    more = make_examples({"x": 50, "y": 50}, task="new")
    assert restored.add("new", more) == mem.add("new", more)


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.0001, 2, float("nan")])
def test_memory_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        ReplayMemory(fraction)


def test_memory_fraction_one_keeps_everything():
    exs = make_examples(CB_LIKE)
    stored = ReplayMemory(1.0, seed=0).add("cb", exs)
    assert sorted(stored, key=lambda e: e.input) == sorted(exs, key=lambda e: e.input)


def test_memory_refuses_an_empty_task():
    with pytest.raises(DataError, match="no examples"):
        ReplayMemory(0.02).add("t", [])


def test_label_set_comes_from_the_full_train_split(shared_data):
    tasks = load_benchmark(shared_data, ["dbpedia"], train_size=5, test_size=20, seed=1)
    assert len(tasks[0].labels) == 14 and len({ex.output for ex in tasks[0].split("train")}) <= 5


def test_malformed_orders_file_names_the_file(tmp_path):
    (tmp_path / "orders.json").write_text("{not json")
    with pytest.raises(DataError, match="orders.json"):
        load_orders(tmp_path)
    (tmp_path / "orders.json").write_text('{"one": ["a"]}')
    with pytest.raises(DataError, match="orders.json"):
        load_orders(tmp_path)


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "train" / "x.json"
    path.parent.mkdir()
    path.write_bytes(b"\xff\xfe[1]")
    with pytest.raises(DataError, match="x.json"):
        read_records(path)


@pytest.mark.parametrize("layout", ["standard", "superni"])
def test_a_repeated_task_is_refused_in_every_layout(layout, tiny_data, superni_data):
    root, names = (tiny_data, ["alpha", "beta"]) if layout == "standard" else (superni_data, sorted(
        p.name for p in superni_data.iterdir()))
    assert resolve_task_names(root, layout, tasks=names) == names
    with pytest.raises(DataError, match="repeats a task"):
        resolve_task_names(root, layout, tasks=[names[0], names[1], names[0]])
