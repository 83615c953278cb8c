"""An image folder as training data, with hints precomputed beside it (``controlnet-prep
mode=precompute``) or computed on the fly, after augmentation, where one is missing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

from nemo_controlnet.data.layout import MANIFEST, find_images, precomputed_hint_path
from nemo_controlnet.data.webdataset import assigned

log = logging.getLogger(__name__)


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def read_hint_manifest(hints_dir: Path) -> dict | None:
    """``<hints_dir>/manifest.json`` as ``mode=precompute`` writes it (``hints``: image relative to the
    root -> hint relative to ``hints_dir``; ``skipped_files``: ``[image, reason, detail]``), or None
    where there is none, or only an older one without the mapping (then the naming rule applies)."""
    path = hints_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"data.folder: {path} is not a precompute manifest ({e}); delete it or re-run "
                         "controlnet-prep mode=precompute") from e  # fmt: skip
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("hints"), dict) else None


class FolderSource:
    """Samples shaped like tar members (``jpg``, ``png``, ``txt``), so the shard decoder serves both.

    With a precompute manifest, each image's hint is the file it maps the image to, and the images
    it lists as skipped (unreadable) are left out (``left_out`` counts them); without one, the hint
    of ``<root>/<subdirs>/<stem>.<ext>`` is ``<hints_dir>/<subdirs>/<stem>_<suffix>.png``."""

    def __init__(self, root: str, hints_dir: str | None = None, suffix: str = "canny", on_the_fly: bool = False):
        self.root = Path(root)
        self.hints_dir = Path(hints_dir) if hints_dir else self.root / suffix
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.folder.root: no directory {self.root}")
        manifest = read_hint_manifest(self.hints_dir) or {}
        mapped = manifest.get("hints", {})
        skipped = {image: reason for image, reason, *_ in manifest.get("skipped_files", [])}
        self.items, left_out = [], []
        for path in find_images(self.root, (self.hints_dir.name,)):
            relpath = path.relative_to(self.root).as_posix()
            if relpath in skipped:
                left_out.append(relpath)
            elif relpath in mapped:
                self.items.append((path, self.hints_dir / mapped[relpath]))
            else:
                self.items.append((path, precomputed_hint_path(self.hints_dir, relpath, suffix)))
        self.left_out = len(left_out)
        if left_out:  # once, here: not a warning per sample per epoch
            log.warning("folder %s: %d images left out, skipped by controlnet-prep mode=precompute (first: %s: %s)",
                        self.root, len(left_out), left_out[0], skipped[left_out[0]])  # fmt: skip
        if not self.items:
            raise FileNotFoundError(f"data.folder.root: no images under {self.root}")
        missing = [h for _, h in self.items if not h.is_file()]
        if missing and not on_the_fly:
            raise FileNotFoundError(
                f"data.folder: {len(missing)} of {len(self.items)} precomputed hints missing, first: {missing[0]} "
                "(run controlnet-prep mode=precompute, or set data.hint.on_the_fly=true)"
            )
        log.info("folder %s: %d images, %d precomputed hints in %s%s", self.root, len(self.items),
                 len(self.items) - len(missing), self.hints_dir, " (by its manifest)" if mapped else "")  # fmt: skip

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
