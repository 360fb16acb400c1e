"""SeqLoRA: one LoRA adapter trained through the whole sequence, no replay, no regulariser.

Hooks: none (the base class's no-ops). The lower bound every continual method must beat.
"""

from rkif.methods.base import Method
from rkif.methods.registry import register


@register
class SeqLoRA(Method):
    name = "seqlora"
    parameter_access = "loss"             # the Trainer trains; nothing else touches the model
