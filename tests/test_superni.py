"""SuperNI in SAPT's layout: loading, the prompt, the orders, bad input, ROUGE-L per task, a CLI run end to end."""

import json
import re
from pathlib import Path

import pytest
import torch

from rkif import runner
from rkif.cli import build_parser, main, parse_args
from rkif.config import RunConfig
from rkif.data import DataError, Example, ReplayMemory, Task, load_benchmark, resolve_task_names
from rkif.data.superni import ORDERS
from tests.conftest import superni_task, write_superni
from tests.test_backbones import tiny_llama

COLOUR, PAINT = "task901_synthetic_colour", "task902_synthetic_paint"


def load(root: Path, names=(COLOUR, PAINT), **kw) -> list[Task]:
    return load_benchmark(root, list(names), None, None, benchmark="superni", **kw)


def test_loads_every_split_with_its_references(superni_data):
    colour, paint = load(superni_data)
    assert colour.metric == paint.metric == "rougeL" and colour.free_text
    assert len(colour.split("train")) == 8 and len(colour.split("test")) == 4
    first, second = colour.split("train")[:2]
    assert first.answers == ("the red one",) and first.output == "the red one"
    assert second.answers == ("the blue one", "blue") and second.output == "the blue one"   # trains on the first
    # a single-string output (task363, 875, 1687 in the published set) is one reference
    assert all(len(ex.answers) == 1 for ex in paint.split("train"))
    assert paint.split("train")[1].answers == ("the blue one",)
    dev = load(superni_data, eval_split="dev")[0]
    assert dev.split("dev") == colour.split("test")                   # dev.json and test.json are identical


def test_the_superni_prompt(superni_data):
    ex = load(superni_data)[0].split("train")[0]
    assert ex.prompt == ("Definition: In this task (task901_synthetic_colour) you are given a sentence about an item. "
                         "Name the item's colour.\n\nNow complete the following example -\n"
                         "Input: Item 0 of task901_synthetic_colour is painted red and stands in row 0.\nOutput: ")
    assert ex.instruction.startswith("Definition: ") and ex.input.startswith("Input: ")


def test_subsampling_is_random_and_seeded(superni_data):
    a = load_benchmark(superni_data, [COLOUR], 3, 2, benchmark="superni", seed=1)[0]
    b = load_benchmark(superni_data, [COLOUR], 3, 2, benchmark="superni", seed=1)[0]
    c = load_benchmark(superni_data, [COLOUR], 3, 2, benchmark="superni", seed=2)[0]
    assert len(a.split("train")) == 3 and len(a.split("test")) == 2
    assert a.split("train") == b.split("train") and a.split("train") != c.split("train")


def test_the_published_orders_and_the_nested_layout(tmp_path):
    write_superni(tmp_path / "CL_Benchmark" / "SuperNI", {name: (1, 1) for name in ORDERS[1]})
    root = tmp_path / "CL_Benchmark"                                  # SAPT's folder above SuperNI/ works too
    numbers = {o: " ".join(n.split("_")[0].removeprefix("task") for n in resolve_task_names(root, "superni", o))
               for o in (1, 2)}
    assert numbers[1] == "1572 363 1290 181 002 1510 639 1729 073 1590 748 511 591 1687 875"
    assert numbers[2] == "748 073 1590 639 1572 1687 591 363 1510 1729 181 511 002 1290 875"
    assert len(load_benchmark(root, ORDERS[2][:2], benchmark="superni")) == 2
    with pytest.raises(DataError, match="unknown order 3 for the superni benchmark"):
        resolve_task_names(root, "superni", 3)


def test_a_missing_task_folder_is_named(superni_data):
    with pytest.raises(DataError, match=r"missing under .*superni: \['task1572_samsum_summary', 'task363_sst2"):
        resolve_task_names(superni_data, "superni", 1)
    with pytest.raises(DataError, match="missing under .*: \\['task999_nothing'\\]"):
        resolve_task_names(superni_data, "superni", tasks=[COLOUR, "task999_nothing"])
    assert resolve_task_names(superni_data, "superni", tasks=[PAINT, COLOUR]) == [PAINT, COLOUR]


def _break(key, value):
    def edit(data):
        if value is KeyError:
            del data[key]
        else:
            data[key] = value
    return edit


def _set_instance(i, key, value):
    def edit(data):
        if value is KeyError:
            del data["Instances"][i][key]
        else:
            data["Instances"][i][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_break("Definition", KeyError), "train.json: no 'Definition'"),
    (_break("Definition", []), "train.json: 'Definition' is \\[\\]; expected a non-empty list of strings"),
    (_break("Definition", [3]), "train.json: 'Definition' is \\[3\\]"),
    (_break("Instances", []), "train.json: 'Instances' is missing or empty \\(task 'task901_synthetic_colour'\\)"),
    (_break("Instances", KeyError), "train.json: 'Instances' is missing or empty"),
    (_set_instance(2, "output", 5), "train.json: instance 2 \\(id task901-train0002\\) has 'output' of type int"),
    (_set_instance(3, "output", ["yellow", 7]), "instance 3 \\(id task901-train0003\\) has 'output' of type list; "
                                                "expected a non-empty list of strings"),
    (_set_instance(0, "output", []), "instance 0 \\(id task901-train0000\\) has 'output'"),
    (_set_instance(1, "output", KeyError), "instance 1 \\(id task901-train0001\\) has 'output' of type NoneType"),
    (_set_instance(1, "input", KeyError), "instance 1 \\(id task901-train0001\\) has no string 'input'"),
])
def test_bad_task_files_name_file_and_record(superni_data, edit, message):
    path = superni_data / COLOUR / "train.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape(str(path.parent)) + ".*" + message):
        load(superni_data)


def test_bad_files_and_missing_splits(superni_data):
    test = superni_data / PAINT / "test.json"
    test.unlink()
    with pytest.raises(DataError, match=re.escape(str(test)) + ": missing"):
        load(superni_data)
    load(superni_data, eval_split="dev")                                     # dev.json is still there
    test.write_text("[1, 2]")
    with pytest.raises(DataError, match=re.escape(str(test)) + ": expected a SuperNI task object, got a JSON list"):
        load(superni_data)
    test.write_text('{"Definition": ["x"],')
    with pytest.raises(DataError, match=re.escape(str(test)) + ": not valid JSON"):
        load(superni_data)


def test_references_survive_the_replay_memory_state(superni_data):
    train = load(superni_data)[0].split("train")
    memory = ReplayMemory(fraction=0.5, seed=3)
    memory.add(COLOUR, train)
    restored = ReplayMemory()
    restored.load_state_dict(json.loads(json.dumps(memory.state_dict())))       # as method.json stores it
    assert restored.examples() == memory.examples()
    assert any(len(ex.answers) == 2 for ex in restored.examples())
    assert len({*restored.examples()}) == len(restored.examples())            # still hashable


class FixedAnswers:
    """A stand-in backbone that answers from a table, so evaluate's scores can be checked by hand."""

    device = torch.device("cpu")

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers

    def predict(self, examples, desc=""):
        return self.answers[examples[0].task][:len(examples)]


def test_each_task_is_scored_by_its_own_metric(superni_data):
    colour = load(superni_data)[0]
    # references of the 4 test instances: [the red one], [the blue one, blue], [the green one], [the yellow one, yellow]
    answers = {COLOUR: ["the red one", "blue", "green", ""],          # ROUGE-L 1, max(1/2, 1) = 1, 1/2, 0
               "cls": ["Yes", "yes"]}                                  # exact match 1, 0
    cls = Task("cls", {"test": [Example("cls", "x", "yes"), Example("cls", "y", "no")]})
    scores = runner.evaluate(FixedAnswers(answers), [colour, cls], "test", "eval")
    assert scores == pytest.approx([2.5 / 4, 0.5])


def test_generation_is_bounded_by_the_longest_train_reference():
    backbone = tiny_llama()
    task = Task("t", {"train": [Example("t", "Input: x\nOutput: ", "the yellow one", "", ("the yellow one", "x")),
                                Example("t", "Input: y\nOutput: ", "red", "")]}, metric="rougeL", free_text=True)
    backbone.set_answer_space([task])
    longest = len(backbone.tokenizer(" the yellow one", add_special_tokens=False)["input_ids"])
    assert longest < backbone.config.max_target_length
    assert backbone.answer_limit == longest + 1                                     # + EOS
    backbone.config.max_target_length = 2
    backbone.set_answer_space([task])
    assert backbone.answer_limit == 2 + 1                                           # capped by max_target_length


def test_raw_prompts_leave_the_trailing_space_to_the_answer(superni_data, monkeypatch):
    backbone = tiny_llama()
    backbone.config.max_length = 128
    encoded = []
    real = backbone._encode
    monkeypatch.setattr(backbone, "_encode", lambda text: encoded.append(text) or real(text))
    ex = load(superni_data)[0].split("train")[0]
    backbone.prompt_ids(ex)
    assert ex.input.endswith("\nOutput: ") and encoded[-1].endswith("\nOutput:")   # the answer is " " + label


def test_choosing_among_labels_is_refused_for_free_text(superni_data):
    from tests.test_backbones import minilm

    tasks = load(superni_data)
    backbone = tiny_llama()
    backbone.config.answer_mode = "rank"
    with pytest.raises(ValueError, match="free-text.*--answer-mode generate"):
        backbone.set_answer_space(tasks)
    with pytest.raises(ValueError, match="encoder family.*free-text.*causal or seq2seq"):
        minilm().set_answer_space(tasks)


def test_the_benchmark_sets_superni_lengths_unless_given():
    parser = build_parser()
    args = parse_args(parser, ["run", "--benchmark", "superni", "--model", "smollm2"])
    assert (args.max_length, args.max_target_length) == (512, 50)          # over smollm2's max_length 128
    args = parse_args(build_parser(), ["run", "--benchmark", "superni", "--max-target-length", "20"])
    assert (args.max_length, args.max_target_length) == (512, 20)
    args = parse_args(build_parser(), ["run", "--benchmark", "standard"])
    assert (args.max_length, args.max_target_length) == (128, 16)


def test_a_cli_run_on_two_superni_tasks_scores_rouge_l(superni_data, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--benchmark", "superni", "--data", str(superni_data), "--tasks", f"{COLOUR},{PAINT}",
                 "--model", str(tiny_llama_dir), "--family", "causal", "--method", "replay",
                 "--memory-fraction", "0.25", "--train-size", "all", "--test-size", "all", "--epochs", "1",
                 "--batch-size", "4", "--lr", "1e-3", "--output", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["tasks"] == [COLOUR, PAINT] and res["metrics"] == ["rougeL", "rougeL"]
    assert res["config"]["benchmark"] == "superni"
    assert (res["config"]["backbone"]["max_length"], res["config"]["backbone"]["max_target_length"]) == (512, 50)
    scores = [a for row in res["accuracy"] for a in row] + res["initial_accuracy"]
    assert len(res["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in scores)
    assert res["op"] == pytest.approx((res["accuracy"][0][1] + res["accuracy"][1][1]) / 2)
    assert res["bwt"] == pytest.approx(res["accuracy"][0][1] - res["accuracy"][0][0])
    memory = json.loads((out / "checkpoints" / "stage_1" / "method.json").read_text())["memory"]["by_task"]
    assert [ex["references"] for ex in memory[COLOUR]] and all("references" in ex for ex in memory[COLOUR])
    assert "ROUGE-L %" in capsys.readouterr().out                          # the printed matrix names its metric


def test_the_cli_names_a_bad_file_before_loading_a_model(superni_data, tmp_path, caplog):
    path = superni_data / PAINT / "train.json"
    data = superni_task(PAINT, 4)
    del data["Definition"]
    path.write_text(json.dumps(data))
    code = main(["run", "--benchmark", "superni", "--data", str(superni_data), "--tasks", f"{COLOUR},{PAINT}",
                 "--model", "no-such-model-folder", "--family", "causal", "--output", str(tmp_path / "run")])
    assert code == 2 and f"{path}: no 'Definition'" in caplog.text


def test_a_superni_grid_gets_the_benchmark_lengths_unless_it_sets_them(tmp_path):
    from rkif.bench import grid_runs

    grid = {"name": "s", "benchmark": "superni", "methods": ["seqlora"], "orders": [1, 2], "backbone": {}}
    def lengths(g):
        return [(r.order, r.backbone.max_length, r.backbone.max_target_length) for r in grid_runs(g, tmp_path)]

    assert lengths(grid) == [(1, 512, 50), (2, 512, 50)]
    assert lengths({**grid, "backbone": {"max_length": 256}}) == [(1, 256, 50), (2, 256, 50)]
    assert lengths({**grid, "benchmark": "standard"}) == [(1, 128, 16), (2, 128, 16)]


def test_bench_checks_superni_data_in_its_own_layout(superni_data, tmp_path):
    from rkif.bench import check_data

    names = sorted(p.name for p in superni_data.iterdir() if p.is_dir())
    run = RunConfig(benchmark="superni", tasks=names, data=str(superni_data))
    check_data([run], tmp_path / "grid.toml")                                  # the SuperNI loader, no error
    (superni_data / names[0] / "train.json").write_text("{}")
    with pytest.raises(ValueError, match="train.json"):
        check_data([run], tmp_path / "grid.toml")
