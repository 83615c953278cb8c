"""Writes that a crash cannot leave half-done: temp file in the same directory, fsync, rename.

Also what every writer shares: outputs get the mode the umask gives new files (temp files and
some writers, safetensors among them, create 0600, which a rename would keep); a write that runs
out of disk says so with the path and the space; checksums in ``sha256sum`` format beside a file;
temp files of writers that died are swept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

class UserError(Exception):
    """About what the user gave or has (a file, a directory, the disk), not a bug: the commands print
    it as one line, without a traceback."""


TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")
CHECKSUM_SUFFIX = ".sha256"


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything in it) the mode a new file or directory
    gets under the umask: 0644/0755 for the usual 022, group-writable for 002."""
    mask = current_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class NoSpaceError(OSError):
    """A write that does not fit on its filesystem, with what it needed and what was free."""

    def __init__(self, what: Path, directory: Path, free: int, needed: int | None = None, written: int | None = None):
        parts = [f"no space left on device writing {what}: {human_bytes(free)} free in {directory}"]
        if needed:
            parts.append(f"it needs about {human_bytes(needed)}")
        if written:
            parts.append(f"{human_bytes(written)} of it had been written")
        parts[-1] += " (free space there, then run again: finished files are kept)"
        super().__init__(errno.ENOSPC, "; ".join(parts))
        self.path, self.directory, self.free, self.needed = what, directory, free, needed


def ensure_space(path: str | os.PathLike, needed: int, what: str | None = None) -> None:
    """Fail before writing ``needed`` bytes at ``path`` when its filesystem has less free."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise NoSpaceError(Path(what or path), directory, free, needed)


def _out_of_space(error: BaseException, tmp: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC anywhere in the exception chain, or a writer
    that reports it in its own words (torch.save: ``unexpected pos``) while the disk is full."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(tmp.parent).free < 1 << 20
    except OSError:
        return False


@contextmanager
def atomic_path(path: str | os.PathLike, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yields a temp path beside ``path``; on success it replaces ``path`` in one rename.

    The temp file lives in the same directory so the rename is atomic (a temp file in /tmp would
    be copied across filesystems, and a kill during that copy leaves a partial file under the
    final name). A temp name never matches the final name's pattern, so readers never list it.
    The result gets the umask's mode. A write that runs out of disk raises ``NoSpaceError`` naming
    the path, the free space and ``expected_bytes`` when given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as e:
            if _out_of_space(e, tmp):
                written = tmp.stat().st_size if tmp.exists() else None
                tmp.unlink(missing_ok=True)
                raise NoSpaceError(path, path.parent, shutil.disk_usage(path.parent).free, expected_bytes,
                                   written) from e  # fmt: skip
            raise
        apply_umask(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike, checksums: bool = False) -> Iterator[Path]:
    """Yields a temp directory beside ``path``; on success it takes the place of ``path``.

    An existing ``path`` is moved aside first and removed only after the new one is in place, so
    at every moment either the old or the new complete directory exists under a known name.
    Everything in it gets the umask's modes; ``checksums`` adds a ``SHA256SUMS`` of its files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            yield tmp
        except Exception as e:
            if _out_of_space(e, tmp):
                raise NoSpaceError(path, path.parent, shutil.disk_usage(path.parent).free) from e
            raise
        if checksums:
            write_dir_checksums(tmp)
        apply_umask(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_stale_temps(directory: str | os.PathLike, only_dead: bool = True) -> list[Path]:
    """Remove the temp files and directories that writers killed mid-write left in ``directory``
    (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``). ``only_dead``: keep those of a live process on
    this host (a caller holding the directory's lock passes False: no other writer can be there)."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = TEMP_PATTERN.match(p.name)
        if not m or int(m["pid"]) == os.getpid() or (only_dead and pid_alive(int(m["pid"]))):
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
        log.warning("removed %s (%s) left by a writer that was killed mid-write", p, human_bytes(size))
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}{CHECKSUM_SUFFIX}")


class HashingWriter:
    """A file wrapper that hashes what goes through it: the checksum of a file as it is written
    (torch.save writes its archive front to back), without reading it back."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_checksum(path: str | os.PathLike, digest: str | None = None) -> str:
    """``<path>.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks it), written atomically.
    Writers remove the old one before replacing ``path`` and call this after: a kill in between
    leaves a file without a checksum (accepted with a warning), never a checksum of another file."""
    path = Path(path)
    digest = digest or sha256_file(path)
    with atomic_path(checksum_path(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n")
    return digest


SUMS = "SHA256SUMS"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def write_dir_checksums(directory: str | os.PathLike) -> None:
    """``<directory>/SHA256SUMS`` (``sha256sum -c SHA256SUMS`` checks it) over its weight files: the
    bytes that must not rot. The model card and metadata beside them are rewritten by design
    (controlnet-eval records its results there) and are not listed."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}" for p in files]
    (directory / SUMS).write_text("\n".join(lines) + "\n")


def verify_dir_checksums(directory: str | os.PathLike) -> bool:
    """Check a directory against its ``SHA256SUMS``: False when it has none, True when every file
    matches, ``ChecksumMismatch`` (or FileNotFoundError) naming the first that does not."""
    directory = Path(directory)
    sums = directory / SUMS
    if not sums.is_file():
        return False
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            path = directory / name.strip()
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {sums} but missing")
            verify_checksum(path, digest)
    return True


def recorded_checksum(path: str | os.PathLike) -> str | None:
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return None
    return sidecar.read_text().split()[0]


class ChecksumMismatch(UserError, ValueError):
    def __init__(self, path: Path, expected: str, actual: str):
        super().__init__(f"{path}: checksum mismatch (recorded sha256 {expected[:16]}..., file has {actual[:16]}...): "
                         "the file changed after it was written (bit rot, a bad copy, or an edit; if it was "
                         f"changed on purpose, delete {path.name}.sha256 or the directory's {SUMS})")  # fmt: skip
        self.path = path


def verify_checksum(path: str | os.PathLike, expected: str | None = None) -> bool:
    """Check ``path`` against ``expected`` or its recorded ``.sha256``; False when none is recorded,
    True when it matches, ``ChecksumMismatch`` when it does not."""
    path = Path(path)
    expected = expected or recorded_checksum(path)
    if expected is None:
        return False
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatch(path, expected, actual)
    return True


class DirectoryBusy(UserError, RuntimeError):
    pass


class DirectoryLock:
    """An exclusive lock on a directory (``flock`` on ``<dir>/.lock``) that the kernel releases when
    the holder dies, however it dies: a killed run never blocks the next one. The file records the
    holder's PID, host and start time for the message a second run gets."""

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike, what: str = "directory"):
        self.path = Path(directory) / self.NAME
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "DirectoryLock":
        import fcntl
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryBusy(
                f"{self.path.parent} is in use by another {self.what} ({holder}); wait for it to finish, stop it, "
                f"or use another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     .encode())  # fmt: skip
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
