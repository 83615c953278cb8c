"""A fill50k-style shapes dataset: a filled circle on a solid background, its outline as the hint.

Every sample is drawn from its own seeded generator (seed, index), so the dataset is the same
however it is sharded, and a shard can be rewritten alone.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from nemo_controlnet.data.layout import MANIFEST
from nemo_controlnet.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 160, 40),
    "blue": (25, 50, 230),
    "yellow": (250, 220, 20),
    "cyan": (20, 210, 220),
    "magenta": (210, 30, 200),
    "orange": (250, 130, 10),
    "purple": (110, 30, 160),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
    "brown": (120, 70, 20),
}


def circle_params(seed: int, index: int, resolution: int) -> dict:
    rng = np.random.default_rng([seed, index])
    names = list(COLORS)
    circle, background = rng.choice(len(names), size=2, replace=False)
    radius = int(rng.integers(int(0.12 * resolution), int(0.35 * resolution) + 1))
    cx, cy = (int(v) for v in rng.integers(radius, resolution - radius, size=2, endpoint=True))
    return {
        "cx": cx,
        "cy": cy,
        "radius": radius,
        "resolution": resolution,
        "circle_color": names[circle],
        "background_color": names[background],
        "circle_rgb": list(COLORS[names[circle]]),
        "background_rgb": list(COLORS[names[background]]),
    }


def render(params: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """(image RGB uint8, hint RGB uint8, caption) for one set of circle parameters."""
    res = params["resolution"]
    center, radius = (params["cx"], params["cy"]), params["radius"]
    image = np.empty((res, res, 3), np.uint8)
    image[:] = params["background_rgb"]
    cv2.circle(image, center, radius, tuple(params["circle_rgb"]), thickness=-1, lineType=cv2.LINE_AA)
    hint = np.zeros((res, res, 3), np.uint8)
    cv2.circle(hint, center, radius, (255, 255, 255), thickness=max(1, res // 64), lineType=cv2.LINE_AA)
    caption = f"{params['circle_color']} circle with {params['background_color']} background"
    return image, hint, caption


def _encode(array: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_shard(path: Path, seed: int, indices: range, resolution: int, jpeg_quality: int) -> int:
    with atomic_path(path) as tmp:
        with wds.TarWriter(str(tmp)) as sink:
            for index in indices:
                params = circle_params(seed, index, resolution)
                image, hint, caption = render(params)
                sink.write(
                    {
                        "__key__": f"{index:08d}",
                        "jpg": _encode(image, "JPEG", jpeg_quality),
                        "png": _encode(hint, "PNG"),
                        "txt": caption,
                        "json": params,
                    }
                )
    return len(indices)


def write_shapes_dataset(
    out_dir: str | Path,
    num_samples: int,
    shard_size: int = 100,
    resolution: int = 64,
    seed: int = 0,
    jpeg_quality: int = 95,
    prefix: str = "shapes",
) -> Path:
    """Write (or find already written) ``num_samples`` samples as tar shards plus a manifest.

    Idempotent: a directory whose manifest records the same parameters is left as it is. Shards
    are written to temp names and renamed when complete; the manifest is written last, so a
    directory without one is an unfinished write that the next call redoes.
    """
    out = Path(out_dir)
    params = {
        "num_samples": num_samples,
        "shard_size": shard_size,
        "resolution": resolution,
        "seed": seed,
        "jpeg_quality": jpeg_quality,
        "prefix": prefix,
        "generator": "shapes-v1",
    }
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == params and all((out / s["name"]).is_file() for s in manifest["shards"]):
            log.info("shapes dataset already at %s (%d samples)", out, num_samples)
            return out
    if num_samples <= 0 or shard_size <= 0 or resolution < 16:
        raise ValueError(f"synthetic dataset needs num_samples>0, shard_size>0, resolution>=16; got {params}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    shards = []
    starts = range(0, num_samples, shard_size)
    for i, first in enumerate(tqdm(starts, desc=f"synth {out}", unit="shard")):
        name = f"{prefix}-{i:06d}.tar"
        n = write_shard(out / name, seed, range(first, min(first + shard_size, num_samples)), resolution, jpeg_quality)
        shards.append({"name": name, "num_samples": n})
    write_json_atomic(manifest_path, {"params": params, "shards": shards, "num_samples": num_samples})
    log.info("wrote %d samples in %d shards to %s in %.1fs", num_samples, len(shards), out, time.time() - start)
    return out
