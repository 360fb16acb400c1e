"""LoRAReplay: one LoRA adapter; each task's data is mixed with the memory of all earlier tasks.

Hooks: ``before_task`` (concatenate the memory, the Trainer shuffles), ``after_task`` (store a
class-balanced ``memory_fraction`` of the task, 2% by default as in the paper).
"""

from rkif.data import Example, Task
from rkif.methods.base import MemoryMethod
from rkif.methods.registry import register


@register
class Replay(MemoryMethod):
    name = "replay"
    parameter_access = "loss"             # the Trainer trains; nothing else touches the model

    def before_task(self, stage: int, tasks: list[Task], train: list[Example]) -> list[Example]:
        return train + self.memory.examples()
