"""Samples -> batches (uint8 image and hint, CHW; captions), deterministically.

``transforms.normalize_batch`` makes them the contract's floats on the device.

Epoch ``e`` of a stream is a pure function of (seed, e, rank, worker): the shard order is shuffled
with (seed, e) before it is split by rank and worker, sample buffers and resampling with
(seed, e, rank, worker), augmentation with (seed, e, sample key). Every batch carries its
``data_position`` (epoch, index), so a resumed run starts exactly after the last batch the model
consumed, whatever the loader had prefetched. In resampled mode the same holds for the same
number of ranks and workers.

Bad samples (missing member, corrupt image, size mismatch, truncated tar) are skipped, logged with
shard and key, and counted by reason; batches carry their worker's counts to the main process.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import json
import logging
import os
import random
import weakref
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import braceexpand
import torch
from webdataset.filters import _shuffle
from webdataset.utils import pytorch_worker_info

from nemo_controlnet.data.decode import BadSample, decode_caption, load_array, load_hint_array, open_image, read_npy
from nemo_controlnet.data.layout import (
    HINT_LATENT_MEMBER,
    LATENT_MEMBER,
    MANIFEST,
    MASK,
    MASK_PRESENT,
    POOLED_MEMBER,
    SDXL_META,
    TEXT_MEMBER,
    mask_member,
)
from nemo_controlnet.data.tarshards import shard_samples
from nemo_controlnet.data.transforms import ResizeCrop, to_uint8_chw

log = logging.getLogger(__name__)

STATS = "data_stats"
BATCH_INDEX = "data_index"  # a batch's index in its epoch, from a seekable (indexed) epoch
BUCKET = "__bucket__"  # a sample's (width, height) target, set by a bucketing sampler
MISSING_CAPTION = {"empty": "trained with the empty prompt", "skip": "skipped"}


def expand_shards(spec: str | Iterable[str]) -> list[str]:
    """Shard paths from a brace pattern, a list, a directory of ``*.tar`` or a ``manifest.json``."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in specs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found = sorted(glob.glob(str(path / "*.tar")))
            if not found:
                raise FileNotFoundError(f"data.shards: no *.tar shards in directory {path}")
            urls += found
        elif path.name == MANIFEST and path.is_file():
            manifest = json.loads(path.read_text())
            urls += [str(path.parent / s["name"]) for s in manifest["shards"]]
        else:
            expanded = list(braceexpand.braceexpand(item))
            missing = [u for u in expanded if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
            if missing:
                raise FileNotFoundError(f"data.shards: {len(missing)} shard(s) not found, first: {missing[0]}")
            urls += expanded
    if not urls:
        raise FileNotFoundError(f"data.shards: {spec!r} names no shards")
    return urls


class SkipCounter:
    """A webdataset handler that logs a bad sample or shard, counts it by reason, and goes on."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, BadSample):
            reason, detail = exn.reason, exn.detail
        else:
            reason, detail = f"error_{type(exn).__name__}", str(exn)
        self.counts[reason] += 1
        log.warning("skipping bad data (%s): %s", reason, detail)
        return True


class SampleDecoder:
    """Raw members -> tensors: decode, draw the geometry once for image and hint, and compute the
    hint after augmentation when the sample has none (or ``detector`` is set to regenerate it).

    A picklable object, so DataLoader workers can run it.
    """

    def __init__(
        self,
        resolution: int,
        image_key: str = "jpg",
        hint_key: str = "png",
        caption_key: str = "txt",
        hint_channels: int = 3,
        control_key: str = "hint",
        crop: str = "center",
        hflip: float = 0.0,
        detector: Callable | None = None,
        regenerate: bool = False,
        seed: int = 0,
        cached: bool = False,
        keep_meta: bool = False,
        missing_caption: str = "empty",
        mask_key: str | None = None,
    ):
        self.resolution = resolution
        self.image_key, self.hint_key, self.caption_key = image_key, hint_key, caption_key
        self.hint_channels = hint_channels
        self.control_key = control_key  # the hint's name in the batch (model.control_key)
        self.crop, self.hflip = crop, hflip
        self.detector = detector  # computes a hint after augmentation when the sample has none
        self.regenerate = regenerate  # compute it even when the sample has one
        if regenerate and detector is None:
            raise ValueError("regenerating hints needs a detector")
        self.seed = seed
        self.epoch = 0
        self.cached = cached  # shards of controlnet-prep mode=encode: latents and text embeddings, no image
        self.keep_meta = keep_meta  # emit the sample's json (evaluation: the shapes' ground truth)
        if missing_caption not in MISSING_CAPTION:
            raise ValueError(f"data.missing_caption={missing_caption!r}: use one of {list(MISSING_CAPTION)}")
        self.missing_caption = missing_caption
        # A sample's ``<mask_key>.png`` member, where it has one, becomes its ``mask`` (layout.MASK).
        self.mask_member = mask_member(mask_key) if mask_key else None
        self.notes: Counter = Counter()  # samples used with a substitute (a missing caption), by reason

    def caption(self, sample: dict, where: str) -> str:
        """The sample's caption; a missing one is skipped or trained as the empty prompt (an
        unconditional sample), by ``missing_caption``, and counted either way."""
        data = sample.get(self.caption_key)
        if data is not None:
            return decode_caption(data)
        if self.missing_caption == "skip":
            raise BadSample("missing_caption", f"no '{self.caption_key}' member")
        self.notes["missing_caption"] += 1
        if self.notes["missing_caption"] <= 3:  # then only the epoch's count: a caption-less set is one line
            log.warning("%s: no '%s' member: trained with the empty prompt (data.missing_caption=empty)",
                        where, self.caption_key)  # fmt: skip
        return ""

    def cached_sample(self, sample: dict, key: str) -> dict:
        """Cached posteriors (the image's; the hint's where the family VAE-encodes it) and text embeddings,
        the hint as stored (already cropped with the latent)."""
        hint = load_hint_array(sample.get(self.hint_key))[0]
        if hint.shape[:2] != (self.resolution, self.resolution):
            size = (hint.shape[1], hint.shape[0])
            raise BadSample("size_mismatch", f"hint {size} is not {self.resolution}px square")
        meta = json.loads(sample["json"]) if sample.get("json") else {}
        sdxl = meta.get(SDXL_META) or {}
        out = {
            "latent_dist": torch.from_numpy(read_npy(sample.get(LATENT_MEMBER), "latent")),
            "text_embeds": torch.from_numpy(read_npy(sample.get(TEXT_MEMBER), "text_embeds")),
            self.control_key: to_uint8_chw(hint, self.hint_channels),
            "caption": self.caption(sample, f"{sample.get('__url__', '?')}:{key}"),
            "key": key,
            "original_size": torch.tensor(sdxl.get("original_size", (self.resolution, self.resolution))),
            "crop_top_left": torch.tensor(sdxl.get("crop_top_left", (0, 0))),
        }
        if POOLED_MEMBER in sample:
            out["pooled_text_embeds"] = torch.from_numpy(read_npy(sample[POOLED_MEMBER], "pooled"))
        if HINT_LATENT_MEMBER in sample:  # SD3, Flux: the hint's VAE posterior
            out["hint_latent_dist"] = torch.from_numpy(read_npy(sample[HINT_LATENT_MEMBER], "hint_latent"))
        if self.mask_member and sample.get(self.mask_member) is not None:
            mask = load_hint_array(sample[self.mask_member], "mask")[0]
            if mask.shape[:2] != hint.shape[:2]:
                raise BadSample("size_mismatch", f"mask {mask.shape[1::-1]} vs hint {hint.shape[1::-1]}")
            out[MASK] = binary_mask(mask)
        return out

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}:{key}"
        rng = random.Random(f"{self.seed}-{self.epoch}-{key}")
        try:
            if self.cached:
                return self.cached_sample(sample, key)
            encoded = sample.get(self.image_key)
            image = open_image(encoded, "image")  # the header: size and format, no pixels yet
            stored = None if self.regenerate else sample.get(self.hint_key)
            if stored is None and self.detector is None:
                raise BadSample("missing_hint", f"no '{self.hint_key}' member and no detector to compute one")
            hint = open_image(stored, "hint") if stored is not None else None
            if hint is not None and hint.size != image.size:
                raise BadSample("size_mismatch", f"image {image.size} vs hint {hint.size}")
            mask_data = sample.get(self.mask_member) if self.mask_member else None
            mask = open_image(mask_data, "mask") if mask_data is not None else None
            if mask is not None and mask.size != image.size:
                raise BadSample("size_mismatch", f"image {image.size} vs mask {mask.size}")
            # Geometry from the full size, before any reduced decoding: image and hint share it.
            original_size = (image.height, image.width)
            # The sample's aspect bucket (width, height) when the sampler chose one, else the square side.
            target = sample.get(BUCKET) or self.resolution
            geometry = ResizeCrop.draw(*image.size, target, self.crop, self.hflip, rng)
            # uint8 arrays from here to collate: no PIL image, no float, one copy per step
            image, _ = load_array(image, "image", draft_size=geometry.resized, encoded=encoded)
            hint = load_hint_array(hint, encoded=stored)[0] if hint is not None else None
            mask = load_hint_array(mask, "mask", encoded=mask_data)[0] if mask is not None else None
            caption = self.caption(sample, where)
        except BadSample as e:
            raise BadSample(e.reason, f"{where}: {e.detail}" if e.detail else where) from e
        image = geometry.apply(image, "image")
        hint = geometry.apply(hint, "hint") if hint is not None else self.detector(image, None, rng)[0]
        out = {
            "image": to_uint8_chw(image, 3),
            self.control_key: to_uint8_chw(hint, self.hint_channels),
            "caption": caption,
            "key": key,
            # SDXL micro-conditioning: the size before resizing, the crop's corner after it
            "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor((geometry.box[1], geometry.box[0])),
        }
        if mask is not None:  # the image's geometry: crop, resize and flip alike
            out[MASK] = binary_mask(geometry.apply(mask, "hint"))
        if self.keep_meta:
            try:
                out["meta"] = json.loads(sample["json"]) if sample.get("json") else {}
            except ValueError:
                out["meta"] = {}
        return out


def binary_mask(arr) -> torch.Tensor:
    """A decoded mask (grey or RGB, resized) -> uint8 1xHxW, 255 inside (white), 0 outside."""
    return (to_uint8_chw(arr, 1) > 127).to(torch.uint8) * 255


def collate(samples: list[dict]) -> dict:
    """Tensors stacked, everything else (captions, keys) as lists.

    In a loader worker a stack is written straight into shared memory, as torch's default_collate
    does: sending a batch to the main process then moves no bytes (a batch in ordinary memory is
    copied into shared memory when it is sent: 12 MB per 8 samples at 512 px)."""
    shared = torch.utils.data.get_worker_info() is not None
    out = {}
    with_mask = [MASK in s for s in samples]
    if any(with_mask) and not all(with_mask):
        # Only some samples have a mask member: the others get an empty one (a batch has one size), and the
        # batch says which samples have their own.
        empty = torch.zeros_like(next(s[MASK] for s in samples if MASK in s))
        samples = [{**s, MASK: s.get(MASK, empty), MASK_PRESENT: torch.tensor(has)}
                   for s, has in zip(samples, with_mask, strict=True)]  # fmt: skip
    for key, value in samples[0].items():
        if not torch.is_tensor(value):
            out[key] = [s[key] for s in samples]
            continue
        stacked = None
        if shared:  # the same call default_collate makes
            stacked = value.new(value._typed_storage()._new_shared(len(samples) * value.numel(), device=value.device))
            stacked = stacked.resize_(len(samples), *value.shape)
        out[key] = torch.stack([s[key] for s in samples], out=stacked)
    return out


def assigned(items: list, rng_seed: str, epoch_seed: str, resampled: bool) -> Iterator:
    """This rank's and worker's share of ``items`` for an epoch.

    Finite: the list shuffled with ``epoch_seed`` (the same order on every rank), then every
    world-th item from this rank, every workers-th of those for this worker: disjoint shares that
    cover the list. Resampled: items drawn with replacement forever from ``rng_seed`` (per rank
    and worker).
    """
    rank, world, worker, workers = pytorch_worker_info()
    if resampled:
        rng = random.Random(rng_seed)
        return (rng.choice(items) for _ in itertools.count())
    order = list(items)
    random.Random(epoch_seed).shuffle(order)
    mine = order[rank::world][worker::workers]
    # Which rank and worker read what: the line to look for when two ranks seem to see the same data.
    names = [Path(u[0] if isinstance(u, tuple) else u).name for u in mine]  # a shard, or (image, hint)
    log.info("rank %d/%d worker %d/%d, epoch seed %s: %d of %d %s", rank, world, worker, workers, epoch_seed,
             len(mine), len(order), names[:8] + (["..."] if len(names) > 8 else []))  # fmt: skip
    return iter(mine)


class ShardSource:
    """Tar shards, shared out by ``assigned``."""

    def __init__(self, urls: list[str]):
        self.urls = list(urls)

    def samples(self, rng_seed: str, epoch_seed: str, resampled: bool, handler) -> Iterator[dict]:
        return shard_samples(assigned(self.urls, rng_seed, epoch_seed, resampled), handler)


def _mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Draw from the streams by weight; an exhausted stream drops out and the rest go on."""
    streams, weights = list(streams), list(weights)
    while streams:
        i = rng.choices(range(len(streams)), weights=weights)[0]
        try:
            yield next(streams[i])
        except StopIteration:
            del streams[i], weights[i]


class SampleStream(torch.utils.data.IterableDataset):
    """One epoch of batches from one or more weighted sources."""

    def __init__(
        self,
        sources: list[tuple[object, float]],
        decoder: SampleDecoder,
        batch_size: int,
        epoch: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        drop_last: bool = True,
    ):
        self.sources, self.decoder = sources, decoder
        self.batch_size, self.epoch, self.seed = batch_size, epoch, seed
        self.shuffle_buffer, self.resampled, self.samples_per_epoch = shuffle_buffer, resampled, samples_per_epoch
        self.drop_last = drop_last
        if resampled and not samples_per_epoch:
            raise ValueError("data.resampled=true needs data.samples_per_epoch (the stream is endless)")

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = pytorch_worker_info()
        tag = f"{self.seed}-{self.epoch}-{rank}-{worker}"
        counter = SkipCounter()
        self.decoder.epoch = self.epoch
        self.decoder.notes = Counter()
        streams = [
            iter(src.samples(f"{tag}-{i}", f"{self.seed}-{self.epoch}-{i}", self.resampled, counter))
            for i, (src, _) in enumerate(self.sources)
        ]
        samples = streams[0] if len(streams) == 1 else _mix(streams, [w for _, w in self.sources], random.Random(tag))
        if self.resampled:
            samples = islice(samples, self.samples_per_epoch // (world * workers))
        if self.shuffle_buffer > 0:
            samples = _shuffle(samples, self.shuffle_buffer, min(self.shuffle_buffer, 100), random.Random(tag))

        def stats() -> dict:  # this worker's running counts of bad and substituted samples, for the main process
            notes = dict(self.decoder.notes)
            return {STATS: {"worker": (rank, worker), "skipped": dict(counter.counts), "notes": notes}}

        batch: list[dict] = []
        for raw in samples:
            try:
                batch.append(self.decoder(raw))
            except Exception as e:
                counter(e)
                continue
            if len(batch) == self.batch_size:
                yield {**collate(batch), **stats()}
                batch = []
        if batch and not self.drop_last:
            yield {**collate(batch), **stats()}
        yield stats()  # the final count, after the last (possibly dropped) batch


def describe_counts(skipped: Counter, notes: Counter) -> str:
    """``2 bad samples skipped {...}``, then shard read errors and samples without a caption when any."""
    shards = {k: v for k, v in skipped.items() if k.endswith("_shard")}
    samples = {k: v for k, v in skipped.items() if k not in shards}
    text = f"{sum(samples.values())} bad samples skipped {samples}"
    if shards:
        text += f", {sum(shards.values())} shard(s) not read to the end {shards}"
    if notes.get("missing_caption"):
        text += f", {notes['missing_caption']} sample(s) without a caption trained with the empty prompt"
    return text


def epoch_pipeline(
    urls: list[str],
    decoder: SampleDecoder,
    batch_size: int,
    epoch: int,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    drop_last: bool = True,
) -> SampleStream:
    """One epoch over one shard set (the common case of ``SampleStream``)."""
    return SampleStream([(ShardSource(urls), 1.0)], decoder, batch_size, epoch, seed, shuffle_buffer,
                        drop_last=drop_last)  # fmt: skip


def batches(stream: Iterable[dict]) -> Iterator[dict]:
    """The batches of a stream, without its per-worker count records."""
    return (b for b in stream if set(b) != {STATS})


# Streams still open when the interpreter exits are closed first, which shuts their loader workers
# down through the loader's own queue. Left to multiprocessing's exit handler, the workers would get
# a SIGTERM that they ignore (``datamodule.worker_init``) and the exit would wait on them forever.
_OPEN_STREAMS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    for stream in list(_OPEN_STREAMS):
        stream.close()


class EpochStream:
    """An endless stream of batches, epoch after epoch, resumable at a ``data_position``.

    ``make_epoch(epoch, first)`` gives an epoch's batches. A seekable epoch (``data/indexed.py``) starts at
    batch ``first`` and names each batch's index (``data_index``): a resume reads nothing before it. A
    streamed epoch starts at its beginning: batches up to and including ``start`` (epoch, index) are
    read, decoded and skipped (a batch's content depends on the worker interleaving), which costs time
    on resume but never replays or drops a sample. ``skipped`` totals the bad samples of finished epochs.
    """

    def __init__(self, make_epoch: Callable[[int, int], Iterable[dict]], start: tuple[int, int] = (0, -1)):
        self.make_epoch = make_epoch
        self.start = start
        self.skipped: Counter = Counter()
        self.notes: Counter = Counter()  # samples used with a substitute (missing caption), finished epochs

    def __iter__(self) -> Iterator[dict]:
        stream = self._batches()
        _OPEN_STREAMS.add(stream)
        return stream

    def _batches(self) -> Iterator[dict]:
        epoch, last = self.start
        if last >= 0:
            log.info("resuming data stream after epoch %d batch %d", epoch, last)
        while True:
            index, per_worker = 0, {}
            for batch in self.make_epoch(epoch, last + 1):
                stats = batch.pop(STATS, None)
                if stats is not None:
                    per_worker[tuple(stats["worker"])] = stats
                if not batch:
                    continue
                seek = batch.pop(BATCH_INDEX, None)
                index = index + 1 if seek is None else int(seek) + 1
                if index - 1 <= last:
                    continue
                batch["data_position"] = (epoch, index - 1)
                yield batch
            skipped = sum((Counter(w["skipped"]) for w in per_worker.values()), Counter())
            notes = sum((Counter(w.get("notes", {})) for w in per_worker.values()), Counter())
            self.skipped.update(skipped)
            self.notes.update(notes)
            if index == 0 and last < 0:
                raise RuntimeError(
                    f"epoch {epoch} produced no batch: too few samples for the batch size, or every sample "
                    f"was bad (skipped: {dict(skipped)})"
                )
            log.info("data epoch %d done: %d batches, %s", epoch, max(index, last + 1),
                     describe_counts(skipped, notes))  # fmt: skip
            epoch, last = epoch + 1, -1
