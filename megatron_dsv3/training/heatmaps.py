"""Expert-load and expert-bias heatmaps (W&B images and PNG), without matplotlib."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np


# A 5-stop perceptual palette (viridis anchors), nearest-neighbour cells.
_PALETTE = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)


def heatmap_rgb(values: np.ndarray, lo: float, hi: float, cell: Optional[int] = None) -> np.ndarray:
    """[rows, cols] -> uint8 RGB image [rows*cell, cols*cell, 3]; values clipped to [lo, hi].
    Default cell size: about 512 px wide, 2..32 px per cell."""
    if cell is None:
        cell = max(2, min(32, 512 // max(values.shape[1], 1)))
    t = np.clip((values - lo) / (hi - lo), 0.0, 1.0) * (len(_PALETTE) - 1)
    i = np.minimum(t.astype(int), len(_PALETTE) - 2)
    f = (t - i)[..., None]
    rgb = _PALETTE[i] * (1 - f) + _PALETTE[i + 1] * f
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1).astype(np.uint8)


def labelled(rgb: np.ndarray, row_labels: list[str], title: str) -> np.ndarray:
    """The heatmap with a title line and one label per row (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    rows = len(row_labels)
    cell_h = rgb.shape[0] // max(rows, 1)
    margin_left, margin_top = 40, 16
    canvas = Image.new("RGB", (rgb.shape[1] + margin_left, rgb.shape[0] + margin_top), "white")
    canvas.paste(Image.fromarray(rgb), (margin_left, margin_top))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), title, fill="black")
    if cell_h >= 10:
        for i, label in enumerate(row_labels):
            draw.text((2, margin_top + i * cell_h + (cell_h - 10) // 2), label, fill="black")
    return np.asarray(canvas)


def _row_labels(stats: dict, num_layers: int) -> list[str]:
    return [f"L{k}" if k <= num_layers else f"MTP{k - num_layers}" for k in sorted(stats)]


def load_heatmap(stats: dict, num_layers: int) -> np.ndarray:
    """log2(load / mean load) per layer (rows; MTP layers last), experts as columns."""
    rows = []
    for layer in sorted(stats):
        load = stats[layer]["load"].astype(float)
        rows.append(np.log2(np.maximum(load, 1e-9) / max(load.mean(), 1e-9)))
    return labelled(heatmap_rgb(np.array(rows), -2.0, 2.0), _row_labels(stats, num_layers),
                    "expert load / mean, log2 (purple -2 .. yellow +2)")


def bias_heatmap(stats: dict, num_layers: int) -> Optional[np.ndarray]:
    keys = [k for k in sorted(stats) if stats[k]["bias"] is not None]
    if not keys:
        return None
    b = np.array([stats[k]["bias"] for k in keys])
    span = max(float(np.abs(b).max()), 1e-6)
    return labelled(heatmap_rgb(b, -span, span), _row_labels({k: None for k in keys}, num_layers),
                    f"expert bias (purple {-span:.3g} .. yellow {span:.3g})")


def save_png(rgb: np.ndarray, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path)
