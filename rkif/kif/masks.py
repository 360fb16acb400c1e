"""Exact thresholds and binary masks over importance maps of any size (Eq. 8).

``torch.quantile`` refuses more than 2^24 elements and a ``torch.cat`` of all scores fails when a
model is split over devices or sharded over processes. Here an order statistic is found by a radix
select over the float32 bit patterns, mapped to an order-preserving integer key:

- 4 passes, one per 8-bit digit of the key, most significant first. Each pass counts, with
  ``torch.bincount``, the next digit of the elements whose higher digits match those chosen so far,
  then picks the bin holding the wanted rank. After pass 4 all 32 bits are fixed: the exact value.
- Counts are int64 (exact at any size). Ties need nothing special: a rank inside a run of equal
  values lands in that value's bin.
- Sharded scores: pass ``reduce``, a function that sums an int64 tensor over the shards
  (``all_reduce_sum(group)`` for a torch.distributed process group). It is called once per pass on
  the (targets x 256) histogram: a threshold costs 4 collectives, whatever the size. The total
  count and a NaN count ride along with the first pass.
- Memory: no concatenation and no copy of the scores. Tensors are read where they are, in chunks
  (2^18 elements on CPU, 2^22 elsewhere); the extra memory is a few chunk-sized temporaries (about
  6 MB on CPU, 100 MB on a GPU) plus the histograms. Only a non-contiguous or non-float32 tensor is
  copied, one chunk at a time for the dtype, once per pass for the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]
_BITS, _DIGIT = 32, 8
_PASSES = _BITS // _DIGIT
_CPU_CHUNK, _DEVICE_CHUNK = 1 << 18, 1 << 22      # CPU: a chunk's temporaries stay in cache


def _key_to_float(key: int) -> float:
    """Inverse of the order-preserving map float32 bits -> int32 (negative floats have bits flipped)."""
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _keys(values: torch.Tensor) -> torch.Tensor:
    """Signed int32 keys in the order of float32 ``values``: -inf < ... < -0.0 < +0.0 < ... < inf."""
    bits = values.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _chunks(tensors: Sequence[torch.Tensor]) -> Iterable[torch.Tensor]:
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = _CPU_CHUNK if flat.device.type == "cpu" else _DEVICE_CHUNK
        yield from flat.split(step)


def _nan_count(values: torch.Tensor) -> torch.Tensor:
    """The number of NaNs, counted only where the sum (3x cheaper than ``isnan``) is NaN."""
    return torch.isnan(values).sum() if values.sum().isnan() else values.new_zeros((), dtype=torch.int64)


def _histogram(tensors: Sequence[torch.Tensor], prefix: int | None, shift: int) -> torch.Tensor:
    """Counts (int64, 256 bins) of digit ``(key >> shift) & 255`` over the keys whose bits above
    ``shift + 8`` equal ``prefix``; ``prefix=None``: the first pass, all keys, and a NaN count after the bins."""
    size = 1 << _DIGIT
    per_device: dict[torch.device, torch.Tensor] = {}
    for chunk in _chunks(tensors):
        values = chunk.float()
        key = _keys(values)
        if prefix is None:
            digit = (key >> shift) + size // 2                                # the top digit, signed: -128..127
            counts = torch.cat([torch.bincount(digit, minlength=size), _nan_count(values).view(1)])
        else:
            digit = (key >> shift) ^ (prefix << _DIGIT)         # in the bucket: 0..255; outside: < 0 or > 255
            digit = digit.clamp_(-1, size).add_(1)
            counts = torch.bincount(digit, minlength=size + 2)[1:-1]
        acc = per_device.get(chunk.device)
        per_device[chunk.device] = counts if acc is None else acc.add_(counts)
    out = torch.zeros(size + (prefix is None), dtype=torch.int64)
    for counts in per_device.values():
        out += counts.cpu()
    return out


def order_statistics(tensors: Iterable[torch.Tensor], positions: Callable[[int], Sequence[int]],
                     reduce: Reduce | None = None) -> list[float]:
    """Exact values at 0-based ascending ``positions(n)`` among all N elements of ``tensors``.

    ``positions`` gets N (counted in the first pass, over all shards when ``reduce`` is given), so
    a rank that depends on N costs no extra pass or collective. 4 passes, each one call of ``reduce``
    and one scan of the data per distinct bucket (one scan when there is one position).
    """
    tensors = list(tensors)
    reduce = reduce or (lambda h: h)
    prefixes: list[int | None] = []
    remaining: list[int] = []
    for p in range(_PASSES):
        shift = _BITS - _DIGIT * (p + 1)
        if p == 0:
            first = reduce(_histogram(tensors, None, shift))
            hists, nans = first[None, :-1], int(first[-1])
            n = int(hists.sum())
            if nans:
                raise ValueError(f"importance scores contain NaN ({nans} of {n} values)")
            remaining = [int(r) for r in positions(n)]
            if not all(0 <= r < n for r in remaining):
                raise ValueError(f"positions {remaining} out of range for {n} values")
            hists = hists.expand(len(remaining), -1)
            prefixes = [None] * len(remaining)
        else:
            local = {q: _histogram(tensors, q, shift) for q in dict.fromkeys(prefixes)}    # one per distinct bucket
            hists = reduce(torch.stack([local[q] for q in prefixes]))
        for i, hist in enumerate(hists):
            cum = hist.cumsum(0)
            digit = int(torch.searchsorted(cum, remaining[i], right=True))      # first bin with cum > rank
            remaining[i] -= int(cum[digit] - hist[digit])
            base = -(1 << (_DIGIT - 1)) if prefixes[i] is None else prefixes[i] << _DIGIT
            prefixes[i] = base + digit
    return [_key_to_float(q) + 0.0 for q in prefixes]                        # + 0.0: -0.0 reads as 0.0


def kth_largest(tensors: Iterable[torch.Tensor], k: int, *, reduce: Reduce | None = None) -> float:
    """The k-th largest value (1-based) among all elements of ``tensors``, exactly.

    Ties count once each, as in a sorted list: the largest v with #{x >= v} >= k.
    """
    def position(n: int) -> list[int]:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} out of range for {n} values")
        return [n - k]

    return order_statistics(tensors, position, reduce)[0]


def _top_count(n: int, fraction: float) -> int:
    return max(1, min(n, round(fraction * n)))


def top_fraction_threshold(tensors: Iterable[torch.Tensor], fraction: float, *,
                           reduce: Reduce | None = None) -> float:
    """delta of Eq. 8: the value of the k-th largest score, k = round(fraction * N) (at least 1)."""
    return order_statistics(tensors, lambda n: [n - _top_count(n, fraction)], reduce)[0]


def linear_quantile(tensors: Iterable[torch.Tensor], q: float, *, reduce: Reduce | None = None) -> float:
    """``torch.quantile(all scores, q)`` (linear interpolation) without its size limit."""
    pos = 0.0

    def around(n: int) -> list[int]:
        nonlocal pos
        pos = q * (n - 1)
        return [math.floor(pos), min(math.floor(pos) + 1, n - 1)]

    low, high = order_statistics(tensors, around, reduce)               # both in the same 4 passes
    return low + (pos - math.floor(pos)) * (high - low)


def all_reduce_sum(group=None) -> Reduce:
    """A ``reduce`` for sharded scores: sum over the processes of ``group`` (torch.distributed).

    The histogram travels on the CPU for gloo and on the current CUDA device for nccl.
    """
    import torch.distributed as dist

    def reduce(hist: torch.Tensor) -> torch.Tensor:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        out = hist.to(device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out.cpu()

    return reduce


def binary_masks(scores: Mapping[str, torch.Tensor], fraction: float, rule: str = "top",
                 scope: str = "global", *, reduce: Reduce | None = None) -> dict[str, torch.Tensor]:
    """m = 1 where I >= delta (Eq. 8), delta chosen over all scalars (global) or per tensor.

    ``rule="top"``: delta is the exact top-``fraction`` value, mask by >= (the paper).
    ``rule="quantile"``: delta = linear quantile at 1 - fraction, mask by strict > (the release).
    ``reduce``: the scores are this process's shards; delta is taken over all shards (see the module).
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
            delta = top_fraction_threshold(group, fraction, reduce=reduce)
            masks.update({n: scores[n] >= delta for n in names})
        elif rule == "quantile":
            delta = linear_quantile(group, 1 - fraction, reduce=reduce)
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
