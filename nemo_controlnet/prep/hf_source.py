"""A Hugging Face dataset on disk as a ``controlnet-prep`` source (``source=hf_dataset``).

The layouts and the reading are ``data/hf.py``'s (``save_to_disk``, parquet, arrow, image folder). A
unit is a range of ``shard_size`` consecutive rows of the split, so output shard N always holds rows
N*shard_size.. whatever task or re-run writes it; a unit reads only the row groups its rows lie in,
a few rows at a time. Keys are the rows' numbers in the split.
"""

from __future__ import annotations

import logging
from typing import Iterator

from nemo_controlnet.data.decode import BadSample
from nemo_controlnet.data.hf import READ_ERRORS, HfDataset, RowRange
from nemo_controlnet.prep.sources import RawSample

log = logging.getLogger(__name__)


class HfDatasetSource:
    """Rows of one split: the image column's encoded bytes, the conditioning column's (null: none;
    the hint is computed from the image), the caption column's text (null: no captions)."""

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str = "image",
        conditioning_image_column: str | None = "conditioning_image",
        caption_column: str | None = "text",
    ):
        self.args = (path, split, image_column, conditioning_image_column, caption_column, "source")
        self.caption_required = caption_column is not None
        self._dataset: HfDataset | None = None

    @property
    def dataset(self) -> HfDataset:
        """Opened on first use, not when Hydra builds the source: a wrong path, split or column then
        fails as the one-line error it is (``ConfigError``), not inside Hydra's instantiation error."""
        if self._dataset is None:
            self._dataset = HfDataset(*self.args)
        return self._dataset

    def __repr__(self) -> str:
        return f"HfDatasetSource({self.args[0]}, split {self.args[1]})"

    def units(self, shard_size: int) -> list[RowRange]:
        log.info("%s: %d rows, units of %d rows", self, len(self.dataset), shard_size)
        return self.dataset.ranges(shard_size)

    def read(self, unit: RowRange) -> Iterator[RawSample | BadSample]:
        rows = self.dataset.read(unit.pieces)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except READ_ERRORS as e:  # a damaged file: what was read is kept, the rest of the unit is skipped
                bad = BadSample("unreadable_file", f"{self.dataset.path} {unit}: {type(e).__name__}: {e}")
                bad.key = f"{unit.start:09d}"
                yield bad
                return
            yield RawSample(f"{row.index:09d}", row.where, row.image, row.conditioning, row.caption,
                            extra={"row": row.index, "split": self.dataset.split})  # fmt: skip
