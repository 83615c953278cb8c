"""Loader throughput: samples/s per worker process at a training resolution, with hints read from
the shards (precomputed) and with Canny computed on the fly after augmentation.

    python scripts/bench_data.py                      # 512 px, 0/1/2 workers, both hint modes
    python scripts/bench_data.py --workers 1 4 8 --samples 2048

It writes photo-like shards first (JPEG q95 images of 768x576, larger than the training size so
resize and crop run as they would on real data, with PNG Canny hints) and prints one line per
configuration plus how many worker cores one GPU needs to be fed at --target samples/s.
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from nemo_controlnet.data.hints import Canny
from nemo_controlnet.data.webdataset import SampleDecoder, batches, epoch_pipeline


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth gradients, shapes and sensor-like noise: JPEG decode cost and edges like a photo's."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(x / width) * rng.uniform(80, 200), (y / height) * rng.uniform(80, 200),
                     np.full_like(x, rng.uniform(30, 120))], axis=2)  # fmt: skip
    for _ in range(8):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 160)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        base[mask] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def write_shards(out: Path, samples: int, per_shard: int, size: tuple[int, int]) -> list[str]:
    rng = np.random.default_rng(0)
    canny = Canny()
    urls = []
    for s in range(math.ceil(samples / per_shard)):
        url = str(out / f"bench-{s:04d}.tar")
        with wds.TarWriter(url) as sink:
            for j in range(min(per_shard, samples - s * per_shard)):
                image = photo_like(rng, *size)
                jpg, hint = io.BytesIO(), io.BytesIO()
                image.save(jpg, format="JPEG", quality=95)
                canny(image)[0].save(hint, format="PNG")
                sink.write({"__key__": f"{s:04d}{j:05d}", "jpg": jpg.getvalue(), "png": hint.getvalue(),
                            "txt": "a photo"})  # fmt: skip
        urls.append(url)
    return urls


def measure(urls: list[str], resolution: int, workers: int, on_the_fly: bool, batch_size: int) -> tuple[float, int]:
    decoder = SampleDecoder(resolution, crop="random", hflip=0.5, detector=Canny() if on_the_fly else None,
                            regenerate=on_the_fly)  # fmt: skip
    stream = epoch_pipeline(urls, decoder, batch_size, epoch=0, shuffle_buffer=64)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)  # fmt: skip
    it = batches(loader)
    next(it)  # worker start-up and the first shard open are not throughput
    start, count = time.perf_counter(), 0
    for batch in it:
        count += len(batch["key"])
    return count / (time.perf_counter() - start), count


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--source-size", type=int, nargs=2, default=(768, 576), metavar=("W", "H"))
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--per-shard", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=150.0, help="samples/s one GPU consumes (H100: 100-200)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        urls = write_shards(out, args.samples, args.per_shard, tuple(args.source_size))
        print(f"wrote {args.samples} samples ({args.source_size[0]}x{args.source_size[1]}) in {len(urls)} shards "
              f"in {time.perf_counter() - start:.1f}s; torch threads {torch.get_num_threads()}")  # fmt: skip
        rows = []
        for on_the_fly in (False, True):
            for workers in args.workers:
                rate, count = measure(urls, args.resolution, workers, on_the_fly, args.batch_size)
                per_process = rate / max(1, workers)
                row = {"hints": "on-the-fly canny" if on_the_fly else "precomputed", "workers": workers,
                       "samples_per_s": rate, "per_worker": per_process,
                       "workers_for_target": math.ceil(args.target / per_process)}  # fmt: skip
                rows.append(row)
                print(f"{row['hints']:>17} | workers {workers} | {rate:7.1f} samples/s | {per_process:6.1f} per "
                      f"process | {row['workers_for_target']:3d} worker cores for {args.target:.0f} samples/s "
                      f"({count} samples at {args.resolution}px)")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
