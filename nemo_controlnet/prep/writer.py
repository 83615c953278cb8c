"""Shard writing for ``controlnet-prep``: a raw sample -> the members of one output sample (hint
computed here), a unit of samples -> one complete shard (temp file, rename, stats), the worker pool."""

from __future__ import annotations

import logging
import multiprocessing
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import webdataset as wds
from PIL import Image

from nemo_controlnet.data.decode import BadSample, decode_caption, load_hint, load_image
from nemo_controlnet.data.hints import MissingConditioning
from nemo_controlnet.io import atomic_path, ensure_space
from nemo_controlnet.prep.shards import SKIPPED_FILES_CAP, encode, shard_name, stats_path, write_stats
from nemo_controlnet.prep.sources import RawSample, Record

log = logging.getLogger(__name__)


def resize_short_side(image: Image.Image, size: int | None) -> Image.Image:
    """Downscale so the shorter side is ``size`` (aspect kept; never upscales: crops are training's job)."""
    if not size or min(image.size) <= size:
        return image
    scale = size / min(image.size)
    return image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)


@dataclass
class Processed:
    """One sample as prep computed it, before its members are encoded."""

    key: str
    source: str
    image: Image.Image  # RGB, resized
    hint: Image.Image  # what the hint detector returned (Canny: L)
    caption: str
    meta: dict  # the ``json`` member: source, sizes, the hint's parameters
    conversions: list[str]


class SampleProcessor:
    """A raw sample -> the members of one output sample. Runs in the worker processes."""

    def __init__(
        self,
        hint,
        image_key: str = "jpg",
        hint_key: str = "png",
        caption_key: str = "txt",
        jpeg_quality: int = 95,
        resolution: int | None = None,
        seed: int = 0,
        caption_required: bool = True,
    ):
        self.hint = hint
        self.image_key, self.hint_key, self.caption_key = image_key, hint_key, caption_key
        self.jpeg_quality, self.resolution, self.seed = jpeg_quality, resolution, seed
        self.caption_required = caption_required

    def process(self, raw: RawSample) -> Processed:
        """Decode, resize and compute the hint: the pixels prep writes, before encoding (a preview shows
        these, so what it shows is what the shards get)."""
        image, converted = load_image(raw.image, "image")
        conversions = [converted] if converted else []
        conditioning = None
        if raw.conditioning is not None:
            conditioning, converted = load_hint(raw.conditioning, "conditioning")
            conversions += [f"conditioning {converted}"] if converted else []
            if conditioning.size != image.size:
                raise BadSample("size_mismatch", f"image {image.size} vs conditioning {conditioning.size}")
        caption = decode_caption(raw.caption, self.caption_required)
        original_size = image.size
        image = resize_short_side(image, self.resolution)
        if conditioning is not None and conditioning.size != image.size:
            conditioning = conditioning.resize(image.size, Image.BILINEAR)
        # Seeded by the sample's key: the same hint whichever worker, task or re-run computes it.
        try:
            hint, hint_params = self.hint(image, conditioning, random.Random(f"{self.seed}-{raw.key}"))
        except MissingConditioning as e:
            raise BadSample("missing_conditioning", str(e)) from e
        meta = {
            "source": raw.source,
            "original_size": list(original_size),
            "size": list(image.size),
            "hint": hint_params,
            **raw.extra,
        }
        return Processed(raw.key, raw.source, image, hint, caption, meta, conversions)

    def __call__(self, raw: RawSample) -> tuple[dict, list[str]]:
        p = self.process(raw)
        sample = {
            "__key__": p.key,
            self.image_key: encode(p.image, self.image_key, self.jpeg_quality),
            self.hint_key: encode(p.hint, self.hint_key, self.jpeg_quality),
            self.caption_key: p.caption,
            "json": p.meta,
        }
        return sample, p.conversions


class Cancelled(Exception):
    """The job was cancelled; what was being written is gone, complete shards stay."""


class SkipLog:
    """One shard's skipped samples: counted by reason, the first ``SKIPPED_FILES_CAP`` listed with their
    file (``[source, reason, detail]``) for a UI's list; the rest only counted, so a folder of broken
    files cannot bloat the stats."""

    def __init__(self, unit):
        self.unit, self.counts, self.files, self.left_out = unit, Counter(), [], 0
        self._images: dict[str, str] | None = None

    def add(self, source: str, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.files) < SKIPPED_FILES_CAP:
            self.files.append([source, reason, detail])
        else:
            self.left_out += 1

    def add_bad(self, bad: BadSample) -> None:
        """A sample the source could not read: the source names it only by key, the unit by file."""
        self.add(self._source_of(getattr(bad, "key", None) or "-"), bad.reason, bad.detail)

    def _source_of(self, key: str) -> str:
        if isinstance(self.unit, str):  # an input shard: its samples are members
            return f"{self.unit}:{key}"
        if self._images is None:  # a list of records: the key's image file
            self._images = {r.key: r.image for r in self.unit if isinstance(r, Record)}
        return self._images.get(key) or key


def write_unit(
    index: int, unit, source, processor: SampleProcessor, out_dir: Path, prefix: str, should_stop=None,
    captions: dict | None = None,
) -> dict:
    """Write output shard ``index`` from one unit: temp file, rename, then its stats file.

    ``should_stop`` (in-process runs) is asked between samples: a cancelled shard is never renamed
    into place, so only complete shards remain. ``captions`` (a captioning run, prep/caption.py): key ->
    the caption to write instead of the source's, or ``(reason, detail)`` to skip the sample."""
    name = shard_name(prefix, index)
    stats_path(out_dir, name).unlink(missing_ok=True)  # until rewritten, this shard is incomplete
    start = time.time()
    written, skips, converted, generated = 0, SkipLog(unit), Counter(), 0
    largest = max((p.stat().st_size for p in out_dir.glob("*.tar")), default=0)
    if largest:  # the next shard is about as large as the largest so far: fail now, not half-way through it
        ensure_space(out_dir / name, largest)
    with atomic_path(out_dir / name, expected_bytes=largest or None) as tmp:
        with wds.TarWriter(str(tmp)) as sink:
            for raw in source.read(unit):
                if should_stop is not None and should_stop():
                    raise Cancelled(name)
                if isinstance(raw, BadSample):
                    skips.add_bad(raw)
                    log.warning("%s: skipped %s", name, raw)
                    continue
                caption = captions.get(raw.key) if captions else None
                if caption is not None and not isinstance(caption, str):
                    skips.add(raw.source, *caption)
                    log.warning("%s: skipped %s: %s: %s", name, raw.source, *caption)
                    continue
                if caption is not None:
                    raw.caption, raw.extra = caption, {**raw.extra, "caption_generated": True}
                try:
                    sample, conversions = processor(raw)
                except BadSample as e:
                    skips.add(raw.source, e.reason, e.detail)
                    log.warning("%s: skipped %s: %s", name, raw.source, e)
                    continue
                except Exception as e:  # a bug or an odd file must cost one sample, not the job
                    skips.add(raw.source, f"error_{type(e).__name__}", str(e))
                    log.exception("%s: skipped %s: unexpected %s", name, raw.source, e)
                    continue
                sink.write(sample)
                written += 1
                generated += caption is not None
                converted.update(conversions)
    stats = {
        "name": name,
        "num_samples": written,
        "skipped": dict(skips.counts),
        "skipped_files": skips.files,
        "skipped_files_left_out": skips.left_out,
        "converted": dict(converted),
        "seconds": round(time.time() - start, 3),
    }
    if captions is not None:
        stats["captioned"] = generated
    write_stats(out_dir, name, stats)
    return stats


def default_signals() -> None:
    """A forked worker dies on SIGTERM (the pool's terminate) whatever Python handlers the parent had
    installed (a training run's preemption handler, for one): not the parent's, the default."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


# Worker processes get the source and processor once, at start, not with every unit.
_WORKER: dict[str, Any] = {}


def _init_pool_worker(*init_args) -> None:
    default_signals()
    _init_worker(*init_args)


def _init_worker(source, processor, out_dir, prefix, should_stop=None) -> None:
    _WORKER.update(source=source, processor=processor, out_dir=out_dir, prefix=prefix, should_stop=should_stop)


def _run_unit(job: tuple) -> dict:
    index, unit, *captions = job  # (index, unit) or, captioning, (index, unit, captions)
    w = _WORKER
    return write_unit(index, unit, w["source"], w["processor"], w["out_dir"], w["prefix"], w["should_stop"],
                      captions[0] if captions else None)  # fmt: skip


def write_units(jobs: list | Iterator[tuple], workers: int, init_args: tuple, should_stop=None) -> Iterable[dict]:
    """Each (index, unit) -> its shard's stats, in completion order. In-process with ``workers <= 1``
    (``should_stop`` then checked between samples); otherwise in forked workers, which leaving the
    iteration early terminates (their temp files are swept by the next run). ``jobs`` may be an iterator
    that makes each job in this process as it is asked for (captioning): the pool is forked first."""
    if workers <= 1:
        _init_worker(*init_args, should_stop=should_stop)
        yield from map(_run_unit, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_init_pool_worker, initargs=init_args) as pool:
        if isinstance(jobs, list):
            yield from pool.imap_unordered(_run_unit, jobs)
        else:
            yield from _submit_as_made(pool, jobs, workers, should_stop)


def _submit_as_made(pool, jobs: Iterator[tuple], workers: int, should_stop=None) -> Iterator[dict]:
    """Jobs made here while the pool writes: each submitted once made, at most ``2 * workers`` waiting
    (made ahead, not piled up), stats yielded as shards complete. Not ``imap``: its feeder thread would
    make the jobs (run the model) outside this thread's control of cancel and interrupts."""
    pending: list = []

    def done(block: bool) -> Iterator[dict]:
        while pending:
            ready = [r for r in pending if r.ready()]
            for r in ready:
                pending.remove(r)
                yield r.get()
            if ready or not block or (should_stop is not None and should_stop()):
                return
            pending[0].wait(0.1)

    for job in jobs:
        pending.append(pool.apply_async(_run_unit, (job,)))
        yield from done(block=len(pending) >= 2 * workers)
    while pending and not (should_stop is not None and should_stop()):
        yield from done(block=True)


def summarize(what: str, written: int, skipped: Counter, converted: Counter, seconds: float) -> dict:
    rate = written / seconds if seconds > 0 else 0.0
    log.info(
        "%s: %d written, %d skipped %s, %d converted %s, %.1fs (%.1f samples/s)",
        what, written, sum(skipped.values()), dict(skipped), sum(converted.values()), dict(converted), seconds, rate,
    )  # fmt: skip
    return {"written": written, "skipped": dict(skipped), "converted": dict(converted), "seconds": round(seconds, 3)}
