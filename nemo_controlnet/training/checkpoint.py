"""Checkpoints that survive kill -9: atomic writes, safe loads, and the newest complete one."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nemo_controlnet.io import atomic_path

log = logging.getLogger(__name__)

CKPT_PATTERN = re.compile(r"^step=(\d+)\.ckpt$")


def checkpoint_name(step: int) -> str:
    return f"step={step:07d}.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temp file beside the target and renames it; loads with ``weights_only=True``.

    Lightning's own save goes through an fsspec transaction whose temp file lives in the system
    temp directory; moving it onto another filesystem is a copy, and a kill during that copy
    leaves a partial checkpoint under the final name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
        log.info("checkpoint written: %s (%.1f MB)", path, Path(path).stat().st_size / 1e6)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        log.info("loading checkpoint %s", path)
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first. Temp files never match."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint that opens as a complete torch archive."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            # mmap reads the archive's index without loading tensors: a truncated file fails here.
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return path
        except Exception as e:  # a damaged file must not block resuming from an older one
            log.warning("skipping unreadable checkpoint %s: %s", path, e)
    return None
