"""``data.max_train_samples`` (diffusers' ``--max_train_samples``): train on the first N samples only.

"First" is the data's own order, the same for indexed and streamed access: the sources in the order the
config lists them (``data.datasets``), each source's shards in ``expand_shards`` order (a directory's
``*.tar`` sorted by name, a manifest's order, a brace pattern's), and each shard's samples in the order
they were written; a folder's images in the folder's order; a Hugging Face dataset's rows in order (its
files in order). Every epoch then shuffles those N only.
(diffusers shuffles the whole set with the seed, then takes N: a random N, not the first N.)"""

from __future__ import annotations

import copy
import logging
from typing import Iterator

import numpy as np

from nemo_controlnet.data.indexed import SampleTable, is_local, shard_index
from nemo_controlnet.data.tarshards import ShardReadError, read_shard
from nemo_controlnet.data.webdataset import ShardSource

log = logging.getLogger(__name__)


def first_of_table(table: SampleTable, n: int) -> SampleTable:
    """The table of the first ``n`` samples of ``table`` (global ids ``0..n-1``, which are the sources'
    samples in order): sources past the n-th sample keep no sample, so resampled draws skip them."""
    if n >= len(table):
        return table
    offsets = np.minimum(table.offsets, n)
    return SampleTable(table.sources, offsets, table.image_sizes[:n], table.weights)


class FirstShardSamples:
    """A shard source limited to given samples: the shards that hold them, read as ``ShardSource``
    reads them (split by rank and worker), every other sample of those shards passed over."""

    def __init__(self, urls: list[str], wanted: set[tuple[str, str]]):
        self.urls, self.wanted = list(urls), wanted

    def samples(self, rng_seed: str, epoch_seed: str, resampled: bool, handler) -> Iterator[dict]:
        for sample in ShardSource(self.urls).samples(rng_seed, epoch_seed, resampled, handler):
            if (sample["__url__"], sample["__key__"]) in self.wanted:
                yield sample


def _shard_keys(url: str, image_key: str, limit: int) -> list[str]:
    """A shard's first ``limit`` sample keys in order: from its index when it is a local file (headers
    only, and stored for the next run), else by reading it that far."""
    if is_local(url):
        return [str(k) for k in shard_index(url, image_key)[0].keys[:limit]]
    keys: list[str] = []
    try:
        for sample in read_shard(url):
            keys.append(sample["__key__"])
            if len(keys) == limit:
                break
    except ShardReadError as e:  # its complete samples count, as training reads them
        log.warning("data.max_train_samples: %s", e)
    return keys


def first_of_sources(sources: list[tuple[object, float]], n: int, image_key: str) -> list[tuple[object, float]]:
    """The streamed sources limited to their first ``n`` samples together (see the module's docstring);
    a source left without a sample is dropped."""
    out, left = [], n
    for source, weight in sources:
        if left <= 0:
            break
        if hasattr(source, "urls"):
            urls, wanted = [], set()
            for url in source.urls:
                keys = _shard_keys(url, image_key, left)
                if keys:
                    urls.append(url)
                    wanted.update((url, k) for k in keys)
                    left -= len(keys)
                if left <= 0:
                    break
            if wanted:
                out.append((FirstShardSamples(urls, wanted), weight))
        elif hasattr(source, "items") and hasattr(source, "root"):  # an image folder (data/folder.py)
            limited = copy.copy(source)
            limited.items = source.items[:left]
            left -= len(limited.items)
            out.append((limited, weight))
        elif hasattr(source, "items") and hasattr(source, "dataset"):  # data.hf: (file, first, stop) row pieces
            limited, pieces = copy.copy(source), []
            for path, first, stop in source.items:
                if left <= 0:
                    break
                pieces.append((path, first, min(stop, first + left)))
                left -= pieces[-1][2] - first
            limited.items = pieces
            out.append((limited, weight))
        else:
            raise ValueError(f"data.max_train_samples: cannot take the first samples of {source!r} when streamed; "
                             "use shards, a folder or a Hugging Face dataset, or data.access=indexed")  # fmt: skip
    return out


def log_limit(n: int, total: int | None) -> None:
    if total is not None and n >= total:
        log.info("data.max_train_samples=%d: the data has %d samples, all used", n, total)
    else:
        log.info("data.max_train_samples=%d: training on the first %d samples%s (data order: sources, shards, "
                 "samples as written)", n, n, f" of {total}" if total is not None else "")  # fmt: skip
