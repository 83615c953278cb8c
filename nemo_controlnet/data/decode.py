"""Bytes -> PIL images (or their pixels as arrays) and captions, with the reason when a sample
cannot be used.

Safe conversions (CMYK, 16-bit, alpha, palette, grayscale -> 8-bit RGB) are done and reported;
everything else raises ``BadSample`` with a short reason that summaries count.

``load_array`` is the training loader's decode: the pixels ``load_image`` gives, as a uint8 array.
A colour JPEG goes straight to libjpeg-turbo (simplejpeg: the same library and settings as PIL's
decoder, so the same pixels, without PIL's chunked decode and the copy into an array: 4.4 ms
against 6.6 for a 768x576 q95 photo), and an 8-bit grey or RGB PNG to OpenCV's libpng; every other
file and mode takes the PIL path, which also judges every file libjpeg reports damaged.
"""

from __future__ import annotations

import ctypes
import io
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile

try:
    import simplejpeg
except ImportError:  # a platform without its wheel: JPEGs take the PIL path, only slower
    simplejpeg = None

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


def draft_scale(size: tuple[int, int], draft_size: tuple[int, int]) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) that PIL's ``draft`` picks: the largest that keeps the
    decoded image at least ``draft_size``."""
    scale = min(size[0] // draft_size[0], size[1] // draft_size[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def _fast_jpeg(data: bytes, image: Image.Image, draft_size: tuple[int, int] | None) -> np.ndarray | None:
    """A colour JPEG decoded by libjpeg-turbo at PIL's draft scale: the pixels PIL gives. None when
    this path does not apply or libjpeg reports anything (PIL then decodes it and judges the file)."""
    if simplejpeg is None or image.mode != "RGB":
        return None
    width, height = image.size
    scale = draft_scale(image.size, draft_size) if draft_size else 1
    try:
        return simplejpeg.decode_jpeg(data, "RGB", min_width=-(-width // scale), min_height=-(-height // scale))
    except ValueError:  # strict: corrupt data, a truncated file, an unsupported variant
        return None


def _fast_png(data: bytes, image: Image.Image) -> np.ndarray | None:
    """An 8-bit grey or RGB PNG (the common image and hint) by OpenCV's libpng: the pixels PIL
    gives. None for every other PNG (palette, alpha, 1-bit, 16-bit: ``to_rgb`` converts those)."""
    args = image.tile[0].args if len(image.tile) == 1 else None
    if image.mode not in ("L", "RGB") or args != image.mode:  # a 48-bit PNG is mode RGB, rawmode RGB;16B
        return None
    flags = cv2.IMREAD_GRAYSCALE if image.mode == "L" else getattr(cv2, "IMREAD_COLOR_RGB", None)
    if flags is None:  # OpenCV < 4.11
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    return arr if arr is not None and arr.shape[:2] == (image.height, image.width) else None


def load_array(
    data: bytes | Image.Image | None,
    what: str = "image",
    draft_size: tuple[int, int] | None = None,
    gray_ok: bool = False,
    background: int = IMAGE_BACKGROUND,
    encoded: bytes | None = None,
) -> tuple[np.ndarray, str | None]:
    """``load_image``'s pixels as a uint8 array (HxWx3 RGB, or HxW grey with ``gray_ok``), and the
    conversion done. ``data`` is the file's bytes, or the image ``open_image`` parsed from them with
    those bytes as ``encoded`` (the loader reads the header first, for the geometry)."""
    image = data if isinstance(data, Image.Image) else open_image(data, what)
    encoded = data if isinstance(data, bytes) else encoded
    arr = None
    if encoded is not None and image.format == "JPEG":
        arr = _fast_jpeg(encoded, image, draft_size)
    elif encoded is not None and image.format == "PNG" and (gray_ok or image.mode == "RGB"):
        arr = _fast_png(encoded, image)
    if arr is not None:
        return arr, None
    image, converted = load_image(image, what, draft_size, gray_ok, background)
    return np.asarray(image), converted


def load_hint_array(
    data: bytes | Image.Image | None, what: str = "hint", encoded: bytes | None = None
) -> tuple[np.ndarray, str | None]:
    """``load_hint``'s pixels as a uint8 array (HxW grey or HxWx3 RGB), and the conversion done."""
    return load_array(data, what, gray_ok=True, background=HINT_BACKGROUND, encoded=encoded)


def load_hint(data: bytes | Image.Image | None, what: str = "hint") -> tuple[Image.Image, str | None]:
    """The one decode of a hint (or a conditioning image that becomes one), for every path:
    training, validation, evaluation, generation and prep. 8-bit L for single-channel inputs
    (modes 1, L, LA, I;16), RGB otherwise; transparent pixels black (no signal)."""
    return load_image(data, what, gray_ok=True, background=HINT_BACKGROUND)


def retain_heap() -> bool:
    """In a loader worker: keep freed memory for the next sample instead of handing it back to the
    OS. Each sample allocates and frees ~10 MB of arrays (decoded image, crops, Canny's gradients);
    glibc returns the top of its heap (and blocks over its adaptive mmap threshold) when freed, so
    the next sample faults them in again: ~850 page faults, ~2 ms per 512 px sample with on-the-fly
    Canny (docs/performance.md). The worker's footprint stays at its largest sample's. False where
    the C library is not glibc (nothing done)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h; 32 MiB is the largest threshold every glibc takes
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 128 << 20))


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
