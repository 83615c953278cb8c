"""Datasets -> New dataset: the form's values -> the overrides of ``controlnet-prep`` (composed from
the same conf/prep.yaml), the live preview of a sample pair, and the prep job run in a background
thread (``PrepJob``: progress, cancel, resume). What the UI writes is what the command writes; the
exact config and command line are saved beside the output, so the command line reproduces it."""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.config import (
    canny_problems,
    control_size_problem,
    dataset_name_problem,
    output_dir_problem,
    readable_path_problem,
)
from nemo_controlnet.io import atomic_path, write_json_atomic
from nemo_controlnet.prep.progress import Progress
from nemo_controlnet.ui.overrides import compose
from nemo_controlnet.ui.paths import Roots

log = logging.getLogger(__name__)

LAYOUTS = ("folder", "metadata_jsonl", "prompt_json", "shards", "hf_dataset")  # conf/source/<layout>.yaml
CONTROL_TYPES = ("canny", "given")  # conf/hint/<type>.yaml
HINT_LAYOUTS = ("shards", "folder")  # tar shards + manifest | <root>/canny/<stem>_canny.png (mode=precompute)
DATASET_RECORD = "dataset.json"  # beside a dataset the UI made: its prep and training overrides
PREP_CONFIG, PREP_COMMAND, TRAIN_COMMAND = "prep_config.yaml", "prep_command.txt", "train_command.txt"


@dataclass
class DatasetForm:
    layout: str = "folder"
    source: str = ""
    name: str = ""
    out_root: str = ""
    caption: str = ""  # folder layout: one caption for all ("": <stem>.txt beside each image)
    use_controlnet: bool = True
    control_type: str = "canny"
    on_the_fly: bool = False  # training recomputes the hint after augmentation
    precompute: bool = True
    hint_layout: str = "shards"
    low_threshold: int = 100
    high_threshold: int = 200
    blur: int = 0
    control_size: int | None = 512
    shard_size: int = 1000
    workers: int = 2

    def hint_config(self) -> dict:
        if self.control_type == "given":
            return {"_target_": "nemo_controlnet.data.hints.Given"}
        return {"_target_": "nemo_controlnet.data.hints.Canny", "low_threshold": int(self.low_threshold),
                "high_threshold": int(self.high_threshold), "blur": int(self.blur)}  # fmt: skip


def _int(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def control_problems(form: DatasetForm) -> dict[str, str]:
    """The ControlNet section's checks, the same the command runs (config.py)."""
    problems: dict[str, str] = {}
    if form.control_type not in CONTROL_TYPES:
        problems["control_type"] = f"control type {form.control_type!r}: expected one of {list(CONTROL_TYPES)}"
    if form.control_type == "canny":
        problems.update(canny_problems(_int(form.low_threshold), _int(form.high_threshold), _int(form.blur)))
    size = None if form.control_size in (None, "", 0) else _int(form.control_size)
    if form.control_size not in (None, "", 0) and (size is None or control_size_problem(size)):
        problems["control_size"] = control_size_problem(size) or f"control_size={form.control_size!r}: an integer"
    return problems


def form_problems(form: DatasetForm, roots: Roots, for_job: bool = True) -> dict[str, str]:
    """Field -> message for every bad value; empty when a job may start."""
    problems = control_problems(form)
    if _int(form.shard_size) is None or _int(form.shard_size) < 1:
        problems["shard_size"] = f"samples per shard {form.shard_size!r}: a positive integer"
    if form.layout not in LAYOUTS:
        problems["layout"] = f"source layout {form.layout!r}: expected one of {list(LAYOUTS)}"
    source_problem = roots.problem(form.source, "source path")
    if source_problem is None:
        kind = "any" if form.layout in ("shards", "hf_dataset") else "dir"  # a file, a directory or a manifest
        source_problem = readable_path_problem(str(roots.resolve(form.source)), kind)
    if source_problem:
        problems["source"] = source_problem
    if not for_job:
        return problems
    if not form.use_controlnet:
        problems["use_controlnet"] = "turn on 'Use ControlNet (Canny)' to make hints for this dataset"
    if form.hint_layout not in HINT_LAYOUTS:
        problems["hint_layout"] = f"hint layout {form.hint_layout!r}: expected one of {list(HINT_LAYOUTS)}"
    elif form.hint_layout == "folder":
        if form.layout != "folder" or form.control_type != "canny":
            problems["hint_layout"] = "hints beside the images (<dataset>/canny/) need a folder and Canny"
    else:
        name_problem = dataset_name_problem(form.name)
        if name_problem:
            problems["name"] = name_problem
        out_problem = roots.problem(form.out_root, "output directory")
        if out_problem is None:
            out_problem = output_dir_problem(roots.resolve(form.out_root))
        if out_problem:
            problems["out_root"] = out_problem
    return problems


def source_overrides(form: DatasetForm, roots: Roots) -> list[str]:
    path = str(roots.resolve(form.source, "source path"))
    if form.layout == "shards":
        return ["source=shards", f"source.shards={path}"]
    if form.layout == "hf_dataset":  # the fill50k column names; a Canny hint comes from the image
        overrides = ["source=hf_dataset", f"source.path={path}"]
        return overrides + (["source.conditioning_image_column=null"] if form.control_type == "canny" else [])
    overrides = [f"source={form.layout}", f"source.root={path}"]
    if form.layout == "folder" and form.caption.strip():
        overrides.append(f"source.caption={form.caption.strip()}")
    if form.layout == "metadata_jsonl" and form.control_type == "canny":
        overrides.append("source.conditioning_column=null")  # the hint comes from the image
    return overrides


def output_dir(form: DatasetForm, roots: Roots) -> Path:
    """Where the job writes: ``<output directory>/<name>`` (shards), or the hints folder in the source."""
    if form.hint_layout == "folder":
        return roots.resolve(form.source, "source path") / "canny"
    return roots.resolve(form.out_root, "output directory") / form.name


def quote(value: Any) -> str:
    """A value as Hydra's override grammar reads it back unchanged."""
    text = str(value)
    if text and all(c.isalnum() or c in "/._-+:" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def prep_overrides(form: DatasetForm, roots: Roots) -> list[str]:
    """The ``controlnet-prep`` overrides that make this dataset."""
    overrides = [f"hint={form.control_type}"]
    hint = form.hint_config()
    overrides += [f"hint.{k}={v}" for k, v in hint.items() if k != "_target_"]
    size = _int(form.control_size) if form.control_size not in (None, "", 0) else None
    overrides.append(f"resolution={size if size else 'null'}")
    overrides += [f"workers={int(form.workers)}", f"shard_size={_int(form.shard_size)}"]
    if form.hint_layout == "folder":
        overrides += ["mode=precompute", *source_overrides(form, roots)]
    else:
        overrides += ["mode=shards", *source_overrides(form, roots), f"out_dir={output_dir(form, roots)}"]
    return [key + "=" + quote(value) for key, value in (o.split("=", 1) for o in overrides)]


def train_overrides(form: DatasetForm, roots: Roots) -> list[str]:
    """The ``controlnet-train`` data overrides that read this dataset back."""
    if form.hint_layout == "folder":
        data = ["data=folder", f"data.folder.root={quote(roots.resolve(form.source))}"]
    else:
        data = ["data=shards", f"data.shards={quote(output_dir(form, roots))}"]
    if form.on_the_fly:
        data.append("data.hint.on_the_fly=true")
        data += [f"data.hint.detector.{k}={v}" for k, v in form.hint_config().items() if k != "_target_"]
    return data


def compose_prep(overrides: list[str]) -> DictConfig:
    """conf/prep.yaml with ``overrides``, composed by Hydra as ``controlnet-prep`` would."""
    return compose("prep", overrides)


def save_settings(out: Path, cfg: DictConfig, overrides: list[str], form: DatasetForm, roots: Roots) -> None:
    """The exact prep config (``controlnet-prep --config-dir <out> --config-name prep_config`` runs it),
    its command line (the same from the packaged configs), and the training command that reads it."""
    out.mkdir(parents=True, exist_ok=True)
    saved = OmegaConf.create(OmegaConf.to_container(cfg))
    # Run from this file, the command logs beside the output as it does from its own config.
    saved.hydra = {"run": {"dir": f"{out}/.prep-logs/${{now:%Y%m%d-%H%M%S}}-cli"}, "output_subdir": None}
    with atomic_path(out / PREP_CONFIG) as tmp:
        OmegaConf.save(saved, tmp)
    command = "controlnet-prep " + " ".join(shlex.quote(o) for o in overrides)
    train = "controlnet-train " + " ".join(shlex.quote(o) for o in train_overrides(form, roots))
    for name, text in ((PREP_COMMAND, command), (TRAIN_COMMAND, train)):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text + "\n")
    record = {"name": form.name or roots.resolve(form.source).name, "layout": form.layout,
              "hint_layout": form.hint_layout, "prep_overrides": overrides,
              "train_overrides": train_overrides(form, roots), "prep_command": command,
              "saved": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    write_json_atomic(out / DATASET_RECORD, record)


def list_datasets(roots: Roots, depth: int = 3) -> list[dict]:
    """Datasets the UI made under the roots (their dataset.json), newest first."""
    found = []
    for root in roots:
        for pattern in ("/".join(["*"] * d + [DATASET_RECORD]) for d in range(depth + 1)):
            for path in root.glob(pattern):
                try:
                    found.append({**json.loads(path.read_text()), "path": str(path.parent)})
                except (OSError, ValueError):
                    log.warning("unreadable %s: left out of the dataset list", path)
    return sorted(found, key=lambda d: d.get("saved", ""), reverse=True)


def side_by_side(image: np.ndarray, hint: np.ndarray) -> np.ndarray:
    """image | hint, one picture: the pair as the ControlNet will see it."""
    if hint.ndim == 2:
        hint = np.repeat(hint[:, :, None], 3, axis=2)
    height = max(image.shape[0], hint.shape[0])
    pad = [np.pad(a, ((0, height - a.shape[0]), (0, 0), (0, 0))) for a in (image, hint)]
    gap = np.full((height, 4, 3), 255, np.uint8)
    return np.concatenate([pad[0], gap, pad[1]], axis=1)


@dataclass
class JobState:
    out: Path
    overrides: list[str]
    state: str = "starting"  # starting | running | done | cancelled | failed
    progress: Progress | None = None
    summary: dict = field(default_factory=dict)
    error: str = ""
    started: float = field(default_factory=time.time)
    job: Any = None
    thread: threading.Thread | None = None
    log_file: Path | None = None


class PrepRunner:
    """Prep jobs in background threads, one per output; polled by the page's timer."""

    def __init__(self):
        self.jobs: dict[str, JobState] = {}
        self._lock = threading.Lock()

    def start(self, out: Path, cfg: DictConfig, overrides: list[str]) -> JobState:
        from nemo_controlnet.prep.job import PrepJob

        with self._lock:
            current = self.jobs.get(str(out))
            if current is not None and current.state in ("starting", "running"):
                raise RuntimeError(f"a prep job is already writing {out}")
            state = JobState(out, overrides)
            state.job = PrepJob(cfg, lambda p: setattr(state, "progress", p))  # validates: a bad key fails here
            self.jobs[str(out)] = state
        state.thread = threading.Thread(target=self._run, args=(state,), name=f"prep {out.name}", daemon=True)
        state.thread.start()
        return state

    def _run(self, state: JobState) -> None:
        logs = state.out / ".prep-logs"
        logs.mkdir(parents=True, exist_ok=True)
        state.log_file = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-ui.log"
        handler = logging.FileHandler(state.log_file)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        package = logging.getLogger("nemo_controlnet")
        package.addHandler(handler)
        state.state = "running"
        log.info("prep job for %s: controlnet-prep %s", state.out, " ".join(state.overrides))
        try:
            state.summary = state.job.run()
            state.state = "cancelled" if state.summary.get("cancelled") else "done"
        except Exception as e:  # shown on the page and kept in the job's log
            log.exception("prep job for %s failed", state.out)
            state.state, state.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            package.removeHandler(handler)
            handler.close()

    def cancel(self, out: Path) -> JobState | None:
        state = self.jobs.get(str(out))
        if state is not None and state.job is not None:
            state.job.cancel()
        return state

    def get(self, out: Path) -> JobState | None:
        return self.jobs.get(str(out))


def skipped_rows(state: JobState | None, out: Path) -> list[list[str]]:
    """[file, reason] for the page: the running job's, or what the complete shards recorded."""
    if state is not None and state.job is not None:
        items = state.job.skipped_files
    else:
        from nemo_controlnet.prep.shards import skipped_files

        items = skipped_files(out) if out.is_dir() else []
    return [[str(item[0]), str(item[1])] for item in items]


def describe(state: JobState | None) -> tuple[str, str]:
    """(HTML progress bar, one line of text) for the page."""
    if state is None:
        return "", "no job yet"
    p = state.progress
    done = (p.samples_done if p.samples_total is not None else p.units_done) if p else 0
    total = (p.samples_total if p.samples_total is not None else p.units_total) if p else 0
    if state.state == "done":  # everything there was to do (a resume with nothing left: 1 / 1)
        done = total = total or 1
    percent = 100.0 * done / total if total else 0.0
    bar = f'<progress id="prep-progress" value="{done}" max="{max(total, 1)}" style="width:100%"></progress>'
    parts = [f"{state.state}", f"{done} / {total}", f"{percent:.0f}%"]
    if p is not None:
        parts.append(f"{p.rate:.1f} samples/s")
        if state.state == "running" and p.eta is not None:
            parts.append(f"ETA {p.eta:.0f} s")
        parts.append(f"written {p.written}, skipped {p.skipped}")
    if state.error:
        parts.append(state.error)
    return bar, " · ".join(parts)
