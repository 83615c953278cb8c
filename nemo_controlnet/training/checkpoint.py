"""Checkpoints that survive kill -9: atomic writes, checksums, safe loads, and the newest good one.

What can be wrong with a checkpoint file, and what resume does about it:
- torn (a kill or a full disk mid-write left it truncated or empty; only possible for files from
  before atomic writes, or copied in): skipped with a warning, the previous one is used;
- rotten (the bytes changed after writing: bit rot, a bad copy; its recorded sha256 no longer
  matches): skipped with an error naming the file, the previous one is used;
- unsafe (it holds objects that safe loading refuses, such as a planted ``os.system``): a torn
  write never looks like that, the file was altered, so resume refuses to start, unless
  ``checkpoint.skip_unsafe=true`` says to skip it.
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nemo_controlnet.io import (
    ChecksumMismatch,
    HashingWriter,
    UserError,
    atomic_path,
    checksum_path,
    ensure_space,
    human_bytes,
    verify_checksum,
    write_checksum,
)

log = logging.getLogger(__name__)

CKPT_PATTERN = re.compile(r"^step=(\d+)\.ckpt$")
OVERHEAD = 1.02  # the archive's headers and pickled structure on top of the tensors' bytes


class UnsafeCheckpoint(UserError, RuntimeError):
    """A checkpoint that safe loading refuses: altered, not torn."""


def checkpoint_name(step: int) -> str:
    return f"step={step:07d}.ckpt"


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) checkpoint dict: what torch.save will write."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _is_unsafe(error: BaseException) -> bool:
    # torch's weights-only unpickler refuses a global it does not allow with this error.
    return isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)


def safe_load(path: str | Path, **kwargs) -> Any:
    """``torch.load(weights_only=True)``; a file it refuses raises ``UnsafeCheckpoint`` naming it."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        if _is_unsafe(e):
            # The line that names the refused global ("...unsupported GLOBAL posix.system..."), not
            # torch's boilerplate about the weights_only default.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "global" in ln.lower()), lines[0] if lines else "")
            raise UnsafeCheckpoint(f"{path}: refused by safe loading ({detail})") from e
        raise


_verified: dict[str, tuple[int, int]] = {}  # path -> (size, mtime) checked in this process


def check_recorded_checksum(path: Path) -> None:
    """``ChecksumMismatch`` when ``path`` differs from its recorded sha256; a warning when none is
    recorded. A file checked once (same size and mtime) is not read again for the check."""
    stat = Path(path).stat()
    if _verified.get(str(path)) == (stat.st_size, stat.st_mtime_ns):
        return
    if not verify_checksum(path):
        log.warning("%s has no recorded checksum: its content cannot be verified", path)
    _verified[str(path)] = (stat.st_size, stat.st_mtime_ns)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temp file beside the target and renames it, with its sha256 in ``<name>.sha256``;
    loads with ``weights_only=True`` after checking the checksum.

    Lightning's own save goes through an fsspec transaction whose temp file lives in the system
    temp directory; moving it onto another filesystem is a copy, and a kill during that copy
    leaves a partial checkpoint under the final name. Free space is checked before writing, and
    a write that runs out of it says so (``io.NoSpaceError``).
    """

    def __init__(self):
        super().__init__()
        self.last_size = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        needed = int(tensor_bytes(checkpoint) * OVERHEAD)
        ensure_space(path, needed)
        checksum_path(path).unlink(missing_ok=True)
        with atomic_path(path, expected_bytes=needed) as tmp:
            with open(tmp, "wb") as f:
                writer = HashingWriter(f)
                torch.save(checkpoint, writer)
        write_checksum(path, writer.digest.hexdigest())
        self.last_size = path.stat().st_size
        log.info("checkpoint written: %s (%s, sha256 %s)", path, human_bytes(self.last_size),
                 writer.digest.hexdigest()[:16])  # fmt: skip
        free = shutil.disk_usage(path.parent).free
        if free < self.last_size * OVERHEAD:
            log.warning("the next checkpoint (about %s) will not fit: %s free in %s", human_bytes(self.last_size),
                        human_bytes(free), path.parent)  # fmt: skip

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        log.info("loading checkpoint %s", path)
        check_recorded_checksum(Path(path))
        return safe_load(path, map_location=map_location or "cpu")


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first. Temp files never match."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return sorted(found)


def remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def latest_checkpoint(directory: str | Path, skip_unsafe: bool = False) -> Path | None:
    """The newest checkpoint that is whole, unchanged since it was written, and safe to load.

    Torn and rotten files are skipped for the previous one; an unsafe one stops the run with
    ``UnsafeCheckpoint`` unless ``skip_unsafe``."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            # mmap reads the archive's index and pickled structure without the tensors: a
            # truncated file or a refused global fails here, cheaply.
            safe_load(path, map_location="cpu", mmap=True)
            check_recorded_checksum(path)
            return path
        except UnsafeCheckpoint as e:
            if not skip_unsafe:
                raise UnsafeCheckpoint(
                    f"{e}. A torn write never looks like this: the file was altered after it was written. "
                    "Remove it, or set checkpoint.skip_unsafe=true to resume from an older checkpoint"
                ) from e
            log.error("%s: skipped (checkpoint.skip_unsafe=true)", e)
        except ChecksumMismatch as e:
            log.error("%s: resuming from an older checkpoint instead", e)
        except Exception as e:  # torn: a damaged file must not block resuming from an older one
            log.warning("skipping unreadable checkpoint %s: %s", path, e)
    return None
