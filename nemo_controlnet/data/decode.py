"""Bytes -> PIL images and captions, with the reason when a sample cannot be used.

Safe conversions (CMYK, 16-bit, alpha, palette, grayscale -> 8-bit RGB) are done and reported;
everything else raises ``BadSample`` with a short reason that summaries count.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is corrupt, not a half-grey image


class BadSample(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# Transparent pixels: an image shows its background as white (what viewers and most datasets
# assume); a hint's transparent pixels carry no signal, which every ControlNet hint convention
# (edges, lines, poses, scribbles: signal on black) draws as black.
IMAGE_BACKGROUND = 255
HINT_BACKGROUND = 0
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def to_rgb(
    image: Image.Image, background: int = IMAGE_BACKGROUND, gray_ok: bool = False
) -> tuple[Image.Image, str | None]:
    """8-bit RGB (or L with ``gray_ok`` for single-channel inputs), and the conversion done (None
    when there was none). 16-bit and wider values keep their high byte; alpha is composited on a
    ``background`` grey level (0 black .. 255 white)."""
    mode = image.mode
    if mode == "RGB" or (gray_ok and mode == "L"):
        return image, None
    target = "L" if gray_ok else "RGB"
    if mode in WIDE_MODES:
        arr = np.asarray(image, dtype=np.uint32)
        # 16-bit PNGs (I;16*) always hold 16-bit values; a 32-bit "I" image may hold 8-bit values
        # stored wide, and only larger values are taken as 16-bit.
        scale = 256 if mode != "I" or arr.max() > 255 else 1
        gray = Image.fromarray(np.clip(arr // scale, 0, 255).astype(np.uint8), "L")
        return (gray if gray_ok else gray.convert("RGB")), f"{mode}->{target}"
    if _has_alpha(image):
        single = mode in ("LA", "La")
        rgba = image.convert("RGBA")
        back = Image.new("RGBA", rgba.size, (background, background, background, 255))
        out = Image.alpha_composite(back, rgba)
        target = "L" if gray_ok and single else "RGB"
        return out.convert(target), f"{mode}->{target}"
    if gray_ok and mode == "1":
        return image.convert("L"), f"{mode}->L"
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
    background: int = IMAGE_BACKGROUND,
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
    return to_rgb(image, background, gray_ok)


def load_hint(data: bytes | Image.Image | None, what: str = "hint") -> tuple[Image.Image, str | None]:
    """The one decode of a hint (or a conditioning image that becomes one), for every path:
    training, validation, evaluation, generation and prep. 8-bit L for single-channel inputs
    (modes 1, L, LA, I;16), RGB otherwise; transparent pixels black (no signal)."""
    return load_image(data, what, gray_ok=True, background=HINT_BACKGROUND)


def read_file(path: str | os.PathLike, what: str) -> bytes:
    """A file's bytes for ``load_image``/``load_hint``; a missing file names itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file {path}")
    return path.read_bytes()


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
