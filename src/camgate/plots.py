"""Plots as PNG bytes (matplotlib, no display): the ybROAD curve beside the per-layer invalid activation."""
from __future__ import annotations

import io

import numpy as np


def _per_layer(table, column: str) -> tuple[list[str], np.ndarray]:
    """Mean of ``column`` over ok rows per layer, in layer order."""
    df = table.select(["layer", "layer_index", "status", column]).to_pandas()
    df = df[df["status"] == "ok"].groupby(["layer_index", "layer"], sort=True)[column].mean()
    return [name for _, name in df.index], df.to_numpy(dtype=float)


def ybroad_png(road_table, path: str | None = None, layers_table=None) -> bytes:
    """Per-layer mean ROAD of Grad-CAM (and of the random map) and, from a layers file, the per-layer
    mean invalid activation ratio: where in the network the maps become faithful, and where the
    attention moves onto invalid pixels. Written to ``path`` when given; returns the PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    if path:
        from . import storage

        storage.write_bytes(path, buf.getvalue())
    return buf.getvalue()
