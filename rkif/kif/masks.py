"""Exact thresholds and binary masks over importance maps of any size (Eq. 8).

``torch.quantile`` refuses more than 2^24 elements and a ``torch.cat`` of all scores fails when a
model is split over devices. Here an order statistic is found by bisection over the float32 bit
patterns (an order-preserving integer key): 32 counting passes over the tensors where they are,
exact on ties, no concatenation, constant extra memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _key_to_float(key: int) -> float:
    """Inverse of the order-preserving map float32 bits -> int32 (negative floats have bits flipped)."""
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _count_at_least(tensors: list[torch.Tensor], value: float) -> int:
    return sum(int((t >= value).sum()) for t in tensors)


def kth_largest(tensors: Iterable[torch.Tensor], k: int) -> float:
    """The k-th largest value (1-based) among all elements of ``tensors``, exactly.

    Finds the largest float32 v with #{x >= v} >= k; ties count once each, as in a sorted list.
    """
    tensors = [t.detach().float() for t in tensors]
    n = sum(t.numel() for t in tensors)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} values")
    if any(bool(torch.isnan(t).any()) for t in tensors):
        raise ValueError("importance scores contain NaN")
    lo, hi = _INT32_MIN, _INT32_MAX     # invariant: count(x >= key lo) >= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count_at_least(tensors, _key_to_float(mid)) >= k:
            lo = mid
        else:
            hi = mid - 1
    return _key_to_float(lo)


def top_fraction_threshold(tensors: Iterable[torch.Tensor], fraction: float) -> float:
    """delta of Eq. 8: the value of the k-th largest score, k = round(fraction * N) (at least 1)."""
    tensors = list(tensors)
    n = sum(t.numel() for t in tensors)
    return kth_largest(tensors, max(1, min(n, round(fraction * n))))


def linear_quantile(tensors: Iterable[torch.Tensor], q: float) -> float:
    """``torch.quantile(all scores, q)`` (linear interpolation) without its size limit."""
    tensors = list(tensors)
    n = sum(t.numel() for t in tensors)
    pos = q * (n - 1)
    lo = math.floor(pos)
    low = kth_largest(tensors, n - lo)                  # ascending order statistic lo
    high = kth_largest(tensors, n - min(lo + 1, n - 1))
    return low + (pos - lo) * (high - low)


def binary_masks(scores: Mapping[str, torch.Tensor], fraction: float, rule: str = "top",
                 scope: str = "global") -> dict[str, torch.Tensor]:
    """m = 1 where I >= delta (Eq. 8), delta chosen over all scalars (global) or per tensor.

    ``rule="top"``: delta is the exact top-``fraction`` value, mask by >= (the paper).
    ``rule="quantile"``: delta = linear quantile at 1 - fraction, mask by strict > (the release).
    """
    if scope == "global":
        groups = [list(scores)]
    elif scope == "per_tensor":
        groups = [[n] for n in scores]
    else:
        raise ValueError(f"unknown threshold scope {scope!r}: global or per_tensor")
    masks = {}
    for names in groups:
        group = [scores[n] for n in names]
        if rule == "top":
            delta = top_fraction_threshold(group, fraction)
            masks.update({n: scores[n] >= delta for n in names})
        elif rule == "quantile":
            delta = linear_quantile(group, 1 - fraction)
            masks.update({n: scores[n] > delta for n in names})
        else:
            raise ValueError(f"unknown threshold rule {rule!r}: top or quantile")
    return masks


def random_masks_like(masks: Mapping[str, torch.Tensor], generator: torch.Generator,
                      scope: str = "global") -> dict[str, torch.Tensor]:
    """Random binary masks with as many ones as ``masks`` in each threshold group, at uniform places.

    The control for Eq. 8: the same density, no identification. ``scope="global"`` keeps the total
    count and spreads it over all scalars; ``"per_tensor"`` keeps each tensor's count. Drawn on the
    CPU from ``generator`` (so a seed fixes the draw), returned on each mask's device.
    """
    if scope == "global":
        groups = [list(masks)]
    elif scope == "per_tensor":
        groups = [[n] for n in masks]
    else:
        raise ValueError(f"unknown threshold scope {scope!r}: global or per_tensor")
    out = {}
    for names in groups:
        sizes = [masks[n].numel() for n in names]
        ones = sum(int(masks[n].sum()) for n in names)
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=generator)[:ones]] = True
        for n, part in zip(names, flat.split(sizes)):
            out[n] = part.view(masks[n].shape).to(masks[n].device)
    return out
