"""Worker for the DDP test: two tasks of Recurrent-KIF on the toy backbone, final weights to OUT/rank<r>.

Run as ``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT 8`` (per-device batch 8) or in one
process as ``python tests/ddp_worker.py OUT 16`` (the same global batch).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from rkif.config import RunConfig  # noqa: E402
from rkif.data import Task  # noqa: E402
from rkif.methods import resolve  # noqa: E402
from rkif.methods.base import parse_options  # noqa: E402
from tests.conftest import ToyBackbone, toy_examples, train_sequence  # noqa: E402


def main(out: str, batch_size: int) -> None:
    backbone = ToyBackbone(seed=0)
    run = RunConfig(batch_size=batch_size, epochs=6, lr=0.05, lr_scheduler="constant", memory_fraction=0.25, seed=3)
    cls, opts = resolve("rkif", {"inner_steps": 2, "outer_steps": 2, "outer_batch_size": 8})
    method = cls(parse_options(cls.config_class, opts), backbone, run)
    tasks = [Task("A", {"train": toy_examples("A", 16, 1)}), Task("B", {"train": toy_examples("B", 16, 2)})]
    train_sequence(backbone, method, run, tasks, os.path.join(out, "trainer"))
    rank = os.environ.get("RANK", "0")
    save_file({n: p.detach().contiguous() for n, p in backbone.trainable_parameters().items()},
              os.path.join(out, f"rank{rank}.safetensors"))
    if torch.distributed.is_initialized():      # a clean exit: gloo aborts at teardown otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
