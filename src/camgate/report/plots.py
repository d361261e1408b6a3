"""Plots as PNG bytes (matplotlib, no display): the ybROAD curve beside the per-layer invalid activation,
and the report's figures (ratio against invalid area, champion against challenger)."""
from __future__ import annotations

import io

import numpy as np

# A scatter of more points only darkens the PNG; a seeded sample keeps the report small and stable.
_MAX_POINTS = 5000


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})  # no version: same bytes on rerun
    _plt().close(fig)
    return buf.getvalue()


def _dot(n: int) -> float:
    return 16.0 if n < 500 else 4.0  # few points stay visible, many do not merge into a blot


def _sample(n: int) -> np.ndarray:
    return np.arange(n) if n <= _MAX_POINTS else np.sort(np.random.default_rng(0).choice(n, _MAX_POINTS, False))


def _unit_square(ax, xlabel: str, ylabel: str, shown: int, total: int) -> None:
    """Axes of a ratio-against-ratio scatter: both in [0, 1], a title when only a sample is drawn."""
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=xlabel, ylabel=ylabel)
    if shown < total:
        ax.set_title(f"{shown} of {total} images (seeded sample)", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")


def _per_layer(table, column: str) -> tuple[list[str], np.ndarray]:
    """Mean of ``column`` over ok rows per layer, in layer order."""
    df = table.select(["layer", "layer_index", "status", column]).to_pandas()
    df = df[df["status"] == "ok"].groupby(["layer_index", "layer"], sort=True)[column].mean()
    return [name for _, name in df.index], df.to_numpy(dtype=float)


def ybroad_png(road_table, path: str | None = None, layers_table=None) -> bytes:
    """Per-layer mean ROAD of Grad-CAM (and of the random map) and, from a layers file, the per-layer
    mean invalid activation ratio: where in the network the maps become faithful, and where the
    attention moves onto invalid pixels. Written to ``path`` when given; returns the PNG bytes."""
    plt = _plt()
    names, road = _per_layer(road_table, "road")
    _, rnd = _per_layer(road_table, "road_random")
    panels = 2 if layers_table is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6, 0.12 * len(names)), 3.2 * panels), squeeze=False,
                             sharex=panels == 1)
    ax = axes[0, 0]
    ax.plot(range(len(names)), road, marker=".", label="ROAD of the maps")
    ax.plot(range(len(names)), rnd, color="grey", linestyle="--", label="random map")
    if len(road) and np.isfinite(road).any():
        best = int(np.nanargmax(road))
        ax.annotate(f"best: {names[best]}", (best, road[best]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_ylabel("ROAD (higher = more faithful)")
    ax.legend(fontsize=8)
    if layers_table is not None:
        lnames, inv = _per_layer(layers_table, "invalid_activation_ratio")
        ax2 = axes[1, 0]
        ax2.plot(range(len(lnames)), inv, color="tab:red", marker=".")
        ax2.set_ylabel("mean invalid activation")
        ax2.set_ylim(0, 1)
        ax2.set_xticks(range(len(lnames)), lnames, rotation=90, fontsize=6)
    ax.set_xticks(range(len(names)), names if panels == 1 else [""] * len(names), rotation=90, fontsize=6)
    fig.tight_layout()
    png = _png(fig)
    if path:
        from ..io import storage

        storage.write_bytes(path, png)
    return png


def ratio_area_png(ratio: np.ndarray, area: np.ndarray, share_ratio: float | None = None) -> bytes:
    """Per ok image: the histogram of invalid activation ratios over that of the invalid area share,
    and ratio against area with the y = x line. A map that ignores the mask lands on the line (heat
    spread like the pixels); above it, the model looks at invalid pixels more than their area."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    bins = np.linspace(0, 1, 41)
    left.hist(area, bins=bins, color="tab:grey", alpha=0.45, label="invalid area share")
    left.hist(ratio, bins=bins, histtype="step", linewidth=1.6, color="tab:red", label="invalid activation ratio")
    if share_ratio is not None:
        left.axvline(share_ratio, color="black", linestyle=":", linewidth=1, label=f"policy ratio {share_ratio:g}")
    left.set_xlim(0, 1)
    left.set_xlabel("share of the image")
    left.set_ylabel("images")
    left.yaxis.get_major_locator().set_params(integer=True)
    left.legend(fontsize=7)
    pick = _sample(len(ratio))
    right.scatter(area[pick], ratio[pick], s=_dot(len(pick)), alpha=0.5, color="tab:red", linewidths=0)
    right.plot([0, 1], [0, 1], color="black", linewidth=0.8, label="y = x (heat spread like the pixels)")
    _unit_square(right, "invalid area share", "invalid activation ratio", len(pick), len(ratio))
    fig.tight_layout()
    return _png(fig, dpi=80)


def paired_png(baseline: np.ndarray, candidate: np.ndarray, worse_by: float) -> bytes:
    """Champion (x) against challenger (y) ratio per image ok in both runs; above the dashed line the
    image counts as worse for ``baseline_share_worse``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4))
    worse = candidate - baseline > worse_by
    pick = _sample(len(baseline))
    for sel, colour, label in ((~worse, "tab:blue", "not worse"), (worse, "tab:red", f"worse by > {worse_by:g}")):
        shown = pick[sel[pick]]
        ax.scatter(baseline[shown], candidate[shown], s=_dot(len(pick)), alpha=0.6, color=colour, linewidths=0,
                   label=f"{label} ({int(sel.sum())})")
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, label="y = x")
    ax.plot([0, 1 - worse_by], [worse_by, 1], color="tab:red", linewidth=0.8, linestyle="--")
    _unit_square(ax, "champion (baseline) ratio", "challenger ratio", len(pick), len(baseline))
    fig.tight_layout()
    return _png(fig, dpi=80)
