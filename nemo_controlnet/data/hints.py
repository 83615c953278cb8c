"""Hint detectors: pure functions image (RGB PIL) -> hint (RGB PIL), found by name."""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
from PIL import Image


def canny(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=2))


HINTS: dict[str, Callable[..., Image.Image]] = {"canny": canny}


def get_hint(name: str) -> Callable[..., Image.Image]:
    if name not in HINTS:
        raise ValueError(f"hint={name!r}: known detectors are {sorted(HINTS)}")
    return HINTS[name]
