"""L2P: a pool of prompts with keys, the top-N selected per input by cosine similarity; backbone frozen.

Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022 (official ``google-research/l2p``,
``configs/cifar100_l2p.py``); LLM port ``BeyonderXX/TRACE`` (``model/Dynamic_network/L2P.py``).
BASELINES.md section 10. A pool of P prompts, each L token embeddings, with one key k_i (dim d) each:

    q(x)  = mean of the frozen input-token embeddings over the prompt's tokens           [B, d]
    s_i   = cos(q(x), k_i);  K_x = the N keys with the highest s_i                        (top-N)
    input = [P_{K_x,1}; ...; P_{K_x,N}; embed(x)]   (N * L prefix tokens, attention mask extended)
    loss  = CE - lambda * (1 / B) sum_b sum_{i in K_x_b} s_i                              (pull term)

The backbone (and the placeholder LoRA peft needs to wrap it) is frozen: only the prompts and keys train,
and only the selected ones get gradient (prompts through CE, keys through the pull term; the query is
frozen). No task id in training or at test. Defaults are TRACE's LLM values (pool 10, length 5, top-N 3,
lambda 0.5, prompts initialised from random vocabulary embeddings); the official ViT values are pool 10,
length 10, top-N 4, lambda 1.0, Adam lr 0.03 constant (set the run's ``lr`` and ``lr_scheduler``; keys
are initialised uniform(-1, 1) as there).

Hooks: ``families`` (generative only), ``peft_config`` (``PromptMethod``'s frozen placeholder LoRA), the
backbone input hook (selection and prefix, ``Backbone.add_input_hook``), ``extra_loss`` (the pull term,
logged as ``l2p_pull``), ``on_train_begin`` / ``after_task`` (how often each prompt was selected, in
``diagnostics``). The pool is a submodule of the backbone, so it is saved and restored with the adapters.

Deviations: the query pools the prompt's tokens only (TRACE averages every input position, padding and,
in training, the answer too, so its training and test queries differ); TRACE's keys are the prompts' mean
embedding rather than separate learnable keys (the official L2P's learnable keys are used here); TRACE
scales the initial prompts by 1/100, here they are the vocabulary rows themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rkif.backbones.base import masked_mean
from rkif.checks import AT_LEAST_ONE, NON_NEGATIVE, fail
from rkif.data import Example, Task
from rkif.methods.base import MethodConfig, PromptMethod
from rkif.methods.registry import register

logger = logging.getLogger(__name__)


@dataclass
class L2PConfig(MethodConfig):
    pool_size: int = 10         # P prompts in the pool
    prompt_length: int = 5      # L tokens per prompt
    top_n: int = 3              # N prompts prepended to each input
    pull_weight: float = 0.5    # lambda of the pull term

    method: ClassVar[str] = "l2p"

    def check(self) -> None:
        super().check()
        self.check_ranges({"pool_size": AT_LEAST_ONE, "prompt_length": AT_LEAST_ONE, "top_n": AT_LEAST_ONE,
                           "pull_weight": NON_NEGATIVE})
        if self.top_n > self.pool_size:
            raise fail(self.label("top_n"), self.top_n, f"expected at most pool_size ({self.pool_size})")


class PromptPool(nn.Module):
    """P prompts [P, L, d] and their keys [P, d]; ``forward`` selects the top-N per query."""

    def __init__(self, prompts: torch.Tensor, keys: torch.Tensor):
        super().__init__()
        self.prompts = nn.Parameter(prompts)
        self.keys = nn.Parameter(keys)

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, P]: cos(q_b, k_i)."""
        q = nn.functional.normalize(query.to(self.keys.dtype), dim=-1)
        return q @ nn.functional.normalize(self.keys, dim=-1).T

    def forward(self, query: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prefix [B, N * L, d], the selected indices [B, N] and their similarities [B, N] (best first)."""
        sim, idx = self.similarity(query).topk(top_n, dim=1)
        prefix = self.prompts[idx]                                       # [B, N, L, d]
        return prefix.flatten(1, 2), idx, sim


def pull_term(selected_similarity: torch.Tensor) -> torch.Tensor:
    """(1 / B) sum_b sum_n cos(q_b, k_sel(b, n)): the official reduce_sim (subtracted, times lambda)."""
    return selected_similarity.sum() / selected_similarity.shape[0]


@register
class L2P(PromptMethod):
    name = "l2p"
    config_class = L2PConfig

    def __init__(self, config: L2PConfig, backbone, run):
        super().__init__(config, backbone, run)                         # frozen backbone, placeholder LoRA off
        embedding = self.embedding
        rows = torch.randint(embedding.shape[0], (config.pool_size, config.prompt_length))
        keys = torch.empty(config.pool_size, embedding.shape[1]).uniform_(-1, 1)
        backbone.prompt_pool = PromptPool(embedding[rows].clone(), keys.to(embedding.device))
        self.check_frozen(["prompt_pool.keys", "prompt_pool.prompts"])
        backbone.add_input_hook(self._prefix, prefix_length=config.top_n * config.prompt_length)
        self.pool: PromptPool = backbone.prompt_pool
        self.selected: torch.Tensor | None = None       # [B, N] of the last sequences (tests, diagnostics)
        self._pull: torch.Tensor | None = None
        self._counts = torch.zeros(config.pool_size, dtype=torch.long)
        self.selection_log: list[dict] = []

    # -- selection ------------------------------------------------------------------------------
    def _prefix(self, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Input hook: the selected prompts of each new sequence; in training, the pull term for ``extra_loss``."""
        query = masked_mean(embeds.detach(), prompt_mask)
        prefix, self.selected, sim = self.pool(query, self.config.top_n)
        if self.pool.training and torch.is_grad_enabled():
            self._pull = pull_term(sim)
            self._counts += torch.bincount(self.selected.flatten().cpu(), minlength=self.config.pool_size)
        return prefix

    def extra_loss(self, model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        """-lambda * the pull term of the batch just forwarded."""
        pull, self._pull = self._pull, None
        if pull is None or not self.config.pull_weight:
            return {}
        return {"l2p_pull": -self.config.pull_weight * pull}

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        self._counts.zero_()

    def after_task(self, stage: int, tasks: list[Task], train: list[Example]) -> None:
        self.selection_log.append({"stage": stage, "selected": self._counts.tolist()})
        logger.info("%s after stage %d: prompt selections %s", self.name, stage, self._counts.tolist())

    # -- state ----------------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        return {"selections": list(self.selection_log)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The pool is an adapter tensor (the runner saves it); here, the selection counts."""
        return {}, {"selections": list(self.selection_log)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.selection_log = list(meta.get("selections", []))
