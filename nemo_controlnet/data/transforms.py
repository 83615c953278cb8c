"""Paired transforms and the tensor contract (DESIGN.md): image in [-1, 1], hint in [0, 1] RGB.

Geometric parameters are computed once per sample and applied to image and hint alike, so the
two can never drift apart. The loader's workers emit uint8 tensors (a quarter of the bytes through
worker IPC and the host-to-device copy); ``normalize_batch`` turns them into the contract's floats,
on the device, right before the model. Training, validation and generation all go through here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from nemo_controlnet.data.decode import load_hint, load_image, open_image
from nemo_controlnet.data.layout import MASK


Size = int | tuple[int, int]  # a square side, or a (width, height) target (an aspect bucket)


def _target(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# Downscale factors up to which bilinear replaces INTER_AREA (4-7x slower at non-integer factors).
# Images to 2x: Canny edges of the result agree with INTER_AREA's better than Lanczos's do (F1 0.97-0.99
# against 0.96). Hints to 1.25x: every 1 px edge line keeps a peak above 0.3, as with INTER_AREA (at 1.5x,
# 1.5% of edge pixels fall below it). Measured in docs/performance.md ("Data loader").
LINEAR_UP_TO = {"image": 2.0, "hint": 1.25}


@dataclass(frozen=True)
class ResizeCrop:
    """Resize so the image just covers the target (the smaller side for a square), crop a target-sized
    box, optionally mirror. The target is a side (square) or a (width, height) aspect bucket."""

    resized: tuple[int, int]  # (width, height) after resize
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    flip: bool = False

    @staticmethod
    def _resized(width: int, height: int, size: Size) -> tuple[int, int]:
        tw, th = _target(size)
        scale = max(tw / width, th / height)
        return max(tw, round(width * scale)), max(th, round(height * scale))

    @classmethod
    def center(cls, width: int, height: int, size: Size) -> "ResizeCrop":
        return cls.draw(width, height, size)

    @classmethod
    def draw(
        cls,
        width: int,
        height: int,
        size: Size,
        crop: str = "center",
        hflip: float = 0.0,
        rng: random.Random | None = None,
    ) -> "ResizeCrop":
        """Parameters for one sample: ``crop`` is ``center`` or ``random``; ``hflip`` a probability."""
        tw, th = _target(size)
        w, h = cls._resized(width, height, size)
        if crop == "random":
            rng = rng or random.Random(0)
            left, top = rng.randint(0, w - tw), rng.randint(0, h - th)
        elif crop == "center":
            left, top = (w - tw) // 2, (h - th) // 2
        else:
            raise ValueError(f"data.augment.crop={crop!r}: use center or random")
        flip = bool(hflip) and (rng or random.Random(0)).random() < hflip
        return cls((w, h), (left, top, left + tw, top + th), flip=flip)

    def apply(self, img: np.ndarray | Image.Image, kind: str = "image") -> np.ndarray | Image.Image:
        """The same geometry on an image or a hint (HWC or HW uint8 array, or PIL), any input size
        with the same aspect (a JPEG decoded at a reduced DCT scale, a hint at full size).

        Only the kept box is resized: it is mapped to this input's pixels (rounded to whole pixels:
        inputs of one size get the same box, so image and hint stay pixel-aligned), cut out, resized
        to the target and mirrored. A mild downscale is bilinear (``LINEAR_UP_TO``), a stronger one
        averages (INTER_AREA: no aliasing, a thin edge survives as grey); upscaling is cubic for
        images, linear for hints."""
        as_pil = isinstance(img, Image.Image)
        arr = np.asarray(img)
        h, w = arr.shape[:2]
        left, top, right, bottom = self.box
        tw, th = right - left, bottom - top
        sx, sy = w / self.resized[0], h / self.resized[1]  # input pixels per resized pixel
        bw, bh = min(w, max(1, round(tw * sx))), min(h, max(1, round(th * sy)))
        x0, y0 = min(round(left * sx), w - bw), min(round(top * sy), h - bh)
        arr = arr[y0 : y0 + bh, x0 : x0 + bw]
        if (bw, bh) != (tw, th):
            if bw < tw or bh < th:
                interp = cv2.INTER_CUBIC if kind == "image" else cv2.INTER_LINEAR
            elif bw <= LINEAR_UP_TO[kind] * tw and bh <= LINEAR_UP_TO[kind] * th:
                interp = cv2.INTER_LINEAR
            else:
                interp = cv2.INTER_AREA
            arr = cv2.resize(arr, (tw, th), interpolation=interp)
        if self.flip:
            arr = cv2.flip(arr, 1)  # a new array; numpy's reversed copy is ten times slower
        arr = np.ascontiguousarray(arr)
        return Image.fromarray(arr) if as_pil else arr


def to_uint8_chw(arr: np.ndarray | Image.Image, channels: int | None = None) -> torch.Tensor:
    """HWC/HW uint8 -> CHW uint8 tensor; ``channels`` 3 replicates a grey hint, 1 greys an RGB one.

    A colour image becomes planar here (cv2.split: a third of the time of a strided copy), so
    collate's stack is a plain copy. A grey hint replicated to RGB is a broadcast view of its one
    plane: the three planes are written once, by the stack."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and channels == 1 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    if arr.ndim == 2:
        if not arr.flags.writeable:  # a view of a PIL image; torch wants memory it may own
            arr = arr.copy()
        plane = torch.from_numpy(arr)[None]
        return plane.expand(3, -1, -1) if channels == 3 else plane
    planes = np.empty((arr.shape[2], *arr.shape[:2]), arr.dtype)
    cv2.split(np.ascontiguousarray(arr), list(planes))
    return torch.from_numpy(planes)


def normalize_image(t: torch.Tensor) -> torch.Tensor:
    return t.float() / 127.5 - 1.0 if t.dtype == torch.uint8 else t


def normalize_hint(t: torch.Tensor) -> torch.Tensor:
    return t.float() / 255.0 if t.dtype == torch.uint8 else t


def normalize_batch(batch: dict, control_key: str = "hint") -> dict:
    """uint8 image/hint -> image float [-1, 1], hint float [0, 1]; float tensors pass unchanged. A
    ``mask`` (uint8 0/255, data/layout.py) becomes float 0/1 like the hint."""
    if "image" in batch:
        batch["image"] = normalize_image(batch["image"])
    if control_key in batch:
        batch[control_key] = normalize_hint(batch[control_key])
    if MASK in batch:
        batch[MASK] = normalize_hint(batch[MASK])
    return batch


def hint_to_tensor(img: np.ndarray | Image.Image, channels: int = 3) -> torch.Tensor:
    """A hint as the model sees it: float [0, 1], RGB (or one channel), CHW. A PIL image in any
    mode goes through the one hint decode first (alpha, palette, 16-bit)."""
    if isinstance(img, Image.Image):
        img = load_hint(img)[0]
    return normalize_hint(to_uint8_chw(img, channels))


def prepare_hint(data: bytes | Image.Image, size: int, channels: int = 3) -> torch.Tensor:
    """A hint alone (generation, validation samples) through the same decode, geometry and range as
    a training batch's hint."""
    hint = load_hint(data)[0]
    return hint_to_tensor(ResizeCrop.center(*hint.size, size).apply(np.asarray(hint), "hint"), channels)


def prepare_image(data: bytes | Image.Image, size: int) -> np.ndarray:
    """An image alone (generation from images) decoded and center-cropped as the training loader
    does it: the crop from the full size, a large JPEG decoded at a reduced DCT scale."""
    image = data if isinstance(data, Image.Image) else open_image(data, "image")
    geometry = ResizeCrop.center(*image.size, size)
    image, _ = load_image(image, "image", draft_size=geometry.resized)
    return geometry.apply(np.asarray(image), "image")
