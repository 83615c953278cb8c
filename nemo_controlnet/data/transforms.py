"""Paired transforms and the tensor contract (DESIGN.md): image in [-1, 1], hint in [0, 1] RGB.

Geometric parameters are computed once per sample and applied to image and hint alike, so the
two can never drift apart. Training, validation and generation all go through these functions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ResizeCrop:
    """Resize so the smaller side is ``size``, crop a ``size`` x ``size`` box, optionally mirror.

    The parameters are drawn once per sample and applied to image and hint alike.
    """

    resized: tuple[int, int]  # (width, height) after resize
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    flip: bool = False

    @staticmethod
    def _resized(width: int, height: int, size: int) -> tuple[int, int]:
        scale = size / min(width, height)
        return max(size, round(width * scale)), max(size, round(height * scale))

    @classmethod
    def center(cls, width: int, height: int, size: int) -> "ResizeCrop":
        w, h = cls._resized(width, height, size)
        left, top = (w - size) // 2, (h - size) // 2
        return cls((w, h), (left, top, left + size, top + size))

    @classmethod
    def draw(
        cls,
        width: int,
        height: int,
        size: int,
        crop: str = "center",
        hflip: float = 0.0,
        rng: random.Random | None = None,
    ) -> "ResizeCrop":
        """Parameters for one sample: ``crop`` is ``center`` or ``random``; ``hflip`` a probability."""
        if crop == "center" and not hflip:
            return cls.center(width, height, size)
        rng = rng or random.Random(0)
        w, h = cls._resized(width, height, size)
        if crop == "random":
            left, top = rng.randint(0, w - size), rng.randint(0, h - size)
        elif crop == "center":
            left, top = (w - size) // 2, (h - size) // 2
        else:
            raise ValueError(f"data.augment.crop={crop!r}: use center or random")
        return cls((w, h), (left, top, left + size, top + size), flip=rng.random() < hflip)

    def apply(self, img: Image.Image, resample: int) -> Image.Image:
        if img.size != self.resized:
            img = img.resize(self.resized, resample=resample)
        img = img.crop(self.box)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if self.flip else img


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def hint_to_tensor(img: Image.Image, channels: int = 3) -> torch.Tensor:
    """A hint as the model sees it: float [0, 1], RGB (or one channel), CHW."""
    mode = "L" if channels == 1 else "RGB"
    arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def paired_resize_crop(image: Image.Image, hint: Image.Image, size: int) -> tuple[Image.Image, Image.Image]:
    if image.size != hint.size:
        raise ValueError(f"image size {image.size} and hint size {hint.size} differ")
    params = ResizeCrop.center(*image.size, size)
    return params.apply(image, Image.BICUBIC), params.apply(hint, Image.BILINEAR)


def prepare_hint(hint: Image.Image, size: int, channels: int = 3) -> torch.Tensor:
    """A hint alone (generation, validation) through the same geometry and range as training."""
    params = ResizeCrop.center(*hint.size, size)
    return hint_to_tensor(params.apply(hint, Image.BILINEAR), channels)
