"""Why Recurrent-KIF does not fuse in the space of the LoRA product BA (the argument in rkif/kif/fusion.py).

One adapted d x d matrix with rank-r factors: the anchor B0 A0, an inner round (B1 A1) and an outer
round (B2 A2), each factor moved by a random step. Eq. 8-9 applied to the product: importance
|P * G| per element of P = BA (G a random batch gradient of d_tokens rank-1 terms), the top
``fraction`` masks, the fused update U = m_in * (P1 - P0) + m_out * (P2 - P1). The adapter can only
hold rank r: the best rank-r write-back (truncated SVD of P0 + U, Eckart-Young) gives the update W.
Printed: the rank of U, ||W|| / ||U||, cos(W, U), ||W - U|| / ||U|| and cos(W, P2 - P0), the
unmasked update, means over ``--trials`` draws. Synthetic factors: an illustration of the geometry,
not a measurement on a trained adapter.

    python benchmarks/ba_space_probe.py --out benchmarks/results/ba_space_probe.json
"""

import argparse
import json
from pathlib import Path

import torch

from rkif import io
from rkif.kif.masks import binary_masks


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


def probe(dim: int, rank: int, fraction: float, tokens: int, generator: torch.Generator) -> dict[str, float]:
    """One draw: the fused product update and what a rank-r write-back keeps of it."""
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    b0, a0 = randn(dim, rank, scale=0.05), randn(rank, dim, scale=0.05)
    b1, a1 = b0 + randn(dim, rank, scale=0.01), a0 + randn(rank, dim, scale=0.01)
    b2, a2 = b1 + randn(dim, rank, scale=0.01), a1 + randn(rank, dim, scale=0.01)
    p0, p1, p2 = b0 @ a0, b1 @ a1, b2 @ a2                                 # d x d, rank <= r each
    g_in = randn(tokens, dim).T @ randn(tokens, dim)                       # sum of output-grad x input
    g_out = randn(tokens, dim).T @ randn(tokens, dim)
    m_in = binary_masks({"p": (p1 * g_in).abs()}, fraction)["p"]           # Eq. 3 and 8 on the product
    m_out = binary_masks({"p": (p2 * g_out).abs()}, fraction)["p"]
    fused = m_in * (p1 - p0) + m_out * (p2 - p1)                           # Eq. 9 on the product
    u, s, vh = torch.linalg.svd(p0 + fused)
    written = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] - p0          # best rank-r write-back
    return {"rank_fused": float(torch.linalg.matrix_rank(fused)),
            "norm_kept": float(written.norm() / fused.norm()), "cos_fused": _cos(written, fused),
            "relative_error": float((written - fused).norm() / fused.norm()), "cos_unmasked": _cos(written, p2 - p0)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=384, help="d (MiniLM's hidden size)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--tokens", type=int, default=1024, help="rank-1 terms in a batch gradient")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    g = torch.Generator().manual_seed(a.seed)
    draws = [probe(a.dim, a.rank, a.fraction, a.tokens, g) for _ in range(a.trials)]
    result = {"settings": vars(a) | {"out": str(a.out) if a.out else None},
              "mean": {k: round(sum(d[k] for d in draws) / len(draws), 3) for k in draws[0]}}
    print(json.dumps(result, indent=2))
    if a.out:
        io.write_json(a.out, result)


if __name__ == "__main__":
    main()
