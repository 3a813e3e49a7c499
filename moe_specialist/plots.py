"""PNG figures of a sweep: quality against pruning ratio, and expert usage with the kept experts marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from moe_specialist.io import atomic_path  # noqa: E402
from moe_specialist.plan import PrunePlan  # noqa: E402


def _save(fig, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_quality_curve(rows: list[dict], path: Path, metric: str = "chrf++", title: str = "") -> None:
    """One line per criterion (prune-only solid, after recovery dashed), ``metric`` against the share removed.

    The x axis is each row's ``actual_ratio``, what was removed (the target to within half an expert).
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for sft in (False, True):
        by_criterion: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            if row["sft"] == sft:
                by_criterion.setdefault(row["criterion"], []).append((row["actual_ratio"], row[metric]))
        for criterion, points in sorted(by_criterion.items()):
            points.sort()
            style = "--o" if sft else "-o"
            line = ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                style,
                color=colors.get(criterion),
                label=f"{criterion}{' + recovery' if sft else ''}",
                markersize=4 if not sft else 6,
            )[0]
            colors.setdefault(criterion, line.get_color())
    baseline = [r[metric] for r in rows if r["target_ratio"] == 0 and not r["sft"]]
    if baseline:
        ax.axhline(baseline[0], color="grey", linewidth=0.8, linestyle=":", label="unpruned")
    ax.set_xlabel("actual_ratio: share of routed experts removed")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} against actual_ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    _save(fig, path)


def plot_expert_usage(
    shares: torch.Tensor, layers: list[int], plan: PrunePlan | None, path: Path, title: str = ""
) -> None:
    """Heat map of expert usage per layer (share of routing decisions); kept experts outlined."""
    fig, ax = plt.subplots(figsize=(max(6, shares.shape[1] * 0.28), 1.2 + 0.55 * len(layers)))
    image = ax.imshow(shares.numpy(), aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="share of routing decisions")
    if plan is not None:
        for row, layer in enumerate(layers):
            for expert in plan.kept_experts.get(layer, range(shares.shape[1])):
                ax.add_patch(
                    plt.Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.2)
                )
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_xlabel("expert")
    ax.set_title(title or "expert usage (white: kept)")
    _save(fig, path)
