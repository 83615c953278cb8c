"""Hugging Face datasets on disk, read a batch of rows at a time: one loader for prep and training.

``HfDataset(path, split, ...)`` finds the split's files (``hf_layout.find_files``: ``save_to_disk``,
parquet, arrow, image folder), numbers its rows across them in order (a row's key is its number in the
split) and checks the three columns (the diffusers script's ``image_column``,
``conditioning_image_column``, ``caption_column``). Nothing is loaded whole: parquet is read with
``pyarrow.parquet.ParquetFile.iter_batches`` (the row groups that overlap the rows asked for, those
columns only, ``BATCH_ROWS`` rows at a time; pyarrow reads a row group's columns whole, so a reader
holds about one row group: 100 rows in the Hub's image parquet); arrow files are memory-mapped.
Image cells stay encoded (the ``Image`` feature's ``{bytes, path}``, plain bytes, or a path), so
``data/decode.py`` decodes them as it decodes every other source.

``HfSource`` is the training source: samples shaped like tar members. Arrow data is random access
(``data.access=indexed`` or stream); parquet is read by row group, so it is streamed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from nemo_controlnet.config import ConfigError
from nemo_controlnet.data.decode import BadSample
from nemo_controlnet.data.hf_layout import file_kind, find_files
from nemo_controlnet.data.indexed import image_size
from nemo_controlnet.data.webdataset import assigned

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as e:  # pragma: no cover - pyarrow comes with the hf extra
    raise ImportError("Hugging Face datasets need pyarrow: pip install 'nemo_controlnet[hf]'") from e

log = logging.getLogger(__name__)

BATCH_ROWS = 32  # rows decoded from parquet at once: image rows can be megabytes each
STREAM_CHUNK = 256  # arrow rows per streamed work item (parquet: one row group)
LARGE_ROW_GROUP = 1 << 30  # bytes: a row group this large gets a warning (memory is about one row group)
READ_ERRORS = (OSError, pa.ArrowException)  # a damaged or unreadable file


@dataclass(frozen=True)
class HfFile:
    path: str
    kind: str  # parquet | arrow
    first: int  # the split's row number of its first row
    num_rows: int
    row_groups: tuple[int, ...]  # parquet: rows per row group; arrow: ()


@dataclass(frozen=True)
class RowRange:
    """Rows ``start``..``stop`` of a split as (file, first, stop) pieces, file-local rows; picklable."""

    start: int
    stop: int
    pieces: tuple[tuple[str, int, int], ...]

    def __repr__(self) -> str:
        return f"rows {self.start}..{self.stop - 1}"

    def __iter__(self):  # what a unit holds, for code that looks through a unit's items (prep's SkipLog)
        return iter(self.pieces)


@dataclass
class HfRow:
    index: int  # in the split
    where: str  # file:row
    image: bytes | None
    conditioning: bytes | None
    caption: str | None


def _open_arrow(path: str) -> "pa.Table":
    """A memory-mapped arrow file (the IPC stream format datasets writes, or the file format)."""
    source = pa.memory_map(path)
    magic = source.read(6)
    source.seek(0)
    reader = pa.ipc.open_file(source) if magic == b"ARROW1" else pa.ipc.open_stream(source)
    return reader.read_all()  # zero-copy: the buffers are views of the mapped file


IMAGE_TYPES = "the Image feature ({bytes, path}), bytes or a path"


def _is_image_type(t: "pa.DataType") -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0 or t.get_field_index("path") >= 0
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


class HfDataset:
    """One split of a dataset on disk: its files, rows numbered across them, the columns checked.

    Picklable (paths and counts): each process opens the files itself, when it first reads."""

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str = "image",
        conditioning_image_column: str | None = "conditioning_image",
        caption_column: str | None = "text",
        what: str = "data.hf",
    ):
        self.path, self.split, self.what = str(path), split, what
        self.layout, files, base = find_files(self.path, split, what)
        self.base_dir = str(base)
        self.image_column, self.conditioning_column = image_column, conditioning_image_column
        self.caption_column = caption_column
        self.files: list[HfFile] = []
        first = 0
        for f in files:
            schema, n, groups = self._describe(str(f))
            self._check_columns(str(f), schema)
            self.files.append(HfFile(str(f), file_kind(f) or "arrow", first, n, groups))
            first += n
        self.num_rows = first
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()
        log.info("%s: %s, split %s, %d rows in %d %s file(s)", what, self.path, split, self.num_rows,
                 len(self.files), self.layout)  # fmt: skip

    def __repr__(self) -> str:
        return f"HfDataset({self.path}, split={self.split}, {self.num_rows} rows)"

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict:  # open files stay with the process that opened them
        return {**self.__dict__, "_handles": {}}

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.image_column, self.conditioning_column, self.caption_column) if c))

    @property
    def seekable(self) -> bool:
        """Random access to a row is cheap: arrow files (memory-mapped), not parquet (a row group each)."""
        return all(f.kind == "arrow" for f in self.files)

    def _describe(self, path: str) -> tuple["pa.Schema", int, tuple[int, ...]]:
        if file_kind(path) == "parquet":
            meta = pq.read_metadata(path)
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            biggest = max((meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)), default=0)
            if biggest > LARGE_ROW_GROUP:  # pyarrow reads a row group's column chunks whole
                log.warning("%s: a row group of %.1f GiB: each reader holds one in memory; rewrite the file with "
                            "smaller row groups (datasets' to_parquet writes 100 image rows per group)", path,
                            biggest / 2**30)  # fmt: skip
            return meta.schema.to_arrow_schema(), meta.num_rows, groups
        table = _open_arrow(path)
        return table.schema, table.num_rows, ()

    def _check_columns(self, path: str, schema: "pa.Schema") -> None:
        names = schema.names
        keys = (("image_column", self.image_column), ("conditioning_image_column", self.conditioning_column),
                ("caption_column", self.caption_column))  # fmt: skip
        for key, column in keys:
            if column is None:
                continue
            if column not in names:
                raise ConfigError(f"{self.what}.{key}={column!r}: no such column in {path} (columns: {names})")
            if key != "caption_column" and not _is_image_type(schema.field(column).type):
                raise ConfigError(f"{self.what}.{key}={column!r} holds {schema.field(column).type}, not images "
                                  f"({IMAGE_TYPES}); columns: {names}")  # fmt: skip

    # ---- work units -------------------------------------------------------------------------------

    def ranges(self, size: int) -> list[RowRange]:
        """The split cut into consecutive ranges of ``size`` rows (the last one shorter): prep's units."""
        out = []
        for start in range(0, self.num_rows, size):
            stop = min(start + size, self.num_rows)
            pieces = tuple((f.path, max(start, f.first) - f.first, min(stop, f.first + f.num_rows) - f.first)
                           for f in self.files if f.first < stop and f.first + f.num_rows > start)  # fmt: skip
            out.append(RowRange(start, stop, pieces))
        return out

    def chunks(self) -> list[tuple[str, int, int]]:
        """(file, first, stop) pieces that read well alone: a parquet row group, ``STREAM_CHUNK`` arrow rows."""
        out = []
        for f in self.files:
            bounds = np.cumsum((0, *f.row_groups)) if f.kind == "parquet" else range(0, f.num_rows, STREAM_CHUNK)
            bounds = [int(b) for b in bounds if b < f.num_rows] + [f.num_rows]
            out += [(f.path, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        return out

    # ---- reading ----------------------------------------------------------------------------------

    def _handle(self, path: str):
        if self._pid != os.getpid():  # forked: the parent's handles are not this process's
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(path)
        if handle is None:
            if file_kind(path) == "parquet":
                handle = pq.ParquetFile(path)
            else:
                handle = _open_arrow(path).select(self.columns)
            self._handles[path] = handle
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            if isinstance(handle, pq.ParquetFile):
                handle.close()
        self._handles.clear()

    def _file(self, path: str) -> HfFile:
        return next(f for f in self.files if f.path == path)

    def batches(self, path: str, first: int, stop: int) -> Iterator[tuple[int, "pa.RecordBatch"]]:
        """(file row of its first row, batch) covering file rows ``first``..``stop``, a few rows at a time."""
        f, handle = self._file(path), self._handle(path)
        if f.kind == "arrow":
            for batch in handle.slice(first, stop - first).to_batches(max_chunksize=BATCH_ROWS):
                yield first, batch
                first += batch.num_rows
            return
        bounds = np.cumsum((0, *f.row_groups))
        groups = [g for g in range(len(f.row_groups)) if bounds[g] < stop and bounds[g + 1] > first]
        if not groups:
            return
        row = int(bounds[groups[0]])
        for batch in handle.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=self.columns,
                                         use_threads=False):  # fmt: skip
            n = batch.num_rows
            if row + n > first:
                a, b = max(first - row, 0), min(stop - row, n)
                yield row + a, batch.slice(a, b - a)
            row += n
            if row >= stop:
                return

    def read(self, pieces: Sequence[tuple[str, int, int]]) -> Iterator[HfRow]:
        """The rows of ``pieces`` in order, image cells as encoded bytes."""
        for path, first, stop in pieces:
            offset = self._file(path).first
            for row, batch in self.batches(path, first, stop):
                yield from self._rows(batch, path, row, offset)

    def row(self, index: int) -> HfRow:
        """One row by its number in the split (arrow: a slice of the mapped file)."""
        starts = [f.first for f in self.files]
        f = self.files[int(np.searchsorted(starts, index, side="right") - 1)]
        row = index - f.first
        return next(self._rows(self._handle(f.path).slice(row, 1), f.path, row, f.first))

    def _rows(self, batch, path: str, row: int, offset: int) -> Iterator[HfRow]:
        cells = {c: batch.column(c).to_pylist() for c in self.columns}
        none = [None] * batch.num_rows
        images, conditionings = cells[self.image_column], cells.get(self.conditioning_column, none)
        captions = cells.get(self.caption_column, none)
        for k in range(batch.num_rows):
            yield HfRow(offset + row + k, f"{path}:{row + k}", self.cell_bytes(images[k]),
                        self.cell_bytes(conditionings[k]), caption_text(captions[k]))  # fmt: skip

    def cell_bytes(self, cell) -> bytes | None:
        """An image cell's encoded bytes: the Image feature's ``bytes``, else the file at its ``path``
        (relative to the dataset's directory); None when there is neither."""
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return cell["bytes"]
            cell = cell.get("path")
        if cell is None or isinstance(cell, bytes):
            return cell
        path = Path(cell) if os.path.isabs(cell) else Path(self.base_dir) / cell
        return path.read_bytes() if path.is_file() else None


def caption_text(cell) -> str | None:
    """A caption cell: text, or the first of a list of captions (datasets with several per image)."""
    if isinstance(cell, (list, tuple)):
        cell = next((c for c in cell if c is not None), None)
    return None if cell is None else str(cell)


class HfSource:
    """Training samples from a Hugging Face dataset on disk, shaped like tar members (``image_key``,
    ``hint_key`` from the conditioning column, ``caption_key``), so the shard decoder serves it.

    Streamed: the pieces of ``chunks`` shared out by rank and worker like shards. Indexed (arrow only):
    ``indexed_set``."""

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str = "image",
        conditioning_image_column: str | None = "conditioning_image",
        caption_column: str | None = "text",
        on_the_fly: bool = False,
        image_key: str = "jpg",
        hint_key: str = "png",
        caption_key: str = "txt",
    ):
        if conditioning_image_column is None and not on_the_fly:
            raise ConfigError("data.hf.conditioning_image_column=null: without a conditioning column the hints "
                              "are computed; set data.hint.on_the_fly=true")  # fmt: skip
        self.dataset = HfDataset(path, split, image_column, conditioning_image_column, caption_column, "data.hf")
        if len(self.dataset) == 0:
            raise ConfigError(f"data.hf.path={path!r}: split {split!r} has no rows")
        self.image_key, self.hint_key, self.caption_key = image_key, hint_key, caption_key
        self.items = self.dataset.chunks()
        self.seekable = self.dataset.seekable
        self.unit_kind = "row group(s)" if not self.seekable else f"chunk(s) of {STREAM_CHUNK} rows"

    def __repr__(self) -> str:
        d = self.dataset
        return f"{d.num_rows} rows of {d.path} ({d.layout}, split {d.split})"

    def sample(self, row: HfRow) -> dict:
        sample = {"__key__": f"{row.index:09d}", "__url__": row.where, self.image_key: row.image}
        if row.conditioning is not None:
            sample[self.hint_key] = row.conditioning
        if row.caption is not None:
            sample[self.caption_key] = row.caption
        return sample

    def samples(self, rng_seed: str, epoch_seed: str, resampled: bool, handler) -> Iterator[dict]:
        for piece in assigned(self.items, rng_seed, epoch_seed, resampled):
            try:
                for row in self.dataset.read([piece]):
                    yield self.sample(row)
            except READ_ERRORS as e:  # a damaged file: one error per piece, as per shard
                if not handler(BadSample("unreadable_shard", f"{piece[0]} rows {piece[1]}..{piece[2] - 1}: "
                                         f"{type(e).__name__}: {e}")):  # fmt: skip
                    raise

    def indexed_set(self, with_sizes: bool = False) -> "HfSet":
        if not self.seekable:
            raise ValueError(f"data.access=indexed: {self.dataset.path} is parquet, read by row group; use data."
                             "access=stream (or auto), or save it with save_to_disk (arrow) to index it")  # fmt: skip
        return HfSet(self, with_sizes)


class HfSet:
    """An arrow-backed dataset for indexed access: a sample is a slice of a memory-mapped file. Image
    sizes (aspect buckets) are read from the image headers in one pass when asked for."""

    def __init__(self, source: HfSource, with_sizes: bool = False):
        self.source = source
        self.image_sizes = np.zeros((len(source.dataset), 2), dtype=np.int32)
        if with_sizes:
            for row in source.dataset.read(source.items):
                if row.image:
                    self.image_sizes[row.index] = image_size(row.image)

    def __len__(self) -> int:
        return len(self.source.dataset)

    def sample(self, i: int) -> dict:
        return self.source.sample(self.source.dataset.row(i))

    def close(self) -> None:
        self.source.dataset.close()
