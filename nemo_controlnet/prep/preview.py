"""What prep would make of a source, before it runs: list its samples, show one image with its hint as
``controlnet-prep`` computes it (the same ``SampleProcessor``, so the same pixels), and scan the source
for files prep would skip. A UI moves a threshold slider and calls ``pair`` again: the source is
listed once and the sample's bytes are kept, so only the hint is recomputed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.config import ConfigError, control_size_problem, hint_problems
from nemo_controlnet.data.decode import BadSample, decode_caption, load_hint, load_image
from nemo_controlnet.prep.sources import RawSample, RecordSource
from nemo_controlnet.prep.writer import SampleProcessor

LIST_LIMIT = 1000  # samples listed from a source without records (existing shards): their first units


@dataclass(frozen=True)
class PreviewPair:
    key: str  # the sample's key in the shards prep writes
    source: str  # its file (or shard:key)
    image: np.ndarray  # uint8 HxWx3 RGB, at the size prep writes
    hint: np.ndarray  # uint8 HxWx3 RGB (a one-channel hint repeated)
    caption: str
    hint_params: dict  # what the detector used, e.g. {"low_threshold": 100, ...}


@dataclass
class ScanResult:
    readable: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)


@dataclass(frozen=True)
class _Entry:
    """One listed sample: what ``source.read`` takes to read it again."""

    key: str
    source: str
    unit: Any  # [record] for a record source; the input shard for existing shards


def _container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def readable(raw: RawSample, caption_required: bool) -> None:
    """Raise the ``BadSample`` prep would skip ``raw`` for: the image and conditioning decoded, the
    caption read (the hint is not computed: a scan checks the files, not the detector)."""
    load_image(raw.image, "image")
    if raw.conditioning is not None:
        load_hint(raw.conditioning, "conditioning")
    decode_caption(raw.caption, caption_required)


class SourcePreview:
    """A prep ``source`` config node (``_target_`` and its arguments), instantiated once.

    ``keys()``/``len()`` list its samples (a record source all of them; existing shards the first
    ``list_limit``); ``pair(i, hint_cfg, control_size, seed)`` is sample ``i`` as prep writes it;
    ``scan(limit)`` counts the readable samples and lists the skipped ones with their reason."""

    def __init__(self, source_cfg, list_limit: int = LIST_LIMIT):
        self.source = instantiate(source_cfg)
        self.caption_required = getattr(self.source, "caption_required", True)
        self.list_limit = list_limit
        self._entries: list[_Entry] | None = None
        self._last: tuple[int, RawSample] | None = None  # the sample a slider is moving over
        self._scans: dict[int | None, ScanResult] = {}  # by limit: a preview re-run does not decode it all again
        self._lock = threading.Lock()  # a UI may call from several threads

    # ---- listing ----------------------------------------------------------------------------------

    def _list(self) -> list[_Entry]:
        with self._lock:
            if self._entries is None:
                if isinstance(self.source, RecordSource):
                    self._entries = [_Entry(r.key, r.image or r.key, [r]) for r in self.source.records()]
                else:  # a shard's samples are found again by key in their shard
                    self._entries = [_Entry(raw.key, source, unit) for unit, source, raw in self._raw(self.list_limit)
                                     if isinstance(raw, RawSample)]  # fmt: skip
            return self._entries

    def keys(self) -> list[str]:
        return [e.key for e in self._list()]

    def sources(self) -> list[str]:
        return [e.source for e in self._list()]

    def __len__(self) -> int:
        return len(self._list())

    def _raw(self, limit: int | None) -> Iterator[tuple[Any, str, RawSample | BadSample]]:
        """(unit, source, raw sample) in prep's order, at most ``limit``. A record source reads its cached
        records (the folder is listed once); existing shards are read shard by shard, only as far as
        the limit needs."""
        if isinstance(self.source, RecordSource):
            for entry in self._list()[:limit]:
                for raw in self.source.read(entry.unit):
                    yield entry.unit, entry.source, raw
            return
        n = 0
        for unit in self.source.units(self.list_limit):
            for raw in self.source.read(unit):
                if limit is not None and n >= limit:
                    return
                n += 1
                yield unit, (raw.source if isinstance(raw, RawSample) else f"{unit}:{getattr(raw, 'key', '-')}"), raw

    # ---- one sample -------------------------------------------------------------------------------

    def raw(self, index: int) -> RawSample:
        """Sample ``index``'s bytes (kept for the next call with the same index); the ``BadSample`` prep
        skips it for when the source cannot read it."""
        entries = self._list()
        if not 0 <= index < len(entries):
            raise IndexError(f"sample {index}: the source has {len(entries)} (0..{len(entries) - 1})")
        with self._lock:
            if self._last is not None and self._last[0] == index:
                return self._last[1]
        entry = entries[index]
        for raw in self.source.read(entry.unit):
            if isinstance(raw, BadSample) and getattr(raw, "key", None) == entry.key:
                raise raw
            if isinstance(raw, RawSample) and raw.key == entry.key:
                with self._lock:
                    self._last = (index, raw)
                return raw
        raise BadSample("missing_image", f"{entry.source}: no longer in the source")

    def pair(self, index: int, hint_cfg, control_size: int | None = None, seed: int = 0) -> PreviewPair:
        """Sample ``index`` as ``controlnet-prep`` writes it with this hint config (``_target_`` and its
        arguments), ``resolution=control_size`` and ``seed``. Raises ``ConfigError`` naming the bad
        field, or the ``BadSample`` (with its ``reason``) prep would skip the sample for."""
        hint_cfg = _container(hint_cfg)
        problems = {f"hint.{k}": v for k, v in hint_problems(hint_cfg).items()}
        if control_size_problem(control_size):
            problems["resolution"] = control_size_problem(control_size)
        if problems:
            raise ConfigError("; ".join(f"{k}: {v}" for k, v in problems.items()))
        processor = SampleProcessor(instantiate(hint_cfg), resolution=control_size, seed=seed,
                                    caption_required=self.caption_required)  # fmt: skip
        p = processor.process(self.raw(index))
        return PreviewPair(p.key, p.source, np.asarray(p.image.convert("RGB")), np.asarray(p.hint.convert("RGB")),
                           p.caption, p.meta["hint"])  # fmt: skip

    # ---- the whole source -------------------------------------------------------------------------

    def scan(self, limit: int | None = None, progress: Callable[[int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> ScanResult:  # fmt: skip
        """Read every sample (the first ``limit``) as prep would and decode it: how many are readable,
        and ``(source, reason)`` of each one prep would skip. ``progress(n)`` after each sample;
        ``should_stop()`` ends the scan early (the result covers what was read). A finished scan is
        kept, like the listing: the same call again returns it (a new ``SourcePreview`` reads afresh)."""
        with self._lock:
            if limit in self._scans:
                done = self._scans[limit]
                return ScanResult(done.readable, list(done.skipped))
        result = ScanResult()
        for n, (_, source, raw) in enumerate(self._raw(limit), start=1):
            try:
                if isinstance(raw, BadSample):
                    raise raw
                readable(raw, self.caption_required)
                result.readable += 1
            except BadSample as e:
                result.skipped.append((source, e.reason))
            if progress is not None:
                progress(n)
            if should_stop is not None and should_stop():
                return result
        with self._lock:
            self._scans[limit] = ScanResult(result.readable, list(result.skipped))
        return result
