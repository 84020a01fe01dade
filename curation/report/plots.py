"""The report's figures: matplotlib (Agg, no pyplot, so no global state and no display) to PNG bytes.

Each function takes plain numbers already computed by curation/report/page.py and returns one PNG. Sizes are
in inches at DPI dots per inch; the report shows the PNGs at their natural width (at most the page width).
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


DPI = 110  # 110 dpi × 6.4 in ≈ 700 px: sharp on a laptop screen, ~40-80 kB per PNG
FONT_SIZE = 9
RELIABILITY_CMAP = "RdYlGn"  # red = low reliability, green = high: the reading the table's order suggests


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    fig.set_layout_engine("constrained")
    return fig


def annotator_scatter(mean_confidence: np.ndarray, minority_rate: np.ndarray, n_labels: np.ndarray,
                      reliability: np.ndarray, user_ids: Sequence[str], minority_threshold: float,
                      n_named: int = 5) -> bytes:
    """One point per annotator: mean confidence c toward their own label (x) against the share of their pairs
    with minority score u = (1 − c)·v above the threshold (y); area ∝ n_labels, colour = reliability.
    Stability v enters through u: with cheap scorers it sits at its cap on most pairs, so on its own axis
    it would be a vertical line. Upper left = labels the scorers consistently reject."""
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    sizes = 12 + 140 * n_labels / max(float(n_labels.max()), 1.0)
    points = ax.scatter(mean_confidence, minority_rate, s=sizes, c=reliability, cmap=RELIABILITY_CMAP,
                        vmin=0.0, vmax=1.0, edgecolors="black", linewidths=0.4, alpha=0.85)
    # Name the least reliable, as in the table below; offsets cycle round the point so close neighbours'
    # names do not print on top of each other (points, right/left and up/down of the marker).
    offsets = [(6, 5), (6, -11), (-8, 5), (-8, -11)]
    for rank, i in enumerate(np.argsort(reliability)[:n_named]):
        dx, dy = offsets[rank % len(offsets)]
        ax.annotate(str(user_ids[i]), (mean_confidence[i], minority_rate[i]), fontsize=FONT_SIZE - 1,
                    xytext=(dx, dy), textcoords="offset points", ha="left" if dx > 0 else "right")
    pad = 0.05
    ax.set_xlim(max(0.0, float(mean_confidence.min()) - pad), min(1.0, float(mean_confidence.max()) + pad))
    ax.set_ylim(-0.02, max(0.1, float(minority_rate.max()) * 1.15))
    ax.set_xlabel("mean confidence c of the scorers toward the annotator's labels", fontsize=FONT_SIZE)
    ax.set_ylabel(f"minority rate: share of labels with u > {minority_threshold:g}", fontsize=FONT_SIZE)
    ax.grid(alpha=0.3)
    bar = fig.colorbar(points, ax=ax)
    bar.set_label("reliability (higher = more trustworthy)", fontsize=FONT_SIZE)
    ax.set_title(f"{len(user_ids)} annotators; point area ∝ number of labels (max {int(n_labels.max())})",
                 fontsize=FONT_SIZE + 1)
    return _png(fig)


def minority_histogram(bin_edges: np.ndarray, counts: np.ndarray, threshold: float, n_above: int) -> bytes:
    """Counts of pairs per minority-score bin, with the curation run's minority threshold marked and the
    number of pairs above it (bins starting at or past the threshold are drawn red)."""
    fig = _figure(6.4, 3.4)
    ax = fig.add_subplot()
    widths = np.diff(bin_edges)
    above = bin_edges[:-1] >= threshold
    ax.bar(bin_edges[:-1], counts, width=widths, align="edge", color=np.where(above, "#c0392b", "#2e86c1"),
           edgecolor="white", linewidth=0.5)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax.text(threshold, ax.get_ylim()[1] * 0.95, f"  u > {threshold:g}: {n_above} of {int(counts.sum())} pairs",
            va="top", fontsize=FONT_SIZE)
    ax.set_xlim(bin_edges[0], bin_edges[-1])
    ax.set_xlabel("minority score u = (1 − c)·v of a pair (Adaptive-DPO)", fontsize=FONT_SIZE)
    ax.set_ylabel("pairs", fontsize=FONT_SIZE)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def agreement_heatmap(labels: Sequence[str], matrix: np.ndarray, counts: np.ndarray) -> bytes:
    """Pairwise share of pairs on which two voters (scorers, and the human label) vote the same; NaN = no
    pair in common. Each cell prints the share; the diagonal is 1 by definition."""
    size = 1.1 + 0.75 * len(labels)
    fig = _figure(size + 1.4, size)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=1.0)
    for i in range(len(labels)):
        for j in range(len(labels)):
            text = "–" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}"
            light = np.isnan(matrix[i, j]) or matrix[i, j] < 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=FONT_SIZE,
                    color="white" if light else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=FONT_SIZE)
    ax.set_yticks(range(len(labels)), labels, fontsize=FONT_SIZE)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("share of common pairs with the same vote", fontsize=FONT_SIZE)
    off_diagonal = counts[~np.eye(len(labels), dtype=bool)]
    ax.set_title(f"share of the pairs both voted on (up to {int(off_diagonal.max(initial=0))} per cell)",
                 fontsize=FONT_SIZE + 1)
    return _png(fig)


def source_agreement_bars(sources: Sequence[str], agreement: np.ndarray, n_pairs: np.ndarray) -> bytes:
    """Share of decisive pairs per source on which the human label equals the scorers' consensus."""
    fig = _figure(6.4, 1.4 + 0.45 * len(sources))
    ax = fig.add_subplot()
    positions = np.arange(len(sources))
    ax.barh(positions, agreement, color="#2e86c1", height=0.6)
    for y, (share, n) in enumerate(zip(agreement, n_pairs, strict=True)):
        inside = share > 0.35  # the label fits inside the bar, right-aligned, in white
        ax.text(share - 0.01 if inside else share + 0.01, y, f"{share:.1%} of {int(n)} pairs", va="center",
                ha="right" if inside else "left", fontsize=FONT_SIZE, color="white" if inside else "black")
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(positions, sources, fontsize=FONT_SIZE)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("human label agrees with the scorers' consensus (share of decisive pairs; 0.5 = chance)",
                  fontsize=FONT_SIZE)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def training_curves(step: np.ndarray, loss: np.ndarray, implicit_acc: np.ndarray, run_name: str) -> bytes:
    """Loss and implicit accuracy per optimizer step, raw and as a moving average over ~5 % of the steps."""
    fig = _figure(9.0, 3.2)
    window = max(1, len(step) // 20)
    for position, (values, label) in enumerate(((loss, "loss"), (implicit_acc, "implicit accuracy"))):
        ax = fig.add_subplot(1, 2, position + 1)
        ax.plot(step, values, color="#aab7c4", linewidth=0.8, label="per step")
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(step[window - 1:], smooth, color="#1f4e79", linewidth=1.6, label=f"mean of {window} steps")
        if label == "implicit accuracy":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("optimizer step", fontsize=FONT_SIZE)
        ax.set_ylabel(label, fontsize=FONT_SIZE)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=FONT_SIZE - 1, frameon=False)
    fig.suptitle(f"{run_name}: {len(step)} optimizer steps", fontsize=FONT_SIZE + 1)
    return _png(fig)
