"""Bytes -> PIL images and captions, with the reason when a sample cannot be used.

Safe conversions (CMYK, 16-bit, alpha, palette, grayscale -> 8-bit RGB) are done and reported;
everything else raises ``BadSample`` with a short reason that summaries count.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is corrupt, not a half-grey image


class BadSample(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB, and the conversion done (None when it already was)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.uint32)
        scale = 256 if arr.max() > 255 else 1  # 16-bit range, or 8-bit values stored wide
        arr = np.clip(arr // scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), f"{mode}->RGB"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode}->RGB"
    return image.convert("RGB"), f"{mode}->RGB"


def open_image(data: bytes | None, what: str = "image") -> Image.Image:
    """Parse the header only: size and format are known, no pixels decoded yet."""
    if data is None:
        raise BadSample(f"missing_{what}")
    if len(data) == 0:
        raise BadSample(f"empty_{what}")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise BadSample(f"corrupt_{what}", f"{type(e).__name__}: {e}") from e
    if image.width == 0 or image.height == 0:
        raise BadSample(f"zero_size_{what}")
    return image


def load_image(
    data: bytes | Image.Image | None,
    what: str = "image",
    draft_size: tuple[int, int] | None = None,
    gray_ok: bool = False,
) -> tuple[Image.Image, str | None]:
    """Decoded 8-bit RGB (or L with ``gray_ok``) and the conversion done.

    ``draft_size``: a JPEG at least twice that size is decoded at a reduced DCT scale (still at
    least that size), which skips most of the decoding of a large photo headed for 512 px.
    """
    image = data if isinstance(data, Image.Image) else open_image(data, what)
    if draft_size and image.format == "JPEG":
        image.draft("RGB", draft_size)
    try:
        image.load()
    except Exception as e:
        raise BadSample(f"corrupt_{what}", f"{type(e).__name__}: {e}") from e
    if gray_ok and image.mode == "L":
        return image, None
    return to_rgb(image)


def decode_caption(data: bytes | str | None, required: bool = True) -> str:
    if data is None:
        if required:
            raise BadSample("missing_caption")
        return ""
    if isinstance(data, str):
        return data.strip()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample("caption_not_utf8", str(e)) from e


def read_npy(data: bytes | None, what: str) -> np.ndarray:
    """A cached array member (``.npy``; never unpickled)."""
    if data is None:
        raise BadSample(f"missing_{what}")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise BadSample(f"corrupt_{what}", f"{type(e).__name__}: {e}") from e
