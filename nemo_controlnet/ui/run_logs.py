"""What a run logged, read while it is being written: the loss by step (TensorBoard event files or a
CSV logger's metrics.csv) and the hint-following metrics of each validation (samples/metrics.jsonl)."""

from __future__ import annotations

import csv
import json
import logging
import threading
from pathlib import Path
from typing import Any

from nemo_controlnet.ui.overrides import as_int

log = logging.getLogger(__name__)


class ScalarReader:
    """Scalars by step from a run's logs; event files are read on incrementally (one accumulator each)."""

    def __init__(self):
        self._events: dict[Path, Any] = {}
        self._events_lock = threading.Lock()

    def loss_curve(self, run_dir: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
        """(step, value) of ``tag`` as logged (TensorBoard event files and CSV logger files under
        run_dir/logs), by step. Each launch's file replaces what earlier ones logged from its first step
        on (a resumed run re-logs the steps after its checkpoint). A file being written is read up to
        its last complete record; values are as logged (a diverged run's nan kept)."""
        logs = run_dir / "logs"
        if not logs.is_dir():
            return []
        sources: list[tuple[float, str, dict[int, float]]] = []
        for path in logs.rglob("events.out.tfevents.*"):
            parts = path.name.split(".")
            created = float(parts[3]) if len(parts) > 3 and parts[3].isdigit() else path.stat().st_mtime
            sources.append((created, path.name, self._event_scalars(path, tag)))
        for path in logs.rglob("metrics.csv"):
            sources.append((path.parent.stat().st_mtime, path.name, _csv_scalars(path, tag)))
        merged: dict[int, float] = {}
        for _, _, points in sorted(sources, key=lambda s: (s[0], s[1])):
            if points:
                first = min(points)
                merged = {s: v for s, v in merged.items() if s < first}
                merged.update(points)
        return sorted(merged.items())

    def _event_scalars(self, path: Path, tag: str) -> dict[int, float]:
        from tensorboard.backend.event_processing import event_accumulator as ea

        with self._events_lock:
            accumulator = self._events.get(path)
            if accumulator is None:
                guidance = {ea.SCALARS: 0, ea.IMAGES: 1, ea.TENSORS: 1, ea.HISTOGRAMS: 1, ea.AUDIO: 1}
                accumulator = ea.EventAccumulator(str(path), size_guidance=guidance, purge_orphaned_data=False)
                self._events[path] = accumulator
            try:
                accumulator.Reload()  # from where the last read stopped
                if tag not in accumulator.Tags().get("scalars", []):
                    return {}
                return {int(e.step): float(e.value) for e in accumulator.Scalars(tag)}
            except Exception as error:  # noqa: BLE001 - a damaged or vanished file: no points from it
                log.warning("%s: cannot read %s (%s)", path, tag, error)
                self._events.pop(path, None)
                return {}


def read_metrics(run_dir: Path) -> list[dict]:
    """The hint-following metrics of each validation (samples/metrics.jsonl), by step; a line that is
    not whole JSON (written right now) is left out."""
    path = run_dir / "samples" / "metrics.jsonl"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    rows: dict[Any, dict] = {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows[row.get("step")] = row  # a validation repeated after a resume: the later one
    return sorted(rows.values(), key=lambda r: r.get("step") if isinstance(r.get("step"), int) else -1)

def _csv_scalars(path: Path, tag: str) -> dict[int, float]:
    """``tag`` by step from a CSV logger's metrics.csv; a last row without its newline is being written
    (``6,1.`` may be ``6,1.0734``) and is left out."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    lines = text.splitlines()
    if not text.endswith("\n"):
        lines = lines[:-1]
    points: dict[int, float] = {}
    try:
        for row in csv.DictReader(lines):
            step, value = as_int(row.get("step")), _as_float_or_nan(row.get(tag))
            if step is not None and value is not None:
                points[step] = value
    except csv.Error:
        pass
    return points


def _as_float_or_nan(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return float(text)  # "nan" and "inf" too: a diverged run shows as one
    except ValueError:
        return None
