"""MTL: the multi-task upper bound. One LoRA trained once on the union of every task of the run.

Hooks: ``stages`` returns a single stage holding every task, so the accuracy matrix has one
column; BWT and FWT are undefined for it.
"""

from rkif.data import Task
from rkif.methods.base import Method
from rkif.methods.registry import register


@register
class MultiTask(Method):
    name = "mtl"
    parameter_access = "loss"             # the Trainer trains; nothing else touches the model

    def stages(self, tasks: list[Task]) -> list[list[Task]]:
        return [list(tasks)]
