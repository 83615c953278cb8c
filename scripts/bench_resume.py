"""Mid-epoch resume time: indexed access (seeks to the batch) against stream access (re-reads).

    python scripts/bench_resume.py --dir /tmp/resume-bench                 # 1M samples, resume at 200,000
    python scripts/bench_resume.py --samples 4000 --per-shard 100 --position 1600 --stream-position 800

Writes a synthetic shard set of small images (kept in --dir for the next run), indexes it (timed
apart: once per shard set), then times what a resumed run does before its first batch through the
real data module (``ShardDataModule``: index load, epoch plan, loader start, the first batch) at
--position. ``--verify`` (default on) checks that batch against the same batch from an uninterrupted
run: identical keys and pixels. Stream access is timed resuming at --stream-position (it re-reads
and decodes every sample before the position, so its time grows with it).
"""

from __future__ import annotations

import argparse
import io
import math
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from nemo_controlnet.data.datamodule import ShardDataModule
from nemo_controlnet.data.indexed import ShardSet

VARIANTS = 16  # distinct images, reused under distinct keys: writing 1M samples stays quick


def _encoded(size: int) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(VARIANTS):
        img = np.zeros((size, size, 3), np.uint8)
        x0, y0 = rng.integers(2, size // 3, 2)
        img[y0 : size - y0, x0 : size - x0] = rng.integers(60, 255, 3)
        hint = np.zeros((size, size), np.uint8)
        hint[y0, x0 : size - x0] = hint[size - y0 - 1, x0 : size - x0] = 255
        jpg, png = io.BytesIO(), io.BytesIO()
        Image.fromarray(img).save(jpg, format="JPEG", quality=90)
        Image.fromarray(hint).save(png, format="PNG")
        out.append((jpg.getvalue(), png.getvalue()))
    return out


def _write_shard(args: tuple[str, int, int, int]) -> str:
    url, first, count, size = args
    if Path(url).is_file():
        return url
    encoded = _encoded(size)
    tmp = url + ".tmp"
    with tarfile.open(tmp, "w") as tar:  # plain tar members, as webdataset's TarWriter writes them
        for i in range(first, first + count):
            jpg, png = encoded[i % VARIANTS]
            for ext, data in (("jpg", jpg), ("png", png), ("txt", f"sample {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o444
                tar.addfile(info, io.BytesIO(data))
    Path(tmp).rename(url)
    return url


def write_shards(out: Path, samples: int, per_shard: int, size: int, workers: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out / f"resume-{s:06d}.tar"), s * per_shard, min(per_shard, samples - s * per_shard), size)
            for s in range(math.ceil(samples / per_shard))]  # fmt: skip
    if workers <= 1:
        return [_write_shard(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_write_shard, jobs, chunksize=8))


def data_cfg(urls: list[str], access: str, batch_size: int, workers: int, resolution: int):
    return OmegaConf.create({"shards": urls, "access": access, "num_workers": workers, "resolution": resolution,
                             "batch_size": batch_size, "shuffle_buffer": 1000, "image_key": "jpg",
                             "hint_key": "png", "caption_key": "txt"})  # fmt: skip


def resume(cfg, position: int) -> tuple[float, dict]:
    """Seconds from a fresh data module to the first batch after batch ``position - 1``, and it."""
    start = time.perf_counter()
    dm = ShardDataModule(cfg, hint_channels=3, seed=0)
    dm.setup("fit")
    dm.load_state_dict({"data_position": [0, position - 1], "data_access": cfg.access})
    batch = next(iter(dm.train_dataloader()))
    return time.perf_counter() - start, batch


def uninterrupted(cfg, position: int) -> dict:
    dm = ShardDataModule(cfg, hint_channels=3, seed=0)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        if batch["data_position"] == (0, position):
            return batch
    raise AssertionError("unreachable: the stream is endless")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--position", type=int, default=200_000, help="samples consumed before the resume")
    parser.add_argument("--stream-position", type=int, default=20_000, help="the same for stream access (0: skip)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dir", type=Path, default=None, help="where the shards live (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.dir or Path(tmp)
        t = time.perf_counter()
        urls = write_shards(out, args.samples, args.per_shard, args.image_size, args.workers)
        wrote = time.perf_counter() - t
        t = time.perf_counter()
        ShardSet(urls, "jpg")
        indexed = time.perf_counter() - t
        print(f"{args.samples} samples in {len(urls)} shards: written/found in {wrote:.1f}s, indexed/loaded in "
              f"{indexed:.1f}s")  # fmt: skip
        result = {"samples": args.samples, "shards": len(urls), "write_s": wrote, "index_s": indexed}

        batch_index = args.position // args.batch_size
        cfg = data_cfg(urls, "indexed", args.batch_size, args.workers, args.resolution)
        seconds, batch = resume(cfg, batch_index)
        result.update(position=args.position, indexed_resume_s=seconds)
        print(f"indexed access: resumed at sample {args.position:,} (batch {batch_index}) in {seconds:.2f}s "
              f"(index load, plan, {args.workers} worker(s) started, first batch)")  # fmt: skip
        if args.verify:
            t = time.perf_counter()
            expected = uninterrupted(cfg, batch_index)
            same = expected["key"] == batch["key"] and torch.equal(expected["image"], batch["image"]) and \
                torch.equal(expected["hint"], batch["hint"])  # fmt: skip
            result["same_batch"] = same
            print(f"  same next batch as the uninterrupted run: {same} (which took {time.perf_counter() - t:.0f}s "
                  f"to get there)")  # fmt: skip
            if not same:
                raise SystemExit("resumed batch differs from the uninterrupted run")
        if args.stream_position:
            stream_batch = args.stream_position // args.batch_size
            seconds, _ = resume(data_cfg(urls, "stream", args.batch_size, args.workers, args.resolution), stream_batch)
            result.update(stream_position=args.stream_position, stream_resume_s=seconds)
            print(f"stream access: resumed at sample {args.stream_position:,} in {seconds:.2f}s "
                  f"({seconds / args.stream_position * 1e5:.1f}s per 100,000 samples re-read)")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
