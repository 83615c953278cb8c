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
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext
from webdataset.utils import pytorch_worker_info

from nemo_controlnet.io import atomic_path
from nemo_controlnet.data.webdataset import BATCH_INDEX, BUCKET, STATS, SampleDecoder, SkipCounter, collate

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx.npz"
INDEX_VERSION = 1
HEAD_READS = (4096, 1 << 16)  # bytes read for an image's size: nearly always the first; then more, then all
BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and Path(url).is_file()


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemo_controlnet" / "index"


def _cache_path(shard: Path) -> Path:
    return _cache_root() / (hashlib.sha1(str(shard.resolve()).encode()).hexdigest() + INDEX_SUFFIX)


def image_size(head: bytes) -> tuple[int, int]:
    """(width, height) from an image's first bytes; (0, 0) when they do not tell (decode decides).
    PNG and JPEG headers are read here (the common case, fast); anything else by PIL."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:2] == b"\xff\xd8":
        size = _jpeg_size(head)
        if size:
            return size
    try:
        with Image.open(io.BytesIO(head)) as image:
            return image.size
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for what it cannot parse
        return 0, 0


def read_image_size(f, offset: int, size: int) -> tuple[int, int]:
    """The size of the image stored at ``offset`` in ``f``, reading as little of it as tells."""
    for n in (*HEAD_READS, size):
        f.seek(offset)
        found = image_size(f.read(min(n, size)))
        if found != (0, 0) or n >= size:
            return found
    return 0, 0


SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """A JPEG's size from its start-of-frame segment (the markers before it skipped by length)."""
    pos = 2
    while pos + 9 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in SOF_MARKERS:
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (width, height) if width and height else None
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


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


class TarWalkError(Exception):
    """A tar that ends or breaks before its end-of-archive blocks."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header: ``<length> <key>=<value>\n`` each."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def walk_tar(f, file_size: int) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a tar, from its headers alone (the data is
    seeked over): ustar, pax (``path``, ``size``) and GNU long names, the formats tar writers use.
    Raises ``TarWalkError`` where the archive is cut short or a header is damaged."""
    offset, pending = 0, {}
    while True:
        f.seek(offset)
        header = f.read(BLOCK)
        if not header:
            return  # the end-of-archive blocks are missing, but every member before was whole
        if len(header) < BLOCK:
            raise TarWalkError(f"cut short inside a header at byte {offset}")
        if header == ZERO_BLOCK:
            return
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise TarWalkError(f"damaged header at byte {offset} (checksum)")
        kind, size = header[156:157], _octal(header[124:136])
        data_at = offset + BLOCK
        if data_at + size > file_size:
            raise TarWalkError(f"cut short inside a member's data at byte {file_size}")
        if kind in (b"x", b"L"):  # about the next member: its pax records, or its GNU long name
            f.seek(data_at)
            data = f.read(size)
            pending.update(_pax(data) if kind == b"x" else {"path": data.rstrip(b"\0").decode("utf-8", "replace")})
        elif kind in (b"g", b"K"):  # global pax records, GNU long link names: nothing a sample needs
            pass
        else:
            if kind in (b"0", b"\0", b"7"):
                name = header[:100].split(b"\0", 1)[0]
                if header[257:262] == b"ustar" and header[345:346] != b"\0":
                    name = header[345:500].split(b"\0", 1)[0] + b"/" + name
                size = int(pending.get("size", size))
                yield pending.get("path") or name.decode("utf-8", "replace"), data_at, size
            pending = {}
        offset = data_at + (size + BLOCK - 1) // BLOCK * BLOCK


def build_shard_index(url: str, image_key: str) -> ShardIndex:
    """Walk a tar's headers (seeking over the data), grouping members into samples as the streaming
    reader does (``tarshards.read_shard``); read only the head of each image for its size."""
    rows: list[dict] = []
    error = ""
    with open(url, "rb") as f:
        try:
            for name, offset, size in walk_tar(f, os.fstat(f.fileno()).st_size):
                if name.startswith("__") or "/__" in name:
                    continue
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                ext = ext.lower()
                if not rows or rows[-1]["__key__"] != key or ext in rows[-1]:
                    rows.append({"__key__": key})
                rows[-1][ext] = (offset, size)
        except (TarWalkError, ValueError) as e:
            error = str(e)
            if rows:  # the sample being read when the tar broke may be incomplete: dropped, as the stream drops it
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
                image_sizes[i] = read_image_size(f, *row[image_key])
    keys = np.array([r["__key__"] for r in rows], dtype=str)
    return ShardIndex(url, keys, exts, offsets, sizes, image_sizes, error)


def _signature(url: str) -> np.ndarray:
    st = os.stat(url)
    return np.array([INDEX_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Written beside its final name, then renamed (``io.atomic_path``): never a half-written index."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _arrays(index: ShardIndex, signature: np.ndarray) -> dict[str, np.ndarray]:
    return {"signature": signature, "keys": index.keys, "exts": np.array(index.exts, dtype=str),
            "offsets": index.offsets, "sizes": index.sizes, "image_sizes": index.image_sizes,
            "error": np.array(index.error)}  # fmt: skip


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


def _index_paths(url: str) -> tuple[Path, Path]:
    """Where a shard's index is stored: beside it, else (a read-only directory) in the cache."""
    return Path(url + INDEX_SUFFIX), _cache_path(Path(url))


def stored_index(url: str) -> ShardIndex | None:
    """A shard's stored index when one was made from this very file, else None."""
    signature = _signature(url)
    for path in _index_paths(url):
        if path.is_file() and (index := _load(path, url, signature)) is not None:
            return index
    return None


def shard_index(url: str, image_key: str) -> tuple[ShardIndex, bool]:
    """A shard's index, from beside it or the cache, built and stored when missing or stale; and
    whether it was built now."""
    if (index := stored_index(url)) is not None:
        return index, False
    signature = _signature(url)
    index = build_shard_index(url, image_key)
    for path in _index_paths(url):  # beside the shard when its directory is writable
        try:
            _save(path, _arrays(index, signature))
            break
        except OSError as e:
            log.debug("cannot write the index %s (%s)", path, e)
    return index, True


def index_shards(urls: Sequence[str], image_key: str, progress: bool = True) -> tuple[list[ShardIndex], int]:
    """Every shard's index, and how many were built now: stored ones loaded here, missing or stale
    ones built in a process per CPU (a header walk and an image-header read per sample)."""
    indexes = [stored_index(url) for url in urls]
    missing = [i for i, index in enumerate(indexes) if index is None]
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


SET_ARRAYS = ("shard_of", "keys", "offsets", "sizes", "image_sizes", "exts", "errors")
SET_CACHE_MIN_SHARDS = 64  # below this, loading the shards' own indexes is quick


def _join(indexes: list[ShardIndex]) -> dict[str, np.ndarray]:
    """The shards' indexes as one table (columns: the union of their member extensions)."""
    exts = sorted({e for ix in indexes for e in ix.exts})
    col = {e: i for i, e in enumerate(exts)}
    n = sum(len(ix) for ix in indexes)
    out = {
        "shard_of": np.repeat(np.arange(len(indexes), dtype=np.int32), [len(ix) for ix in indexes]),
        "keys": np.concatenate([ix.keys for ix in indexes]) if n else np.zeros(0, dtype=str),
        "offsets": np.full((n, len(exts)), -1, dtype=np.int64),
        "sizes": np.zeros((n, len(exts)), dtype=np.int64),
        "image_sizes": np.zeros((n, 2), dtype=np.int32),
        "exts": np.array(exts, dtype=str),
        "errors": np.array([ix.error for ix in indexes], dtype=str),
    }
    start = 0
    for ix in indexes:
        rows, cols = slice(start, start + len(ix)), [col[e] for e in ix.exts]
        out["offsets"][rows, cols], out["sizes"][rows, cols] = ix.offsets, ix.sizes
        out["image_sizes"][rows] = ix.image_sizes
        start += len(ix)
    return out


def _load_set(path: Path, signatures: np.ndarray) -> dict[str, np.ndarray] | None:
    """A shard set's joined index, when every shard is the file it was made from."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not np.array_equal(z["signatures"], signatures):
                return None
            return {k: z[k] for k in SET_ARRAYS}
    except (OSError, KeyError, ValueError):
        return None


class ShardSet:
    """Local tar shards read by index: a sample is a few seeks and reads.

    A large set's joined index is also cached (one file, checked against every shard's size and
    mtime), so a resumed run loads one file instead of one per shard."""

    def __init__(self, urls: Sequence[str], image_key: str, progress: bool = True):
        self.urls = list(urls)
        signatures = np.stack([_signature(u) for u in self.urls]) if self.urls else np.zeros((0, 3), np.int64)
        joined, built = None, 0
        cache = None
        if len(self.urls) >= SET_CACHE_MIN_SHARDS:
            names = "\n".join([image_key, *(str(Path(u).resolve()) for u in self.urls)])
            cache = _cache_root() / f"set-{hashlib.sha1(names.encode()).hexdigest()}.npz"
            joined = _load_set(cache, signatures) if cache.is_file() else None
        if joined is None:
            indexes, built = index_shards(self.urls, image_key, progress)
            joined = _join(indexes)
            if cache is not None:
                try:
                    _save(cache, {**joined, "signatures": signatures})
                except OSError as e:
                    log.debug("cannot write the shard set's index %s (%s)", cache, e)
        self.shard_of, self.keys, self.offsets = joined["shard_of"], joined["keys"], joined["offsets"]
        self.sizes, self.image_sizes = joined["sizes"], joined["image_sizes"]
        self.exts = [str(e) for e in joined["exts"]]
        self.unreadable = 0
        for s, error in enumerate(joined["errors"]):
            if error:
                self.unreadable += 1
                log.warning("shard %s: not readable to its end (%s); its %d complete samples are used",
                            self.urls[s], error, int((self.shard_of == s).sum()))  # fmt: skip
        self._files: dict[int, object] = {}
        log.info("indexed %d shards (%d built now, %d not readable to the end): %d samples",
                 len(self.urls), built, self.unreadable, len(self.keys))  # fmt: skip

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
                self.image_sizes[i] = read_image_size(f, 0, os.fstat(f.fileno()).st_size)

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
    ):
        self.table, self.decoder = table, decoder
        self.batch_size, self.epoch, self.seed = batch_size, epoch, seed
        self.buckets, self.bucket_of = buckets, bucket_of
        self.first, self.samples_per_epoch = first, samples_per_epoch

    def epoch_plan(self, world: int) -> EpochPlan:
        n_buckets = len(self.buckets) if self.buckets else 1
        return plan_epoch(self.table, self.bucket_of, n_buckets, world * self.batch_size, self.seed, self.epoch,
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
                if k == mine.start:  # which rank and worker read what: the line to look for when ranks seem to overlap
                    log.info("rank %d/%d worker %d/%d, epoch %d: batch %d of %d, keys %s", rank, world, worker,
                             workers, self.epoch, k, len(plan.batches), [s["key"] for s in samples])  # fmt: skip
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
