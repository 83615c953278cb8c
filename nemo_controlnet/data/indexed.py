"""Random access to local shards and folders: epochs planned from an index, O(1) resume, aspect buckets.

A tar shard is indexed once (``<shard>.idx.npz`` beside it, or in the cache when its directory is
read-only): each sample's key, where each member's bytes lie, and the image's size from its header.
With the index, an epoch is planned without reading any data: every sample of the set, shuffled with
(seed, epoch), grouped by aspect bucket into *global batches* of ``world x batch_size`` samples of one
bucket, the global batches shuffled again. Rank ``r`` takes slice ``r`` of each global batch, so every
rank trains on the same bucket at every step; batch ``k`` goes to loader worker ``k mod W``, so the
loader's round robin hands them out in order. Batch ``k`` of an epoch is a pure function of (seed,
epoch, k, rank): a resumed run seeks straight to the batch after the checkpoint's, reading and decoding
nothing before it, with any number of loader workers.

A sample that fails to decode is counted, logged and replaced by another sample of the same bucket
(drawn from (seed, epoch, batch, slot)), so a batch is always full and every rank takes a step.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext
from webdataset.utils import pytorch_worker_info

from nemo_controlnet.data.webdataset import BATCH_INDEX, BUCKET, STATS, SampleDecoder, SkipCounter, collate

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx.npz"
INDEX_VERSION = 1
HEADER_BYTES = 1 << 16  # enough for the size of nearly every image; the whole member otherwise


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and Path(url).is_file()


def _cache_path(shard: Path) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemo_controlnet" / "index"
    return root / (hashlib.sha1(str(shard.resolve()).encode()).hexdigest() + INDEX_SUFFIX)


def image_size(head: bytes) -> tuple[int, int]:
    """(width, height) from an image's first bytes; (0, 0) when they do not tell (decode decides)."""
    try:
        with Image.open(io.BytesIO(head)) as image:
            return image.size
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for what it cannot parse
        return 0, 0


@dataclass
class ShardIndex:
    """Where each sample's members lie in one tar shard."""

    url: str
    keys: np.ndarray  # (n,) str
    exts: list[str]  # member extensions, the columns of offsets and sizes
    offsets: np.ndarray  # (n, len(exts)) int64 byte offset of the member's data, -1 when absent
    sizes: np.ndarray  # (n, len(exts)) int64
    image_sizes: np.ndarray  # (n, 2) int32 (width, height) of the image member, 0 when unknown
    error: str = ""  # why the shard could not be read to its end ("" when it could)

    def __len__(self) -> int:
        return len(self.keys)


def build_shard_index(url: str, image_key: str) -> ShardIndex:
    """Walk a tar's headers (seeking over the data), grouping members into samples as the streaming
    reader does (``tarshards.read_shard``); read only the head of each image for its size."""
    rows: list[dict] = []
    error = ""
    with open(url, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isreg() or info.name.startswith("__") or "/__" in info.name:
                        continue
                    key, ext = base_plus_ext(info.name)
                    if key is None:
                        continue
                    ext = ext.lower()
                    if not rows or rows[-1]["__key__"] != key or ext in rows[-1]:
                        rows.append({"__key__": key})
                    rows[-1][ext] = (info.offset_data, info.size)
        except (tarfile.TarError, EOFError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
            if rows:  # the member it broke in belongs to the last sample: dropped, as the stream drops it
                rows.pop()
        exts = sorted({e for r in rows for e in r if e != "__key__"})
        offsets = np.full((len(rows), len(exts)), -1, dtype=np.int64)
        sizes = np.zeros((len(rows), len(exts)), dtype=np.int64)
        image_sizes = np.zeros((len(rows), 2), dtype=np.int32)
        col = {e: i for i, e in enumerate(exts)}
        for i, row in enumerate(rows):
            for ext, where in row.items():
                if ext != "__key__":
                    offsets[i, col[ext]], sizes[i, col[ext]] = where
            if image_key in row:
                off, size = row[image_key]
                f.seek(off)
                image_sizes[i] = image_size(f.read(min(size, HEADER_BYTES)))
                if not image_sizes[i].any() and size > HEADER_BYTES:
                    f.seek(off)
                    image_sizes[i] = image_size(f.read(size))
    keys = np.array([r["__key__"] for r in rows], dtype=str)
    return ShardIndex(url, keys, exts, offsets, sizes, image_sizes, error)


def _signature(url: str) -> np.ndarray:
    st = os.stat(url)
    return np.array([INDEX_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)


def _save(index: ShardIndex, path: Path, signature: np.ndarray) -> None:
    """Written to a temp file in the same directory, then renamed: never a half-written index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, signature=signature, keys=index.keys, exts=np.array(index.exts, dtype=str),
                     offsets=index.offsets, sizes=index.sizes, image_sizes=index.image_sizes,
                     error=np.array(index.error))  # fmt: skip
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load(path: Path, url: str, signature: np.ndarray) -> ShardIndex | None:
    """The stored index when it was made from this very file (size and mtime), else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not np.array_equal(z["signature"], signature):
                return None
            return ShardIndex(url, z["keys"], [str(e) for e in z["exts"]], z["offsets"], z["sizes"],
                              z["image_sizes"], str(z["error"]))  # fmt: skip
    except (OSError, KeyError, ValueError):
        return None


def shard_index(url: str, image_key: str) -> tuple[ShardIndex, bool]:
    """A shard's index, from beside it or the cache, built and stored when missing or stale; and
    whether it was built now."""
    shard = Path(url)
    signature = _signature(url)
    beside, cached = Path(url + INDEX_SUFFIX), _cache_path(shard)
    for path in (beside, cached):
        if path.is_file() and (index := _load(path, url, signature)) is not None:
            return index, False
    index = build_shard_index(url, image_key)
    for path in (beside, cached):  # beside the shard when its directory is writable
        try:
            _save(index, path, signature)
            break
        except OSError as e:
            log.debug("cannot write the index %s (%s)", path, e)
    return index, True


def index_shards(urls: Sequence[str], image_key: str, progress: bool = True) -> tuple[list[ShardIndex], int]:
    """Every shard's index, and how many were built now: stored ones loaded here, missing or stale
    ones built in a process per CPU (a header walk and an image-header read per sample)."""
    indexes: list[ShardIndex | None] = [None] * len(urls)
    missing = []
    for i, url in enumerate(urls):
        signature = _signature(url)
        for path in (Path(url + INDEX_SUFFIX), _cache_path(Path(url))):
            if path.is_file() and (index := _load(path, url, signature)) is not None:
                indexes[i] = index
                break
        else:
            missing.append(i)
    bar = tqdm(total=len(missing), desc="indexing shards", unit="shard", mininterval=2.0,
               disable=not progress or len(missing) < 8)  # fmt: skip
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if len(missing) >= 8 and cpus > 1:
        with ProcessPoolExecutor(min(cpus, len(missing))) as pool:
            futures = {pool.submit(shard_index, urls[i], image_key): i for i in missing}
            for future in as_completed(futures):
                indexes[futures[future]] = future.result()[0]
                bar.update()
    else:
        for i in missing:
            indexes[i] = shard_index(urls[i], image_key)[0]
            bar.update()
    bar.close()
    return indexes, len(missing)


@dataclass
class SampleTable:
    """Every sample of a set of random-access sources, as flat arrays."""

    sources: list  # ShardSet or FolderSet, in order
    offsets: np.ndarray  # (len(sources) + 1,) the first global id of each source
    image_sizes: np.ndarray  # (n, 2) int32 (width, height), 0 when unknown
    weights: np.ndarray  # (len(sources),) the data.datasets weights (resampled draws)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def sample(self, gid: int) -> dict:
        s = int(np.searchsorted(self.offsets, gid, side="right") - 1)
        return self.sources[s].sample(int(gid - self.offsets[s]))

    def close(self) -> None:
        for source in self.sources:
            source.close()

    @classmethod
    def of(cls, sources: Sequence, weights: Sequence[float]) -> "SampleTable":
        offsets = np.cumsum([0] + [len(s) for s in sources]).astype(np.int64)
        sizes = np.concatenate([s.image_sizes for s in sources]) if sources else np.zeros((0, 2), np.int32)
        return cls(list(sources), offsets, sizes, np.asarray(weights, dtype=np.float64))


class ShardSet:
    """Local tar shards read by index: a sample is a few seeks and reads."""

    def __init__(self, urls: Sequence[str], image_key: str, progress: bool = True):
        self.urls = list(urls)
        indexes, built = index_shards(self.urls, image_key, progress)
        errors = 0
        for url, index in zip(self.urls, indexes):
            if index.error:
                errors += 1
                log.warning("shard %s: not readable to its end (%s); its %d complete samples are used",
                            url, index.error, len(index))  # fmt: skip
        self.exts = sorted({e for ix in indexes for e in ix.exts})
        col = {e: i for i, e in enumerate(self.exts)}
        n = sum(len(ix) for ix in indexes)
        self.shard_of = np.zeros(n, dtype=np.int32)
        self.keys = np.concatenate([ix.keys for ix in indexes]) if n else np.zeros(0, dtype=str)
        self.offsets = np.full((n, len(self.exts)), -1, dtype=np.int64)
        self.sizes = np.zeros((n, len(self.exts)), dtype=np.int64)
        self.image_sizes = np.zeros((n, 2), dtype=np.int32)
        start = 0
        for s, ix in enumerate(indexes):
            rows = slice(start, start + len(ix))
            self.shard_of[rows] = s
            cols = [col[e] for e in ix.exts]
            self.offsets[rows, cols], self.sizes[rows, cols] = ix.offsets, ix.sizes
            self.image_sizes[rows] = ix.image_sizes
            start += len(ix)
        self.unreadable = errors
        self._files: dict[int, object] = {}
        log.info("indexed %d shards (%d built now, %d not readable to the end): %d samples",
                 len(self.urls), built, errors, n)  # fmt: skip

    def __len__(self) -> int:
        return len(self.keys)

    def _file(self, s: int):
        f = self._files.get(s)
        if f is None:
            if len(self._files) >= 32:  # a worker reads from few shards at a time; keep descriptors bounded
                self._files.pop(next(iter(self._files))).close()
            f = self._files[s] = open(self.urls[s], "rb")
        return f

    def sample(self, i: int) -> dict:
        s = int(self.shard_of[i])
        f = self._file(s)
        sample = {"__key__": str(self.keys[i]), "__url__": self.urls[s]}
        for c, ext in enumerate(self.exts):
            off = self.offsets[i, c]
            if off >= 0:
                f.seek(off)
                sample[ext] = f.read(int(self.sizes[i, c]))
        return sample

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict:  # open files stay with the process that opened them
        return {**self.__dict__, "_files": {}}


class FolderSet:
    """An image folder (``folder.FolderSource``) by index: image sizes read from the headers once."""

    def __init__(self, folder, progress: bool = True):
        self.folder = folder
        items = folder.items
        self.image_sizes = np.zeros((len(items), 2), dtype=np.int32)
        for i, (image, _) in enumerate(tqdm(items, desc="reading image sizes", unit="image",
                                            disable=not progress or len(items) < 1000, mininterval=2.0)):  # fmt: skip
            with open(image, "rb") as f:
                self.image_sizes[i] = image_size(f.read(HEADER_BYTES))

    def __len__(self) -> int:
        return len(self.folder.items)

    def sample(self, i: int) -> dict:
        return self.folder.sample(*self.folder.items[i])

    def close(self) -> None:
        pass


# ---- aspect buckets ---------------------------------------------------------------------------


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(width, height) buckets of about ``resolution``^2 pixels (SDXL-style: for each width a multiple
    of ``step``, the largest multiple-of-``step`` height that keeps the area at most resolution^2,
    and its transpose), no longer than ``max_aspect`` to one, sorted by aspect."""
    if step <= 0 or resolution % step:
        raise ValueError(f"data.buckets.step={step}: must divide data.resolution={resolution}")
    if max_aspect < 1:
        raise ValueError(f"data.buckets.max_aspect={max_aspect}: must be >= 1")
    area = resolution * resolution
    found = set()
    for w in range(step, area // step + 1, step):
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            found |= {(w, h), (h, w)}  # portrait and landscape alike
    return sorted(found, key=lambda b: b[0] / b[1])


def assign_buckets(image_sizes: np.ndarray, buckets: list[tuple[int, int]]) -> np.ndarray:
    """Each image's bucket: the nearest aspect ratio (in log space); unknown sizes go square(st)."""
    aspects = np.log(np.array([w / h for w, h in buckets]))
    known = (image_sizes > 0).all(axis=1)
    ratio = np.zeros(len(image_sizes))
    ratio[known] = np.log(image_sizes[known, 0] / image_sizes[known, 1])
    return np.abs(ratio[:, None] - aspects[None, :]).argmin(axis=1).astype(np.int32)


# ---- epoch plans ------------------------------------------------------------------------------


@dataclass
class EpochPlan:
    batches: np.ndarray  # (n, world * batch_size) global sample ids, one bucket per row
    bucket: np.ndarray  # (n,) the bucket of each global batch
    left_over: int  # samples of this epoch in no batch (fewer than a global batch left in their bucket)


def plan_epoch(
    table: SampleTable,
    bucket_of: np.ndarray,
    n_buckets: int,
    global_batch: int,
    seed: int,
    epoch: int,
    samples_per_epoch: int | None = None,
) -> EpochPlan:
    """One epoch's global batches, a pure function of (data, seed, epoch). Finite: every sample once.
    Resampled (``samples_per_epoch``): that many draws with replacement, a source chosen by weight,
    then a sample of it uniformly."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    n = len(table)
    if samples_per_epoch:
        counts = np.diff(table.offsets)
        weights = table.weights * (counts > 0)
        src = rng.choice(len(counts), size=samples_per_epoch, p=weights / weights.sum())
        ids = table.offsets[src] + (rng.random(samples_per_epoch) * counts[src]).astype(np.int64)
    else:
        ids = np.arange(n, dtype=np.int64)
    rows, buckets, left = [], [], 0
    for b in range(n_buckets):
        mine = rng.permutation(ids[bucket_of[ids] == b])
        full = len(mine) // global_batch
        left += len(mine) - full * global_batch
        rows.append(mine[: full * global_batch].reshape(full, global_batch))
        buckets.append(np.full(full, b, dtype=np.int32))
    batches, bucket = np.concatenate(rows), np.concatenate(buckets)
    order = rng.permutation(len(batches))
    return EpochPlan(batches[order], bucket[order], left)


class IndexedStream(torch.utils.data.IterableDataset):
    """One epoch of an ``EpochPlan``: this rank's slice of each global batch from ``first`` on, every
    W-th one in worker w; each batch carries its index (``BATCH_INDEX``)."""

    def __init__(
        self,
        table: SampleTable,
        decoder: SampleDecoder,
        batch_size: int,
        epoch: int,
        seed: int,
        buckets: list[tuple[int, int]] | None,
        bucket_of: np.ndarray,
        first: int = 0,
        samples_per_epoch: int | None = None,
        plan: Callable[..., EpochPlan] = plan_epoch,
    ):
        self.table, self.decoder = table, decoder
        self.batch_size, self.epoch, self.seed = batch_size, epoch, seed
        self.buckets, self.bucket_of = buckets, bucket_of
        self.first, self.samples_per_epoch, self.plan = first, samples_per_epoch, plan

    def epoch_plan(self, world: int) -> EpochPlan:
        n_buckets = len(self.buckets) if self.buckets else 1
        return self.plan(self.table, self.bucket_of, n_buckets, world * self.batch_size, self.seed, self.epoch,
                         self.samples_per_epoch)  # fmt: skip

    def substitute(self, plan: EpochPlan, k: int, slot: int, attempt: int) -> int:
        """Another sample of the batch's bucket, the same on every run."""
        rng = np.random.default_rng([self.seed, self.epoch, k, slot, attempt])
        pool = plan.batches[plan.bucket == plan.bucket[k]].ravel()
        return int(pool[rng.integers(len(pool))])

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = pytorch_worker_info()
        plan = self.epoch_plan(world)
        counter = SkipCounter()
        self.decoder.epoch = self.epoch
        self.decoder.notes = Counter()
        mine = range(self.first + worker, len(plan.batches), workers)
        if worker == 0 and rank == 0:
            log.info("data epoch %d: %d batches of %d x %d ranks from batch %d; %d sample(s) left over this "
                     "epoch", self.epoch, len(plan.batches), self.batch_size, world, self.first,
                     plan.left_over)  # fmt: skip

        def stats() -> dict:
            return {STATS: {"worker": (rank, worker), "skipped": dict(counter.counts),
                            "notes": dict(self.decoder.notes)}}  # fmt: skip

        try:
            for k in mine:
                ids = plan.batches[k, rank * self.batch_size : (rank + 1) * self.batch_size]
                bucket = self.buckets[plan.bucket[k]] if self.buckets else None
                samples = [self.decode(plan, k, slot, int(gid), bucket, counter) for slot, gid in enumerate(ids)]
                yield {**collate(samples), BATCH_INDEX: k, **stats()}
        finally:
            self.table.close()
        yield stats()

    def decode(self, plan: EpochPlan, k: int, slot: int, gid: int, bucket, counter: SkipCounter) -> dict:
        for attempt in range(64):
            try:
                raw = self.table.sample(gid)
                if bucket is not None:
                    raw[BUCKET] = bucket
                return self.decoder(raw)
            except Exception as e:  # a bad sample: counted, logged, replaced
                counter(e)
                gid = self.substitute(plan, k, slot, attempt)
        raise RuntimeError(f"data epoch {self.epoch} batch {k}: 64 bad samples in a row in bucket "
                           f"{bucket}; the data is broken (skipped: {dict(counter.counts)})")  # fmt: skip


def buckets_for(data_cfg, table: SampleTable) -> tuple[list[tuple[int, int]] | None, np.ndarray]:
    """The aspect buckets ``data.buckets`` asks for (None: square crops) and each sample's bucket."""
    cfg = data_cfg.get("buckets") or {}
    if not cfg.get("enabled"):
        return None, np.zeros(len(table), dtype=np.int32)
    resolution = int(data_cfg.resolution)
    buckets = make_buckets(resolution, int(cfg.get("step", 64)), float(cfg.get("max_aspect", 2.0)))
    bucket_of = assign_buckets(table.image_sizes, buckets)
    counts = np.bincount(bucket_of, minlength=len(buckets))
    unknown = int((table.image_sizes == 0).any(axis=1).sum())
    log.info("aspect buckets (width x height, samples): %s%s",
             ", ".join(f"{w}x{h}: {c}" for (w, h), c in zip(buckets, counts) if c),
             f"; {unknown} image size(s) unknown, put in the nearest-to-square bucket" if unknown else "")  # fmt: skip
    return buckets, bucket_of
