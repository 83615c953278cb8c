"""What a prep job tells whoever drives it (the command's progress bar, a web UI), and how it is told
to stop: one ``JobControl`` per run, handed to the mode that does the work."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm


@dataclass(frozen=True)
class Progress:
    stage: str  # "shards", "encode", "precompute"
    units_done: int  # shards (images for precompute) finished in this run
    units_total: int  # to do in this run (complete ones from earlier runs are not counted)
    samples_done: int  # samples seen: written + skipped
    samples_total: int | None  # None where the units' sizes are not known ahead (existing shards)
    written: int
    skipped: int
    seconds: float
    captioned: int = 0  # captions generated so far (caption.model set), ahead of the shards being written
    caption_seconds: float = 0.0  # time spent captioning

    @property
    def rate(self) -> float:
        """Samples per second so far."""
        return self.samples_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def caption_rate(self) -> float:
        """Captions per second of captioning."""
        return self.captioned / self.caption_seconds if self.caption_seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, from the rate so far: by samples when their total is known, else by units."""
        if self.samples_total is not None and self.rate > 0:
            return (self.samples_total - self.samples_done) / self.rate
        if self.units_done:
            return (self.units_total - self.units_done) * self.seconds / self.units_done
        return None


ProgressCallback = Callable[[Progress], None]


class JobControl:
    """Progress out, cancel in. ``cancel()`` may be called from any thread (a UI's); the running mode
    checks ``cancelled()`` between samples or units and stops, leaving only complete outputs."""

    def __init__(self, progress: ProgressCallback | None = None):
        self._progress = progress
        self._cancel = threading.Event()
        self._start = time.monotonic()
        self._skipped: list[tuple[str, str]] = []
        self._skipped_lock = threading.Lock()  # the job's thread appends while a UI's thread reads

    @property
    def skipped_files(self) -> list[tuple[str, str]]:
        """``(source, reason)`` of the samples left out so far (earlier runs' complete outputs included),
        a snapshot safe to take from any thread; it grows as shards (images, for precompute) finish."""
        with self._skipped_lock:
            return list(self._skipped)

    def add_skipped(self, entries) -> None:
        with self._skipped_lock:
            self._skipped.extend((str(source), str(reason)) for source, reason, *_ in entries)

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def start(self) -> None:
        self._start = time.monotonic()

    def report(self, stage: str, units_done: int, units_total: int, samples_done: int,
               samples_total: int | None, written: int, skipped: int, captioned: int = 0,
               caption_seconds: float = 0.0) -> None:  # fmt: skip
        if self._progress is not None:
            self._progress(Progress(stage, units_done, units_total, samples_done, samples_total, written, skipped,
                                    time.monotonic() - self._start, captioned, caption_seconds))  # fmt: skip


class ProgressBar:
    """The command line's progress callback: a tqdm bar over samples (over units where the number of
    samples is not known ahead)."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __call__(self, p: Progress) -> None:
        by_samples = p.samples_total is not None
        if self.bar is None:
            total = p.samples_total if by_samples else p.units_total
            self.bar = tqdm(total=total, desc=self.desc, unit="sample" if by_samples else "shard", smoothing=0.1)
        self.bar.n = p.samples_done if by_samples else p.units_done
        postfix = {"written": p.written, "skipped": p.skipped, "rate": f"{p.rate:.1f}/s"}
        if p.captioned:
            postfix["captions"] = f"{p.captioned} ({p.caption_rate:.1f}/s)"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()
        if p.units_done == p.units_total:  # before the job logs its summary
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
