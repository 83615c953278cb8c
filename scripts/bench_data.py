"""Loader throughput: samples/s per worker process at a training resolution, with hints read from
the shards (precomputed) and with Canny computed on the fly after augmentation; where a sample's
time goes; and the JPEG decoders side by side.

    python scripts/bench_data.py                      # 512 px, 0/1/2 workers, both hint modes
    python scripts/bench_data.py --workers 1 4 8 --samples 2048
    python scripts/bench_data.py --pin-memory         # also each configuration with pin_memory=True
    python scripts/bench_data.py --interp-check DIR   # bilinear vs INTER_AREA on the photos in DIR

It writes photo-like shards first (JPEG q95 images of 768x576, larger than the training size so
resize and crop run as they would on real data, with PNG Canny hints; kept in --dir for the next
run) and prints, per configuration, samples/s (wall) and the CPU milliseconds per sample of the
loader's processes (workers, and the main process that receives the batches): CPU time does not
count the waits of a shared machine, wall time does. Then the time split of one sample, measured in
this process on the real code path (``SampleDecoder`` and ``collate`` with their calls timed): read
(tar members), decode (image and stored hint), augment (crop, resize, flip), hint (Canny), collate
(tensors, stack); and the decoders on one image at 768x576 and 2048x1536.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch
import webdataset as wds
from PIL import Image

import nemo_controlnet.data.webdataset as loader_module
from nemo_controlnet.data.datamodule import worker_init
from nemo_controlnet.data.decode import draft_scale, retain_heap
from nemo_controlnet.data.hints import Canny
from nemo_controlnet.data.tarshards import shard_samples
from nemo_controlnet.data.transforms import ResizeCrop
from nemo_controlnet.data.webdataset import SampleDecoder, batches, epoch_pipeline

STEPS = ("read", "decode", "augment", "hint", "collate", "other")
OPENCV_THREADS = cv2.getNumThreads()


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
    """The shards, or the ones a previous run wrote into ``out`` with the same parameters."""
    rng = np.random.default_rng(0)
    canny = Canny()
    count = math.ceil(samples / per_shard)
    urls = [str(out / f"bench-{size[0]}x{size[1]}-{samples}-{per_shard}-{s:04d}.tar") for s in range(count)]
    if all(Path(u).is_file() for u in urls):
        return urls
    for s, url in enumerate(urls):
        with wds.TarWriter(url + ".tmp") as sink:
            for j in range(min(per_shard, samples - s * per_shard)):
                image = photo_like(rng, *size)
                jpg, hint = io.BytesIO(), io.BytesIO()
                image.save(jpg, format="JPEG", quality=95)
                canny(image)[0].save(hint, format="PNG")
                sink.write({"__key__": f"{s:04d}{j:05d}", "jpg": jpg.getvalue(), "png": hint.getvalue(),
                            "txt": "a photo"})  # fmt: skip
        Path(url + ".tmp").rename(url)
    return urls


def make_decoder(resolution: int, on_the_fly: bool) -> SampleDecoder:
    """The training decoder: random crop, flip with p=0.5, Canny after augmentation when on the fly."""
    return SampleDecoder(resolution, crop="random", hflip=0.5, detector=Canny() if on_the_fly else None,
                         regenerate=on_the_fly)  # fmt: skip


def _others_busy() -> tuple[float, float]:
    """(CPU seconds all processes but this one and its children have used, now): a shared machine's
    other load, which inflates both wall and CPU times."""
    t = psutil.cpu_times()
    own = os.times()
    busy = t.user + t.system + getattr(t, "nice", 0) + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
    return busy - (own.user + own.system + own.children_user + own.children_system), time.perf_counter()


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def measure(urls: list[str], resolution: int, workers: int, on_the_fly: bool, batch_size: int,
            pin_memory: bool = False, device: str | None = None) -> dict:  # fmt: skip
    """Samples/s through a DataLoader, and the CPU ms per sample of its workers and main process.
    Workers as in training: OpenCV sequential (the data module sets it before they fork), the data
    module's ``worker_init``; a main process that decodes by itself keeps OpenCV's threads."""
    cv2.setNumThreads(0 if workers else OPENCV_THREADS)
    stream = epoch_pipeline(urls, make_decoder(resolution, on_the_fly), batch_size, epoch=0, shuffle_buffer=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                             prefetch_factor=4 if workers else None,
                                             worker_init_fn=worker_init if workers else None)  # fmt: skip
        it = batches(loader)
        next(it)  # worker start-up and the first shard open are not throughput
        main = psutil.Process()
        procs = main.children() if workers else []
        start, count = time.perf_counter(), 0
        cpu_workers, cpu_main = _cpu(procs), _cpu([main])
        last = (start, 0, cpu_workers, cpu_main)
        for batch in it:
            count += len(batch["key"])
            if device:  # what the training step's transfer costs the main process, pinned or not
                for value in batch.values():
                    if torch.is_tensor(value):
                        value.to(device, non_blocking=True)
            try:  # read while the workers live: after the last batch they exit
                last = (time.perf_counter(), count, _cpu(procs), _cpu([main]))
            except psutil.Error:
                pass
        if device and device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    ignored = [str(w.message) for w in caught if "pin" in str(w.message).lower()]
    done = max(1, last[1])
    return {"samples_per_s": count / elapsed, "count": count,
            "worker_cpu_ms": 1e3 * (last[2] - cpu_workers) / done if workers else None,
            "main_cpu_ms": 1e3 * (last[3] - cpu_main) / done,
            "pin_memory": pin_memory and not ignored, "pin_note": ignored[0] if ignored else ""}  # fmt: skip


@contextmanager
def _timed(split: dict):
    """The loader's calls wrapped with CPU-time counters (this thread: OpenCV runs sequentially)."""

    def wrap(fn, step):
        def timed(*args, **kwargs):
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                split[step] += time.thread_time() - t

        return timed

    names = {"open_image": "decode", "load_array": "decode", "load_hint_array": "decode",
             "to_uint8_chw": "collate", "collate": "collate"}  # fmt: skip
    saved = {n: getattr(loader_module, n) for n in names}
    apply = ResizeCrop.apply
    try:
        for n, step in names.items():
            setattr(loader_module, n, wrap(saved[n], step))
        ResizeCrop.apply = wrap(apply, "augment")
        yield wrap
    finally:
        for n in names:
            setattr(loader_module, n, saved[n])
        ResizeCrop.apply = apply


def time_split(urls: list[str], resolution: int, on_the_fly: bool, batch_size: int, samples: int) -> dict:
    """CPU ms per sample for each step, on the real code path, in this process (one thread). A first
    pass over the same samples warms the page cache and the allocator."""
    retain_heap()  # as in a loader worker (worker_init)
    decoder = make_decoder(resolution, on_the_fly)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    cv2.setNumThreads(0)
    try:
        for _ in range(2):
            split = dict.fromkeys(STEPS, 0.0)
            with _timed(split) as wrap:
                decoder.detector = wrap(Canny(), "hint") if on_the_fly else None
                raw, done, batch = iter(shard_samples(iter(urls), None)), 0, []
                start = time.thread_time()
                while done < samples:
                    t = time.thread_time()
                    sample = next(raw, None)
                    split["read"] += time.thread_time() - t
                    if sample is None:
                        break
                    batch.append(decoder(sample))
                    done += 1
                    if len(batch) == batch_size:
                        loader_module.collate(batch)
                        batch = []
                split["other"] = time.thread_time() - start - sum(split.values())
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(OPENCV_THREADS)
    return {k: 1e3 * v / max(1, done) for k, v in split.items()} | {"samples": done}


def _best_ms(fn, data: list[bytes], reps: int = 3) -> tuple[float, tuple]:
    out = fn(data[0])
    best = math.inf
    for _ in range(reps):
        t = time.thread_time()
        for d in data:
            fn(d)
        best = min(best, (time.thread_time() - t) / len(data))
    return 1e3 * best, tuple(out.shape[:2][::-1])


def _pil(data: bytes, draft: tuple[int, int] | None = None) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    if draft:
        image.draft("RGB", draft)
    return np.asarray(image.convert("RGB"))


def decoders(size: tuple[int, int], resolution: int, count: int = 4) -> list[dict]:
    """ms per image of each JPEG decoder (q95 photo-like images of ``size``); the resize target
    is the loader's (short side ``resolution``): the reduced-scale decodes stop at least that big."""
    rng = np.random.default_rng(1)
    data = []
    for _ in range(count):
        buf = io.BytesIO()
        photo_like(rng, *size).save(buf, format="JPEG", quality=95)
        data.append(buf.getvalue())
    target = ResizeCrop.draw(*size, resolution).resized
    k = draft_scale(size, target)
    runs: list[tuple[str, object]] = [
        ("PIL", _pil),
        (f"PIL draft (1/{k})", lambda d: _pil(d, target)),
        ("cv2.imdecode", lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR_RGB)),
    ]
    if k > 1:  # BGR only: OpenCV refuses IMREAD_COLOR_RGB with a reduced scale
        flag = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[k]
        runs.append((f"cv2.imdecode REDUCED_{k} (BGR)", lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), flag)))
    try:
        import simplejpeg

        w, h = size
        runs += [
            ("simplejpeg", lambda d: simplejpeg.decode_jpeg(d, "RGB")),
            (
                f"simplejpeg 1/{k} (the loader)",
                lambda d: simplejpeg.decode_jpeg(d, "RGB", min_width=-(-w // k), min_height=-(-h // k)),
            ),
            (
                "simplejpeg M/8 >= target",
                lambda d: simplejpeg.decode_jpeg(d, "RGB", min_width=target[0], min_height=target[1]),
            ),
        ]
    except ImportError as e:
        runs.append((f"simplejpeg unavailable: {e}", None))
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        jpeg = TurboJPEG()
        runs.append(("PyTurboJPEG", lambda d: jpeg.decode(d, pixel_format=TJPF_RGB)))
        if k > 1:
            runs.append((f"PyTurboJPEG 1/{k}", lambda d: jpeg.decode(d, pixel_format=TJPF_RGB, scaling_factor=(1, k))))
    except Exception as e:  # no package, or no libturbojpeg on the system (it ships none)
        runs.append((f"PyTurboJPEG unavailable: {type(e).__name__}: {str(e).splitlines()[0]}", None))
    rows = []
    for name, fn in runs:
        ms, shape = _best_ms(fn, data) if fn else (None, None)
        rows.append({"source": size, "decoder": name, "ms": ms, "decoded": shape})
    return rows


def interpolation_check(folder: Path, scales=(0.89, 0.67, 0.5)) -> list[dict]:
    """Bilinear against INTER_AREA downscaling on the photos in ``folder``: how many Canny edges
    agree (F1, 1 px tolerance), beside Lanczos (PIL) and bicubic against INTER_AREA for scale."""

    def f1(a: np.ndarray, b: np.ndarray) -> float:
        kernel = np.ones((3, 3), np.uint8)
        grown_a, grown_b = cv2.dilate((a > 0).astype(np.uint8), kernel), cv2.dilate((b > 0).astype(np.uint8), kernel)
        precision = grown_b[a > 0].mean() if a.any() else 1.0
        recall = grown_a[b > 0].mean() if b.any() else 1.0
        return 2 * precision * recall / max(precision + recall, 1e-9)

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    rows = []
    for scale in scales:
        scores = []
        for path in files:
            image = Image.open(path).convert("RGB")
            arr = np.asarray(image)
            size = (round(image.width * scale), round(image.height * scale))
            area = cv2.Canny(cv2.resize(arr, size, interpolation=cv2.INTER_AREA), 100, 200)
            others = (cv2.resize(arr, size, interpolation=cv2.INTER_LINEAR),
                      np.asarray(image.resize(size, Image.LANCZOS)),
                      cv2.resize(arr, size, interpolation=cv2.INTER_CUBIC))  # fmt: skip
            scores.append([f1(cv2.Canny(o, 100, 200), area) for o in others])
        mean = np.mean(scores, axis=0)
        rows.append({"scale": scale, "photos": len(files), "linear": mean[0], "lanczos": mean[1], "cubic": mean[2]})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--source-size", type=int, nargs=2, default=(768, 576), metavar=("W", "H"))
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--per-shard", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pin-memory", action="store_true", help="also run each configuration with pin_memory")
    parser.add_argument("--to-device", default=None, metavar="DEVICE",
                        help="copy each batch to DEVICE (e.g. cuda), as the training step does")  # fmt: skip
    parser.add_argument("--split-samples", type=int, default=160, help="samples for the time split (0: none)")
    parser.add_argument("--decoder-sizes", nargs="*", default=["768x576", "2048x1536"], metavar="WxH",
                        help="source sizes for the decoder comparison (none: skip it)")  # fmt: skip
    parser.add_argument("--interp-check", type=Path, default=None, metavar="DIR",
                        help="compare bilinear with INTER_AREA downscaling on the photos in DIR")  # fmt: skip
    parser.add_argument("--target", type=float, default=150.0, help="samples/s one GPU consumes (H100: 100-200)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    args = parser.parse_args(argv)
    others = _others_busy()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        urls = write_shards(out, args.samples, args.per_shard, tuple(args.source_size))
        print(f"{args.samples} samples ({args.source_size[0]}x{args.source_size[1]} JPEG q95, PNG hints) in "
              f"{len(urls)} shards, {time.perf_counter() - start:.1f}s; torch {torch.__version__}, "
              f"{psutil.cpu_count()} CPUs")  # fmt: skip
        rows, notes = [], []
        for on_the_fly in (False, True):
            for workers in args.workers:
                for pin in (False, True) if args.pin_memory else (False,):
                    m = measure(urls, args.resolution, workers, on_the_fly, args.batch_size, pin, args.to_device)
                    per_process = m["samples_per_s"] / max(1, workers)
                    row = {"hints": "on-the-fly canny" if on_the_fly else "precomputed", "workers": workers,
                           "per_worker": per_process, "workers_for_target": math.ceil(args.target / per_process),
                           **m}  # fmt: skip
                    rows.append(row)
                    cpu = (f"worker CPU {m['worker_cpu_ms']:5.2f} ms/sample, " if workers else "") + \
                        f"main CPU {m['main_cpu_ms']:5.2f} ms/sample"  # fmt: skip
                    if m["pin_note"] and m["pin_note"] not in notes:
                        notes.append(m["pin_note"])
                        print(f"pin_memory=True: {m['pin_note']}")
                    print(f"{row['hints']:>17} | workers {workers} | pin_memory {'on' if m['pin_memory'] else 'off'} | "
                          f"{m['samples_per_s']:6.1f} samples/s | {per_process:6.1f} per process | {cpu} | "
                          f"{row['workers_for_target']:2d} worker cores for {args.target:.0f} samples/s "
                          f"({m['count']} samples at {args.resolution}px)")  # fmt: skip
        if args.split_samples:
            print("time split, CPU ms per sample, one process:", " | ".join(STEPS), "| total | samples/s")
            for on_the_fly in (False, True):
                s = time_split(urls, args.resolution, on_the_fly, args.batch_size, args.split_samples)
                total = sum(s[k] for k in STEPS)
                steps = " | ".join(f"{s[k]:5.2f}" for k in STEPS)
                print(f"  {'on-the-fly canny' if on_the_fly else 'precomputed':>17}: {steps} | {total:5.2f} | "
                      f"{1e3 / total:6.1f}")  # fmt: skip
                for row in rows:
                    if row["hints"] == ("on-the-fly canny" if on_the_fly else "precomputed"):
                        row["split_ms"] = s
    for size in args.decoder_sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        print(f"JPEG decoders, {w}x{h} q95 source, resize target short side {args.resolution} (ms per image):")
        for d in decoders((w, h), args.resolution):
            print(f"  {d['decoder']:>40}: " + (f"{d['ms']:6.2f} ms -> {d['decoded'][0]}x{d['decoded'][1]}"
                                               if d["ms"] is not None else "-"))  # fmt: skip
    if args.interp_check:
        print(f"Canny edges (100/200) after downscaling, F1 against INTER_AREA's, photos in {args.interp_check}:")
        for r in interpolation_check(args.interp_check):
            print(f"  scale {r['scale']}: bilinear {r['linear']:.3f} | Lanczos {r['lanczos']:.3f} | "
                  f"bicubic {r['cubic']:.3f} ({r['photos']} photos)")  # fmt: skip
    busy, now = _others_busy()
    print(f"other processes kept {100 * (busy - others[0]) / (now - others[1]):.0f}% of one CPU busy meanwhile "
          f"(of {100 * psutil.cpu_count()}%)")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
