"""Where a Hugging Face dataset on disk keeps a split's rows: which layout ``path`` is and its files.

A ``save_to_disk`` directory (``state.json``; a ``DatasetDict``'s ``dataset_dict.json`` picks the split's
directory), parquet or arrow files (a file, a directory searched recursively, or a glob; a split is
picked by the split name in the file paths, as the Hub names them: ``data/train-00000-of-00002.parquet``,
``test/0000.parquet``), or an image folder (images with ``metadata.jsonl``/``.csv``; ``datasets``'
``imagefolder`` builder turns it into arrow files in its cache once, the images stay where they are).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path

from nemo_controlnet.config import ConfigError
from nemo_controlnet.data.layout import IMAGE_EXTENSIONS, find_images

log = logging.getLogger(__name__)

# How datasets names splits in file paths (datasets.data_files), aliases to the canonical name.
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
                 "evaluation": "test"}  # fmt: skip


def file_kind(path: str | Path) -> str | None:
    suffix = Path(path).suffix.lower()
    return {".parquet": "parquet", ".arrow": "arrow"}.get(suffix)


def _split_of(relpath: str, split: str) -> str | None:
    """The split a file path names (``data/train-00000-of-00002.parquet``, ``test/0000.parquet``): a
    known name or its alias, or the split asked for (any name)."""
    for token in re.split(r"[^a-z0-9]+", relpath.lower()):
        if token in SPLIT_ALIASES or token == split.lower():
            return SPLIT_ALIASES.get(token, token)
    return None


def pick_split(files: list[Path], root: Path, split: str, what: str) -> list[Path]:
    """The files of ``split``: those whose path names it; all of them when no path names a split."""
    wanted = SPLIT_ALIASES.get(split.lower(), split.lower())
    named = {f: _split_of(f.relative_to(root).as_posix(), split) for f in files}
    if not any(named.values()):
        if wanted != "train":
            raise ConfigError(f"{what}.split={split!r}: the files under {root} name no splits (all are 'train')")
        return files
    mine = [f for f, s in named.items() if s == wanted]
    if not mine:
        found = sorted({s for s in named.values() if s})
        raise ConfigError(f"{what}.split={split!r}: no such split under {root} (splits: {found})")
    return mine


def find_files(path: str, split: str, what: str) -> tuple[str, list[Path], Path]:
    """(layout, the split's data files in order, the directory relative image paths start from)."""
    if any(c in path for c in "*?["):
        files = [Path(f) for f in sorted(glob.glob(path, recursive=True)) if file_kind(f)]
        if not files:
            raise FileNotFoundError(f"{what}.path={path!r}: matches no .parquet or .arrow file")
        return "files", files, Path(os.path.commonpath([str(f.parent) for f in files]))
    root = Path(path)
    if root.is_file():
        if not file_kind(root):
            raise ConfigError(f"{what}.path={path!r}: not a .parquet or .arrow file")
        return file_kind(root), [root], root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"{what}.path={path!r}: no such file or directory")
    if (root / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one directory per split
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise ConfigError(f"{what}.split={split!r}: no such split in {root} (splits: {splits})")
        return find_files(str(root / split), split, what)
    if (root / "state.json").is_file():  # Dataset.save_to_disk
        state = json.loads((root / "state.json").read_text())
        return "save_to_disk", [root / f["filename"] for f in state["_data_files"]], root
    for kind in ("parquet", "arrow"):
        found = sorted(p for p in root.rglob(f"*.{kind}") if not any(part.startswith(".") for part in
                                                                    p.relative_to(root).parts))  # fmt: skip
        if found:
            return kind, pick_split(found, root, split, what), root
    metadata = [p for p in root.rglob("metadata.*") if p.suffix in (".jsonl", ".csv")]
    if metadata or find_images(root):
        return "imagefolder", imagefolder_files(root, split, what), root
    raise FileNotFoundError(
        f"{what}.path={path!r}: neither a save_to_disk directory (state.json or dataset_dict.json), parquet or "
        f"arrow files, nor an image folder (images {'/'.join(IMAGE_EXTENSIONS)} with metadata.jsonl)"
    )


def imagefolder_files(root: Path, split: str, what: str) -> list[Path]:
    """``datasets``' imagefolder builder over ``root``, once (its cache holds the rows; image cells are
    paths to the files under ``root``): the arrow files of ``split``."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("an image folder as a Hugging Face dataset needs datasets: pip install "
                          "'nemo_controlnet[hf]'") from e  # fmt: skip
    try:
        # keep_in_memory=False: the rows must be in cache files, which every process can map
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split=split, keep_in_memory=False)
    except ValueError as e:
        if "split" in str(e).lower():
            raise ConfigError(f"{what}.split={split!r}: {e}") from e
        raise
    log.info("imagefolder %s (%s): %d rows in the datasets cache %s", root, split, len(ds),
             [c["filename"] for c in ds.cache_files])  # fmt: skip
    return [Path(c["filename"]) for c in ds.cache_files]
