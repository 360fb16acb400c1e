"""Knowledge fusion (Eq. 2, 5, 9) and the paper's alternative fusions (Table 2).

All functions take and return ``{name: tensor}`` dicts. The fusion acts on every trainable scalar,
i.e. on the LoRA factors A and B themselves (not on their product B @ A), as Eq. 9 is written.

Why there is no switch for importance and masks in the space of the product P = s * B @ A (one
score per element of P, Eq. 9 applied to P's update), with the fused update written back into A, B:

- The fused update U = m_in * (P_Q - P_b) + m_out * (P_M - P_Q) is not a rank-r matrix. Each task
  vector has rank <= 2r, but an element-wise mask makes it full rank in general (383 of 384 in
  ``benchmarks/ba_space_probe.py``). Only with all-ones masks (-KI) is P_b + U = P_M representable.
  Fusing the factors, as Eq. 9 does, keeps the rank at r by construction.
- So the write-back into A and B is a projection onto rank-r matrices. The best one in Frobenius
  norm (truncated SVD of P_b + U, Eckart-Young) loses most of what the masks chose. In the probe
  (d = 384, r = 8, top 20 %, random factors and gradients) the written update W has
  ||W - U|| / ||U|| = 0.79 and cos(W, U) = 0.61. It is closer to the unmasked update P_M - P_b
  (cos 0.83) than to U: the projection largely undoes the masks. A switch would not test what it names.
  Any other write-back is also a projection onto the same set, of dimension r (2d - r), about 4 % of
  d^2 here: tangent-space least squares, or alternating least squares from the current factors.
  None does better in Frobenius norm than the SVD.
- The factorisation of the projected P is fixed only up to an invertible r x r matrix R
  (B R, R^-1 A). A refactorisation moves A and B in a new basis, and the inner optimizer's
  per-coordinate Adam moments, which carry across rounds within a task, no longer match them.
- The importance needs dL/dP, a d_out x d_in gradient per adapted matrix. The factors' gradients
  (s B^T G and s G A^T) do not determine it. Getting it needs hooks on every adapted layer (inputs
  times output gradients), plus three full-size score maps (Ibar, I_in, I_out). For LLaMA-2-7B's
  q and v projections that is 1.07e9 scalars per map, against 4.2e6 LoRA scalars.
- The one exact route writes the residual P_b + U - B'A' into the frozen base weights. The fused
  update then no longer lives in A and B: the adapter alone (checkpoints, resume, the saved
  adapter) would not carry the model.

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
