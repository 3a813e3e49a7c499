"""Reading routing statistics: load balance (entropy, starved experts) and language specificity (Jensen-Shannon)."""

from __future__ import annotations

import math

import torch

from moe_specialist.stats import RoutingStats


def usage(stats: RoutingStats, groups: list[str] | None = None, roles: list[str] | None = None) -> torch.Tensor:
    """Share of routing decisions per expert, [layer, expert] (rows sum to 1 over each layer's experts)."""
    count = stats.select(groups, roles)["count"]
    return count / count.sum(dim=1, keepdim=True).clamp_min(1e-12)


def normalized_entropy(shares: torch.Tensor, num_experts: list[int]) -> list[float]:
    """Entropy of each layer's usage divided by log(E): 1 = perfectly balanced."""
    out = []
    for row, n in zip(shares, num_experts, strict=True):
        p = row[:n].clamp_min(1e-300)
        out.append(float(-(row[:n] * p.log()).sum() / math.log(n)))
    return out


def min_share(shares: torch.Tensor, num_experts: list[int]) -> list[float]:
    """Smallest expert share of each layer relative to the uniform share 1/E (0 = a dead expert)."""
    return [float(row[:n].min() * n) for row, n in zip(shares, num_experts, strict=True)]


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> list[float]:
    """Per-layer Jensen-Shannon divergence in bits between two usage matrices [layer, expert]."""
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return torch.where(mask, a * (a.clamp_min(1e-300) / b.clamp_min(1e-300)).log2(), torch.zeros_like(a)).sum(1)

    return [float(x) for x in (kl(p, m) + kl(q, m)) / 2]


def concentration(shares: torch.Tensor, num_experts: list[int], top: int) -> list[float]:
    """Share of each layer's routing held by its ``top`` busiest experts."""
    return [
        float(row[:n].sort(descending=True).values[:top].sum()) for row, n in zip(shares, num_experts, strict=True)
    ]
