"""An image folder as training data, with hints precomputed beside it (``controlnet-prep
mode=precompute``) or computed on the fly, after augmentation, where one is missing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from nemo_controlnet.data.layout import find_images, precomputed_hint_path
from nemo_controlnet.data.webdataset import assigned

log = logging.getLogger(__name__)


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


class FolderSource:
    """Samples shaped like tar members (``jpg``, ``png``, ``txt``), so the shard decoder serves both."""

    def __init__(self, root: str, hints_dir: str | None = None, suffix: str = "canny", on_the_fly: bool = False):
        self.root = Path(root)
        self.hints_dir = Path(hints_dir) if hints_dir else self.root / suffix
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.folder.root: no directory {self.root}")
        paths = find_images(self.root, (self.hints_dir.name,))
        self.items = [(p, precomputed_hint_path(self.hints_dir, p.relative_to(self.root), suffix)) for p in paths]
        if not self.items:
            raise FileNotFoundError(f"data.folder.root: no images under {self.root}")
        missing = [h for _, h in self.items if not h.is_file()]
        if missing and not on_the_fly:
            raise FileNotFoundError(
                f"data.folder: {len(missing)} of {len(self.items)} precomputed hints missing, first: {missing[0]} "
                "(run controlnet-prep mode=precompute, or set data.hint.on_the_fly=true)"
            )
        log.info("folder %s: %d images, %d precomputed hints in %s", self.root, len(self.items),
                 len(self.items) - len(missing), self.hints_dir)  # fmt: skip

    def sample(self, image: Path, hint: Path) -> dict:
        sample = {
            "__key__": str(image.relative_to(self.root).with_suffix("")),
            "__url__": str(image),
            "jpg": _read(image),
            "txt": _read(image.with_suffix(".txt")),
        }
        if hint.is_file():
            sample["png"] = _read(hint)
        return sample

    def samples(self, rng_seed: str, epoch_seed: str, resampled: bool, handler) -> Iterator[dict]:
        for image, hint in assigned(self.items, rng_seed, epoch_seed, resampled):
            yield self.sample(image, hint)
