"""Worker for the DDP test: two tasks of Recurrent-KIF on the toy backbone, final weights to OUT/rank<r>,
and sharded evaluation: the toy run's accuracy matrix and each family's answers to OUT/eval<r>.json.

Run as ``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT 8`` (per-device batch 8) or in one
process as ``python tests/ddp_worker.py OUT 16`` (the same global batch).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file  # noqa: E402

from rkif.config import RunConfig  # noqa: E402
from rkif.data import Task  # noqa: E402
from rkif.distributed import leave_process_group, predict_sharded  # noqa: E402
from rkif.methods import resolve  # noqa: E402
from rkif.methods.base import parse_options  # noqa: E402
from rkif.runner import evaluate, learn_stage  # noqa: E402
from rkif.training import training_device  # noqa: E402
from tests.conftest import MINILM_WEIGHTS_MISSING, ToyBackbone, toy_examples  # noqa: E402
from tests.test_backbones import EXAMPLES, minilm, tiny_llama, tiny_t5  # noqa: E402

PROBE = EXAMPLES[:7]        # odd: rank 0 answers 4, rank 1 answers 3


def count_examples(backbone) -> list[int]:
    """The sizes of the batches ``backbone.predict_batch`` answers from now on."""
    sizes, real = [], backbone.predict_batch
    backbone.predict_batch = lambda batch: sizes.append(len(batch)) or real(batch)
    return sizes


def main(out: str, batch_size: int) -> None:
    training_device()               # as the runner's build_learner: under torchrun accelerate joins the group here
    backbone = ToyBackbone(seed=0)
    run = RunConfig(batch_size=batch_size, epochs=6, lr=0.05, lr_scheduler="constant", memory_fraction=0.25, seed=3)
    cls, opts = resolve("rkif", {"inner_steps": 2, "outer_steps": 2, "outer_batch_size": 8})
    method = cls(parse_options(cls.config_class, opts), backbone, run)
    # test sets of 31 and 1 examples: the ranks answer 16 + 1 and 15 + 0 examples per evaluation
    tasks = [Task("A", {"train": toy_examples("A", 16, 1), "test": toy_examples("A", 31, 11)}),
             Task("B", {"train": toy_examples("B", 16, 2), "test": toy_examples("B", 1, 12)})]
    toy_sizes = count_examples(backbone)
    columns = [evaluate(backbone, tasks, "test", "untrained")]
    for j, task in enumerate(tasks):              # the runner's loop: learn a stage, evaluate every task
        learn_stage(j, [task], backbone, method, run, os.path.join(out, "trainer"))
        columns.append(evaluate(backbone, tasks, "test", f"after {task.name}"))
    result = {"matrix": columns, "toy_predicted": sum(toy_sizes), "families": {}}
    for build in (tiny_llama, tiny_t5) + (() if MINILM_WEIGHTS_MISSING else (minilm,)):
        family = build()
        sizes = count_examples(family)
        answers = predict_sharded(family, PROBE, desc=family.family)
        predicted = sum(sizes)
        result["families"][family.family] = {"answers": answers, "predicted": predicted,
                                             "alone": family.predict(PROBE)}     # this rank, every example
    rank = os.environ.get("RANK", "0")
    Path(out, f"eval{rank}.json").write_text(json.dumps(result))
    save_file({n: p.detach().contiguous() for n, p in backbone.trainable_parameters().items()},
              os.path.join(out, f"rank{rank}.safetensors"))
    leave_process_group()                       # as the CLI does: gloo's threads end before the interpreter
    Path(out, f"exit{rank}.json").write_text(json.dumps({"threads": thread_names()}))


def thread_names() -> list[str]:
    """This process's native threads (Linux; gloo's are pt_gloo_runloop and gloo_tcp_loop)."""
    names = []
    for task in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(task.read_text().strip())
        except OSError:                         # a thread that ended meanwhile
            pass
    return sorted(names)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
