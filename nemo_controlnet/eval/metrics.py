"""Does the ControlNet follow its hints? Scores of generated images against their hints.

- Edge F1, as ControlNet++ evaluates Canny control: Canny (cv2, thresholds 100/200) on the
  generated image, compared pixel by pixel with the hint's edge pixels; precision, recall, F1.
  ``edge_f1_tol1`` also counts an edge pixel within one pixel of the other map as matched (a
  one-pixel shift is not a failure to follow the hint at small resolutions).
- SSIM between the hint and the edges re-extracted from the generated image (torchmetrics);
  MS-SSIM too when the image is large enough for its five scales (at least 161 px).
- For the synthetic shapes data, the exact ground truth: IoU of the generated circle with the true
  disk (a pixel belongs to the circle when its colour is nearer the circle's colour than the
  background's), and the mean colour error inside and outside the disk (RGB, 0-1).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

CANNY_LOW, CANNY_HIGH = 100, 200
MS_SSIM_MIN_SIZE = 161  # five scales of an 11-px window: (11 - 1) * 2^4 + 1


def canny_edges(image: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """Edge map (bool HxW) of an RGB (or grey) uint8 image."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return cv2.Canny(grey, low, high) > 0


def hint_edges(hint: np.ndarray) -> np.ndarray:
    """Edge pixels of a hint (HxW or HxWxC uint8): a Canny hint is white lines on black."""
    grey = hint.max(axis=2) if hint.ndim == 3 else hint
    return grey >= 128


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def edge_f1(predicted: np.ndarray, target: np.ndarray, tolerance: int = 0) -> dict[str, float]:
    """Precision, recall and F1 of predicted edge pixels against target edge pixels. With
    ``tolerance`` t, a pixel within t pixels (Chebyshev) of the other map counts as matched."""
    predicted, target = predicted.astype(bool), target.astype(bool)
    n_pred, n_target = int(predicted.sum()), int(target.sum())
    if n_pred == 0 and n_target == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    precision = float((predicted & _dilate(target, tolerance)).sum() / n_pred) if n_pred else 0.0
    recall = float((target & _dilate(predicted, tolerance)).sum() / n_target) if n_target else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def edge_ssim(hint: np.ndarray, edges: np.ndarray) -> dict[str, float | None]:
    """SSIM (and MS-SSIM where the size allows) between a hint and re-extracted edges, both in [0, 1]."""
    grey = (hint.max(axis=2) if hint.ndim == 3 else hint).astype(np.float32) / 255.0
    a = torch.from_numpy(grey)[None, None]
    b = torch.from_numpy(edges.astype(np.float32))[None, None]
    out: dict[str, float | None] = {"ssim": float(structural_similarity_index_measure(b, a, data_range=1.0))}
    big = min(grey.shape) >= MS_SSIM_MIN_SIZE
    out["ms_ssim"] = float(multiscale_structural_similarity_index_measure(b, a, data_range=1.0)) if big else None
    return out


def disk_mask(params: dict, size: int) -> np.ndarray:
    """The true disk of a shapes sample (``prep/synthetic.py`` parameters) at ``size`` px."""
    scale = size / params["resolution"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # cv2 draws a radius-r disk over pixels whose centres lie within r + 1/2 of the centre pixel's
    cx, cy, r = (params["cx"] + 0.5) * scale, (params["cy"] + 0.5) * scale, (params["radius"] + 0.5) * scale
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def shape_metrics(image: np.ndarray, params: dict) -> dict[str, float]:
    """Ground-truth scores of a generated shapes image (square RGB uint8)."""
    disk = disk_mask(params, image.shape[0])
    pixels = image.astype(np.float32)
    circle, background = np.array(params["circle_rgb"], np.float32), np.array(params["background_rgb"], np.float32)
    nearer_circle = ((pixels - circle) ** 2).sum(-1) < ((pixels - background) ** 2).sum(-1)
    union = (nearer_circle | disk).sum()
    iou = float((nearer_circle & disk).sum() / union) if union else 1.0
    error = lambda mask, rgb: float(np.abs(pixels[mask] - rgb).mean() / 255.0) if mask.any() else 0.0  # noqa: E731
    return {"iou": iou, "circle_color_error": error(disk, circle), "background_color_error": error(~disk, background)}


def sample_metrics(image: np.ndarray, hint: np.ndarray, params: dict | None = None) -> dict[str, float | None]:
    """Every score of one generated image (HxWx3 uint8) against its hint (uint8) and, for shapes
    data, its ground-truth parameters."""
    edges, target = canny_edges(image), hint_edges(hint)
    exact, tolerant = edge_f1(edges, target), edge_f1(edges, target, tolerance=1)
    out: dict[str, float | None] = {
        "edge_precision": exact["precision"],
        "edge_recall": exact["recall"],
        "edge_f1": exact["f1"],
        "edge_f1_tol1": tolerant["f1"],
        **edge_ssim(hint, edges),
    }
    if params and {"cx", "cy", "radius", "circle_rgb", "background_rgb"} <= set(params):
        out.update(shape_metrics(image, params))
    return out


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """Per-metric means over samples (metrics a sample does not have are left out of its mean)."""
    keys = sorted({k for row in rows for k, v in row.items() if v is not None})
    return {k: float(np.mean([row[k] for row in rows if row.get(k) is not None])) for k in keys}
