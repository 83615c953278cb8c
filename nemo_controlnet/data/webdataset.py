"""WebDataset tar shards -> batches (image [-1, 1], hint [0, 1] RGB, caption).

The stream is deterministic: epoch ``e`` shuffles the shard list with (seed, e) before splitting
it by rank and worker, and each worker's sample buffer with (seed, e, rank, worker). Every batch
carries its ``data_position`` (epoch, index), so a resumed run starts exactly after the last batch
the model consumed, whatever the loader had prefetched.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from webdataset.filters import _shuffle
from webdataset.utils import pytorch_worker_info

from nemo_controlnet.data.transforms import hint_to_tensor, image_to_tensor, paired_resize_crop

log = logging.getLogger(__name__)


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
        elif path.name == "manifest.json" and path.is_file():
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


def log_and_skip(exn: Exception) -> bool:
    """webdataset handler: a bad sample or shard is logged with its location and skipped."""
    log.warning("skipping bad data: %s: %s", type(exn).__name__, exn)
    return True


class SampleDecoder:
    """Raw tar members -> tensors. A picklable object, so DataLoader workers can run it."""

    def __init__(
        self,
        resolution: int,
        image_key: str,
        hint_key: str,
        caption_key: str,
        hint_channels: int,
        control_key: str = "hint",
    ):
        self.resolution = resolution
        self.image_key, self.hint_key, self.caption_key = image_key, hint_key, caption_key
        self.hint_channels = hint_channels
        self.control_key = control_key  # the hint's name in the batch (model.control_key)

    def __call__(self, sample: dict) -> dict:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        for key in (self.image_key, self.hint_key):
            if key not in sample:
                raise KeyError(
                    f"{where}: no '{key}' member (has {sorted(k for k in sample if not k.startswith('__'))})"
                )
        try:
            image = Image.open(io.BytesIO(sample[self.image_key])).convert("RGB")
            hint = Image.open(io.BytesIO(sample[self.hint_key]))
            image, hint = paired_resize_crop(image, hint, self.resolution)
            caption = sample[self.caption_key].decode("utf-8").strip() if self.caption_key in sample else ""
        except Exception as e:
            raise ValueError(f"{where}: {e}") from e
        return {
            "image": image_to_tensor(image),
            self.control_key: hint_to_tensor(hint, self.hint_channels),
            "caption": caption,
            "key": sample["__key__"],
        }


def collate(samples: list[dict]) -> dict:
    """Tensors stacked, everything else (captions, keys) as lists."""
    return {
        key: torch.stack([s[key] for s in samples]) if torch.is_tensor(value) else [s[key] for s in samples]
        for key, value in samples[0].items()
    }


class _WorkerShuffle:
    """A sample buffer shuffled differently on every rank and worker, reproducibly."""

    def __init__(self, bufsize: int, seed: int, epoch: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src):
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")
        return _shuffle(src, bufsize=self.bufsize, initial=min(self.bufsize, 100), rng=rng)


def epoch_pipeline(
    urls: list[str],
    decoder: SampleDecoder,
    batch_size: int,
    epoch: int,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    drop_last: bool = True,
) -> wds.DataPipeline:
    order = list(urls)
    if shuffle_buffer > 0:
        random.Random(f"{seed}-{epoch}").shuffle(order)  # the same order on every rank, before splitting
    stages = [
        wds.SimpleShardList(order),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=log_and_skip),
    ]
    if shuffle_buffer > 0:
        stages.append(_WorkerShuffle(shuffle_buffer, seed, epoch))
    stages += [
        wds.map(decoder, handler=log_and_skip),
        wds.batched(batch_size, collation_fn=collate, partial=not drop_last),
    ]
    return wds.DataPipeline(*stages)


class EpochStream:
    """An endless stream of batches, epoch after epoch, resumable at a ``data_position``.

    Batches up to and including ``start`` (epoch, index) are skipped. They are still read and
    decoded (a batch's content depends on the worker interleaving), which costs time on resume but
    never replays or drops a sample.
    """

    def __init__(self, make_epoch: Callable[[int], Iterable[dict]], start: tuple[int, int] = (0, -1)):
        self.make_epoch = make_epoch
        self.start = start

    def __iter__(self) -> Iterator[dict]:
        epoch, last = self.start
        if last >= 0:
            log.info("resuming data stream after epoch %d batch %d", epoch, last)
        while True:
            count = 0
            for index, batch in enumerate(self.make_epoch(epoch)):
                count += 1
                if index <= last:
                    continue
                batch["data_position"] = (epoch, index)
                yield batch
            if count == 0:
                raise RuntimeError(
                    f"epoch {epoch} produced no batch: too few samples for the batch size, or every sample was bad"
                )
            log.info("data epoch %d done: %d batches", epoch, count)
            epoch, last = epoch + 1, -1
