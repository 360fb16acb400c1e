"""SuperNI (Super-NaturalInstructions) in SAPT's layout: 15 generation tasks scored by ROUGE-L.

No SuperNI data ships with rkif; a user points ``--data`` at their own copy::

    ROOT/<task>/{train,dev,test}.json          # or ROOT/SuperNI/<task>/... (SAPT's CL_Benchmark folder)

Each file is a whole SuperNI task JSON: ``Definition`` (a list of strings; the first is used),
``Positive Examples``, ``Negative Examples`` (not used by the zero-shot prompt) and ``Instances``, each
``{"id", "input", "output"}`` with ``output`` a list of reference strings (a single string in three
tasks of the published set, read as a one-element list).

Prompt (SAPT's zero-shot SuperNI prompt, definition stripped)::

    Definition: {Definition[0]}\\n\\nNow complete the following example -\\nInput: {input}\\nOutput: <answer>

The instruction part (``Definition: ... -\\n``) goes to ``Example.instruction`` and ``Input: ...Output: ``
to ``Example.input``, so a causal model that must cut a long prompt keeps the definition and the
``Output:`` cue. The model trains on the first reference (SAPT draws one at random); it is scored by
ROUGE-L F-measure with stemming, the maximum over all references (``rkif.metrics.rouge_l``, the
official natural-instructions scorer), also for the three classification tasks (363, 875, 1687),
which the R-KIF release scores by accuracy instead.

Subsampling (``--train-size``/``--test-size``) is a seeded random sample: outputs are free text, so
there are no classes to stratify.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rkif.data import DataError, Example, Task

METRIC = "rougeL"
INSTRUCTION = "Definition: {definition}\n\nNow complete the following example -\n"
INPUT = "Input: {input}\nOutput: "

# SAPT gen_script_superni_t5.py (AimMerging's orders 7 and 8), as the official task folder names.
_NAMES = {
    "002": "task002_quoref_answer_generation", "073": "task073_commonsenseqa_answer_generation",
    "181": "task181_outcome_extraction", "363": "task363_sst2_polarity_classification",
    "511": "task511_reddit_tifu_long_text_summarization", "591": "task591_sciq_answer_generation",
    "639": "task639_multi_woz_user_utterance_generation", "748": "task748_glucose_reverse_cause_event_detection",
    "875": "task875_emotion_classification", "1290": "task1290_xsum_summarization",
    "1510": "task1510_evalution_relation_extraction", "1572": "task1572_samsum_summary",
    "1590": "task1590_diplomacy_text_generation", "1687": "task1687_sentiment140_classification",
    "1729": "task1729_personachat_generate_next",
}
ORDERS: dict[int, list[str]] = {
    1: [_NAMES[n] for n in ("1572", "363", "1290", "181", "002", "1510", "639", "1729", "073", "1590", "748",
                            "511", "591", "1687", "875")],
    2: [_NAMES[n] for n in ("748", "073", "1590", "639", "1572", "1687", "591", "363", "1510", "1729", "181",
                            "511", "002", "1290", "875")],
}


def task_root(root: Path) -> Path:
    """The folder holding the task folders: ``ROOT/SuperNI`` when there is one, else ``ROOT``."""
    nested = root / "SuperNI"
    return nested if nested.is_dir() else root


def available_tasks(root: Path) -> list[str]:
    """Task folders under the root (those holding a train.json)."""
    base = task_root(root)
    if not base.is_dir():
        raise DataError(f"SuperNI data root {base} is not a folder (set --data to your copy)")
    return sorted(p.name for p in base.iterdir() if (p / "train.json").is_file())


def resolve_task_names(root: Path, order: int = 1, tasks: list[str] | None = None) -> list[str]:
    """An explicit task list, or published order 1 or 2; every task's folder must exist (``rkif.data.
    resolve_task_names`` dispatches here and refuses a repeated task for every benchmark)."""
    if tasks:
        names = list(tasks)
    elif order in ORDERS:
        names = ORDERS[order]
    else:
        raise DataError(f"unknown order {order} for the superni benchmark (known: {sorted(ORDERS)})")
    known = set(available_tasks(root))
    missing = [n for n in names if n not in known]
    if missing:
        raise DataError(f"SuperNI task folder(s) with a train.json missing under {task_root(root)}: {missing}")
    return names


def read_task_file(path: Path) -> dict:
    """One whole SuperNI task JSON (an object), with errors naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: missing (SuperNI layout: <root>/<task>/{{train,dev,test}}.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a SuperNI task object, got a JSON {type(data).__name__}")
    return data


def definition(path: Path, data: dict) -> str:
    """``Definition[0]``, stripped; a missing or empty definition is an error."""
    if "Definition" not in data:
        raise DataError(f"{path}: no 'Definition' (a SuperNI task file has the task's definition as a list of strings)")
    value = data["Definition"]
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: 'Definition' is {data['Definition']!r:.60}; expected a non-empty list of strings")
    return value.strip()


def references(path: Path, i: int, inst: dict) -> list[str]:
    """The reference outputs of instance ``i``: a non-empty list of strings (a lone string is one reference)."""
    out = inst.get("output")
    if isinstance(out, str):
        out = [out]
    if not isinstance(out, list) or not out or not all(isinstance(o, str) for o in out):
        raise DataError(f"{path}: instance {i} (id {inst.get('id', '?')}) has 'output' of type "
                        f"{type(inst.get('output')).__name__}; expected a non-empty list of strings")
    return out


def parse_task(name: str, path: Path, data: dict) -> list[Example]:
    """The examples of one split file, in the SuperNI prompt format."""
    instruction = INSTRUCTION.format(definition=definition(path, data))
    instances = data.get("Instances")
    if not isinstance(instances, list) or not instances:
        raise DataError(f"{path}: 'Instances' is missing or empty (task {name!r})")
    examples = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise DataError(f"{path}: instance {i} is not an object")
        if not isinstance(inst.get("input"), str):
            raise DataError(f"{path}: instance {i} (id {inst.get('id', '?')}) has no string 'input'")
        refs = references(path, i, inst)
        examples.append(Example(name, INPUT.format(input=inst["input"]), refs[0], instruction, tuple(refs)))
    return examples


def load_task(root: Path, name: str, splits: tuple[str, ...] = ("train", "test")) -> Task:
    """Load the named splits of one SuperNI task folder."""
    task = Task(name, metric=METRIC, free_text=True)
    for split in splits:
        path = task_root(root) / name / f"{split}.json"
        task.splits[split] = parse_task(name, path, read_task_file(path))
    if "train" in task.splits:
        task.label_set = sorted({ex.output for ex in task.splits["train"]})
    return task


def random_subsample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """A seeded random sample of ``size`` examples in file order (all of them if None or larger)."""
    if size is None or size >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in keep]


def load_benchmark(root: Path, names: list[str], train_size: int | None = None, test_size: int | None = None,
                   eval_split: str = "test", seed: int = 42) -> list[Task]:
    """Load and subsample every task of a run (the sample depends only on seed and task name)."""
    tasks = []
    for name in names:
        task = load_task(root, name, ("train", eval_split))
        task_seed = seed + sum(map(ord, name))
        task.splits["train"] = random_subsample(task.splits["train"], train_size, task_seed)
        task.splits[eval_split] = random_subsample(task.splits[eval_split], test_size, task_seed + 1)
        tasks.append(task)
    return tasks
