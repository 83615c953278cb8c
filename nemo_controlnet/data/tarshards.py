"""Reading one tar shard into samples, with one error per damaged shard that names the member.

webdataset's ``tarfile_samples`` reports a truncated shard twice (once for the member being read,
once when the tar stream fails again) and names only the file; the incomplete last sample can
also surface as a second, misleading error. Here a shard yields its complete samples in order,
then raises at most one ``ShardReadError`` naming the shard and the member it failed in; the
sample that member belonged to is dropped with it (it would otherwise fail again as incomplete).
Grouping follows webdataset's convention (key = name up to the first dot of the basename,
lowercased extension; ``__*__`` entries skipped).
"""

from __future__ import annotations

import tarfile
from typing import Callable, Iterable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from nemo_controlnet.data.decode import BadSample


class ShardReadError(BadSample):
    """A shard that could not be read to its end: truncated, corrupt or unreadable."""

    def __init__(self, url: str, member: str | None, cause: Exception, inside: bool = True):
        # A tar that started well and then fails to parse was cut short (or damaged mid-way);
        # one that fails before its first member is not a tar, or cannot be opened at all.
        truncated = member is not None and isinstance(cause, (tarfile.TarError, EOFError))
        where = f"{'in' if inside else 'after'} member {member}" if member else "before its first member"
        super().__init__("truncated_shard" if truncated else "unreadable_shard",
                         f"{url} {where}: {type(cause).__name__}: {cause}")  # fmt: skip
        self.url, self.member = url, member


def read_shard(url: str) -> Iterator[dict]:
    """The samples of one shard (``{"__key__", "__url__", <ext>: bytes}``), then at most one
    ``ShardReadError``. A member that repeats within a key starts a new sample (two samples under
    one key), so members are never overwritten or paired across samples."""
    sample: dict | None = None
    member, inside = None, False
    try:
        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                member, inside = info.name, True
                if not info.isreg() or info.name.startswith("__") or "/__" in info.name:
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None:
                    continue
                ext = ext.lower()
                data = tar.extractfile(info).read()
                inside = False
                if sample is None or key != sample["__key__"] or ext in sample:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = data
    except Exception as e:  # tarfile, zlib, OSError...: the shard ends here, once
        raise ShardReadError(url, member, e, inside) from e
    if sample is not None:
        yield sample


def shard_samples(urls: Iterable[str], on_error: Callable[[ShardReadError], object]) -> Iterator[dict]:
    """The samples of several shards in turn; a damaged shard is reported to ``on_error`` once and
    the next one is read."""
    for url in urls:
        try:
            yield from read_shard(url)
        except ShardReadError as e:
            on_error(e)
