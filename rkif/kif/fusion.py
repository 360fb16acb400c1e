"""Knowledge fusion (Eq. 2, 5, 9) and the paper's alternative fusions (Table 2).

All functions take and return ``{name: tensor}`` dicts. The fusion acts on every trainable scalar,
i.e. on the LoRA factors A and B themselves (not on their product B @ A), as Eq. 9 is written.
Element-wise functions work on local shards as they are; those that total over all scalars take
``shards`` (``rkif.sharding.Sharding``) and total over every process's shard.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rkif.sharding import WHOLE, Sharding

Tensors = Mapping[str, torch.Tensor]


def task_vector(after: Tensors, before: Tensors) -> dict[str, torch.Tensor]:
    """tau = theta_after - theta_before (Eq. 2 for tau_in, Eq. 5 for tau_out)."""
    return {n: after[n] - before[n] for n in after}


def drop_shared(m_in: Tensors, m_out: Tensors) -> dict[str, torch.Tensor]:
    """"-Share" ablation: m_in = 0 where both masks are 1 (the shared region keeps only tau_out)."""
    return {n: m_in[n] & ~m_out[n] for n in m_in}


def masked_fusion(anchor: Tensors, tau_in: Tensors, tau_out: Tensors,
                  m_in: Tensors, m_out: Tensors) -> dict[str, torch.Tensor]:
    """theta_{b+1} = theta_b + m_in * tau_in + m_out * tau_out (Eq. 9)."""
    return {n: anchor[n] + m_in[n].to(anchor[n].dtype) * tau_in[n] + m_out[n].to(anchor[n].dtype) * tau_out[n]
            for n in anchor}


def weighted_fusion(anchor: Tensors, tau_in: Tensors, tau_out: Tensors,
                    w_in: Tensors, w_out: Tensors) -> dict[str, torch.Tensor]:
    """theta_{b+1} = theta_b + w_in * tau_in + w_out * tau_out with real-valued (soft) weights."""
    return {n: anchor[n] + w_in[n] * tau_in[n] + w_out[n] * tau_out[n] for n in anchor}


def sum_fusion(anchor: Tensors, tau_in: Tensors, tau_out: Tensors) -> dict[str, torch.Tensor]:
    """"-KI": no identification, theta_{b+1} = theta_b + tau_in + tau_out (plain sequential steps)."""
    return {n: anchor[n] + tau_in[n] + tau_out[n] for n in anchor}


def global_weights(i_in: Tensors, i_out: Tensors, shards: Sharding = WHOLE) -> tuple[float, float]:
    """"+GM": one scalar weight per task vector, its share of the total importance."""
    s_in, s_out = shards.sum([sum(float(t.sum()) for t in m.values()) for m in (i_in, i_out)])
    total = s_in + s_out
    return (0.5, 0.5) if total == 0 else (s_in / total, s_out / total)


def adaptive_weights(i_in: Tensors, i_out: Tensors, temperature: float = 1.0, shards: Sharding = WHOLE):
    """"+Adaptive": per-element soft weights from importance (the release's unused version).

    Each map is min-max normalised over all its scalars; w_in = softmax over (I_in, I_out) / t,
    w_out = 1 - w_in.
    """
    def normalise(maps: Tensors) -> dict[str, torch.Tensor]:
        inf = float("inf")          # an empty shard holds no extreme
        low = min((float(t.min()) for t in maps.values() if t.numel()), default=inf)
        high = max((float(t.max()) for t in maps.values() if t.numel()), default=-inf)
        neg_lo, hi = shards.max([-low, high])
        lo = -neg_lo
        scale = hi - lo if hi > lo else 1.0
        return {n: (t - lo) / scale for n, t in maps.items()}

    a, b = normalise(i_in), normalise(i_out)
    w_in = {n: torch.sigmoid((a[n] - b[n]) / temperature) for n in a}   # = e^a / (e^a + e^b)
    return w_in, {n: 1 - w for n, w in w_in.items()}


def release_weights(m_in: Tensors, m_out: Tensors, both=(0.4, 0.6), neither=(0.5, 0.5)):
    """The release's blend by mask pair: (1,1)->(0.4,0.6), (1,0)->(1,0), (0,1)->(0,1), (0,0)->(0.5,0.5)."""
    w_in, w_out = {}, {}
    for n in m_in:
        a, b = m_in[n], m_out[n]
        w_in[n] = torch.where(a & b, both[0], torch.where(a, 1.0, torch.where(b, 0.0, neither[0])))
        w_out[n] = torch.where(a & b, both[1], torch.where(a, 0.0, torch.where(b, 1.0, neither[1])))
    return w_in, w_out


def region_fractions(m_in: Tensors, m_out: Tensors, shards: Sharding = WHOLE) -> dict[str, float]:
    """Fraction of scalars taken from tau_in only, tau_out only, both (shared) and neither."""
    total, both, n_in, n_out = shards.sum([sum(m.numel() for m in m_in.values()),
                                           sum(int((m_in[n] & m_out[n]).sum()) for n in m_in),
                                           sum(int(m.sum()) for m in m_in.values()),
                                           sum(int(m.sum()) for m in m_out.values())])
    only_in, only_out = n_in - both, n_out - both
    return {"in_only": only_in / total, "out_only": only_out / total, "shared": both / total,
            "neither": (total - both - only_in - only_out) / total}
