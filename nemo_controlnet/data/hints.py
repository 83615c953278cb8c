"""Hint detectors: picklable callables (image RGB, conditioning or None, rng) -> (hint RGB, params).

A detector is chosen by ``_target_`` in config: ``conf/hint/*.yaml`` names the shipped ones
(``hint=canny``), and a user adds one by writing a class with this call signature and pointing
``hint._target_`` at it.
The returned params (e.g. the thresholds drawn for this sample) go into the sample's json.
"""

from __future__ import annotations

import random

import cv2
import numpy as np
from PIL import Image


class MissingConditioning(ValueError):
    """The detector needs the source's own conditioning image and the sample has none."""


class Canny:
    """cv2.Canny with optional Gaussian blur and, as ControlNet 1.0 trained, random thresholds.

    Takes a PIL image or an RGB uint8 array; returns a single-channel (L) edge map.
    """

    def __init__(
        self,
        low_threshold: int = 100,
        high_threshold: int = 200,
        blur: int = 0,
        random_thresholds: bool = False,
        low_range: tuple[int, int] = (50, 150),
        high_range: tuple[int, int] = (150, 250),
    ):
        if blur and blur % 2 == 0:
            raise ValueError(f"canny blur={blur}: the Gaussian kernel size must be odd (or 0 for none)")
        if not 0 <= low_threshold <= high_threshold:
            raise ValueError(f"canny thresholds {low_threshold}/{high_threshold}: need 0 <= low <= high")
        self.low, self.high, self.blur = low_threshold, high_threshold, blur
        self.random_thresholds = random_thresholds
        self.low_range, self.high_range = tuple(low_range), tuple(high_range)

    def __call__(
        self, image: Image.Image, conditioning: Image.Image | None = None, rng: random.Random | None = None
    ) -> tuple[Image.Image, dict]:
        low, high = self.low, self.high
        if self.random_thresholds:
            rng = rng or random.Random(0)
            low = rng.randint(*self.low_range)
            high = max(low, rng.randint(*self.high_range))
        arr = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        if self.blur:
            arr = cv2.GaussianBlur(arr, (self.blur, self.blur), 0)
        edges = cv2.Canny(arr, low, high)
        params = {"detector": "canny", "low_threshold": low, "high_threshold": high, "blur": self.blur}
        # One channel: a third of the bytes to store and decode; loaders replicate it to RGB.
        return Image.fromarray(edges), params


class Given:
    """The source's own conditioning image, as it is (RGB)."""

    def __call__(
        self, image: Image.Image, conditioning: Image.Image | None = None, rng: random.Random | None = None
    ) -> tuple[Image.Image, dict]:
        if conditioning is None:
            raise MissingConditioning("the hint detector 'given' needs a conditioning image")
        return conditioning.convert("RGB"), {"detector": "given"}
