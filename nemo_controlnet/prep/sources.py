"""Input layouts for ``controlnet-prep``: each lists deterministic work units and reads them.

A unit becomes one output shard. ``units(shard_size)`` must give the same list every time for the
same input (sorted listings, no randomness), so a re-run, or another SLURM array task, agrees on
what unit N is. ``read(unit)`` yields raw samples: bytes and text, no decoding (that is the
processor's job, in the worker processes), or a ``BadSample`` for what cannot be read.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


from nemo_controlnet.data.decode import BadSample
from nemo_controlnet.data.layout import find_images
from nemo_controlnet.data.tarshards import ShardReadError, shard_samples
from nemo_controlnet.data.webdataset import expand_shards

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One input sample by reference; small and picklable."""

    key: str
    image: str
    conditioning: str | None = None
    caption: str | None = None  # the text itself
    caption_path: str | None = None  # or where to read it
    extra: dict = field(default_factory=dict)


@dataclass
class RawSample:
    key: str
    source: str
    image: bytes | None
    conditioning: bytes | None = None
    caption: bytes | str | None = None
    extra: dict = field(default_factory=dict)


def _read_bytes(path: str | None) -> bytes | None:
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def _chunks(records: list, size: int) -> list[list]:
    return [records[i : i + size] for i in range(0, len(records), size)]


class RecordSource:
    """A source whose samples are files: list records once, cut them into units, read files."""

    caption_required = True

    def records(self) -> list[Record]:
        raise NotImplementedError

    def units(self, shard_size: int) -> list[list[Record]]:
        records = self.records()
        log.info("%s: %d samples", self, len(records))
        return _chunks(records, shard_size)

    def read(self, unit: list[Record]) -> Iterator[RawSample | BadSample]:
        for r in unit:
            if "error" in r.extra:
                yield _bad("bad_metadata", r.key, r.extra["error"])
                continue
            caption = r.caption if r.caption is not None else _read_bytes(r.caption_path)
            sample = RawSample(r.key, r.image, _read_bytes(r.image), caption=caption, extra=dict(r.extra))
            if r.conditioning is not None:
                sample.conditioning = _read_bytes(r.conditioning)
                if sample.conditioning is None:
                    yield _bad("missing_conditioning", r.key, r.conditioning)
                    continue
            if sample.image is None:
                yield _bad("missing_image", r.key, r.image)
                continue
            if self.caption_required and sample.caption is None:
                yield _bad("missing_caption", r.key, r.caption_path or r.image)
                continue
            yield sample


def _bad(reason: str, key: str, where: str) -> BadSample:
    e = BadSample(reason, f"{key} ({where})")
    e.key = key
    return e


class ImageFolder(RecordSource):
    """Images found recursively under ``root``; captions from sidecar ``<stem>.txt`` files, or one
    fixed caption for all (``caption`` set; ``""`` for none)."""

    def __init__(self, root: str, caption: str | None = None, exclude_dirs: tuple[str, ...] = ("canny",)):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"source.root: no directory {self.root}")
        self.caption = caption
        self.exclude_dirs = set(exclude_dirs or ())
        self.caption_required = caption is None

    def __repr__(self) -> str:
        return f"ImageFolder({self.root})"

    def image_paths(self) -> list[Path]:
        return find_images(self.root, self.exclude_dirs)

    def records(self) -> list[Record]:
        out = []
        for i, path in enumerate(self.image_paths()):
            out.append(
                Record(
                    key=f"{i:09d}",
                    image=str(path),
                    caption=self.caption,
                    caption_path=None if self.caption is not None else str(path.with_suffix(".txt")),
                    extra={"relpath": str(path.relative_to(self.root))},
                )
            )
        return out


class MetadataJsonl(RecordSource):
    """A diffusers-style folder: ``metadata.jsonl`` lines naming the image, the conditioning image
    and the text (column names configurable), paths relative to the folder. A line that is not
    JSON or lacks the image column becomes a counted skip (``bad_metadata``)."""

    def __init__(
        self,
        root: str,
        metadata: str = "metadata.jsonl",
        image_column: str = "image",
        conditioning_column: str | None = "conditioning_image",
        caption_column: str = "text",
    ):
        self.root = Path(root)
        self.metadata = self.root / metadata
        if not self.metadata.is_file():
            raise FileNotFoundError(f"source: no metadata file {self.metadata}")
        self.image_column, self.conditioning_column = image_column, conditioning_column
        self.caption_column = caption_column

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.metadata})"

    def records(self) -> list[Record]:
        out = []
        with open(self.metadata, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                key = f"{len(out):09d}"
                try:
                    row = json.loads(line)
                    image = row[self.image_column]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    out.append(Record(key, "", extra={"error": f"{self.metadata}:{n}: {type(e).__name__}: {e}"}))
                    continue
                conditioning = row.get(self.conditioning_column) if self.conditioning_column else None
                out.append(
                    Record(
                        key=key,
                        image=str(self.root / image),
                        conditioning=str(self.root / conditioning) if conditioning else None,
                        caption=row.get(self.caption_column),
                        extra={"line": n},
                    )
                )
        return out


class ControlNetPromptJson(MetadataJsonl):
    """The original ControlNet layout: ``prompt.json`` lines ``{"source", "target", "prompt"}`` with
    paths relative to ``root`` (``source/`` holds the hints, ``target/`` the images)."""

    def __init__(self, root: str, prompt_file: str = "prompt.json"):
        super().__init__(
            root, prompt_file, image_column="target", conditioning_column="source", caption_column="prompt"
        )


class ExistingShards:
    """WebDataset shards without hints (img2dataset output: jpg/txt/json): one unit per input
    shard, so output shard N holds input shard N's samples, keys kept."""

    caption_required = False

    def __init__(self, shards, image_key: str = "jpg", caption_key: str = "txt"):
        self.urls = expand_shards(shards)
        self.image_key, self.caption_key = image_key, caption_key

    def __repr__(self) -> str:
        return f"ExistingShards({len(self.urls)} shards, first {self.urls[0]})"

    def units(self, shard_size: int) -> list[str]:
        log.info("%s: one output shard per input shard (shard_size does not apply)", self)
        return list(self.urls)

    def read(self, unit: str) -> Iterator[RawSample | BadSample]:
        errors: list[ShardReadError] = []  # what was read before the damage is kept
        for raw in shard_samples([unit], errors.append):
            extra = {}
            if "json" in raw:
                try:
                    extra = {"source_json": json.loads(raw["json"])}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass
            yield RawSample(
                raw["__key__"],
                f"{unit}:{raw['__key__']}",
                raw.get(self.image_key),
                caption=raw.get(self.caption_key),
                extra=extra,
            )
        for e in errors:
            yield _bad(e.reason, e.member or "-", e.detail)
