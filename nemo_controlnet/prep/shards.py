"""Output bookkeeping of ``controlnet-prep`` and ``mode=encode``: per-shard stats sidecars, the
manifest, the members' image encodings and the SLURM-array task split, which both writers share.

A shard counts as complete when its tar and its stats file (``.prep/<name>.json``, written after
the tar was renamed into place) both exist. The manifest is built only from stats files, so it
never lists a shard that is partial or missing; it is replaced atomically.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

from PIL import Image

from nemo_controlnet import __version__
from nemo_controlnet.io import write_json_atomic

STATE_DIR = ".prep"
MANIFEST = "manifest.json"
SKIPPED_FILES_CAP = 1000  # skipped samples listed by file per shard's stats; beyond it only counted


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def stats_path(out_dir: Path, name: str) -> Path:
    return out_dir / STATE_DIR / f"{name}.json"


def is_complete(out_dir: Path, name: str) -> bool:
    return (out_dir / name).is_file() and stats_path(out_dir, name).is_file()


def read_stats(out_dir: Path, name: str) -> dict:
    return json.loads(stats_path(out_dir, name).read_text())


def write_stats(out_dir: Path, name: str, stats: dict) -> None:
    write_json_atomic(stats_path(out_dir, name), stats)


def complete_shards(out_dir: Path) -> list[str]:
    """The names of the complete shards in ``out_dir``, sorted, whatever plan or task wrote them."""
    state = Path(out_dir) / STATE_DIR
    names = (p.name[: -len(".json")] for p in state.glob("*.tar.json")) if state.is_dir() else ()
    return sorted(n for n in names if is_complete(Path(out_dir), n))


def skipped_files(out_dir: Path, names: list[str] | None = None) -> list[tuple[str, str]]:
    """``(source, reason)`` of every sample the complete shards (or those ``names``) left out, in shard
    order, as their stats list them (up to ``SKIPPED_FILES_CAP`` per shard; ``skipped`` counts all).
    Read from disk, so a resumed job's earlier shards are included."""
    out = []
    for name in complete_shards(out_dir) if names is None else names:
        if is_complete(Path(out_dir), name):
            out += [(source, reason) for source, reason, *_ in read_stats(Path(out_dir), name).get("skipped_files", [])]
    return out


def check_params(out_dir: Path, params: dict, overwrite: bool) -> None:
    """One output directory, one set of parameters: a re-run with others must say overwrite=true."""
    path = out_dir / STATE_DIR / "params.json"
    if path.is_file() and not overwrite:
        old = _renamed_targets(json.loads(path.read_text()))
        if old != params:
            changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
            raise ValueError(
                f"{out_dir} was written with other parameters (differing: {', '.join(changed)}); "
                "use another out_dir, or overwrite=true to redo it"
            )
    write_json_atomic(path, params)


# Sources lived in nemo_controlnet.data.sources before prep/ was split from data/: an output begun
# then resumes under the same parameters.
_MOVED = {"nemo_controlnet.data.sources.": "nemo_controlnet.prep.sources."}


def _renamed_targets(params: dict) -> dict:
    target = (params.get("source") or {}).get("_target_", "")
    for old, new in _MOVED.items():
        if target.startswith(old):
            params["source"]["_target_"] = new + target[len(old):]
    return params


def write_manifest(out_dir: Path, params: dict, num_units: int, prefix: str) -> dict:
    """The manifest from the complete shards of this plan (units 0..num_units-1), written atomically.

    Only shards whose stats exist are listed; empty ones (every sample skipped) are left out of
    ``shards`` so no rank or worker is handed a shard without data, but count as complete.
    """
    shards, done, skipped, converted, captioned = [], 0, Counter(), Counter(), None
    for index in range(num_units):
        name = shard_name(prefix, index)
        if not is_complete(out_dir, name):
            continue
        stats = read_stats(out_dir, name)
        done += 1
        for part in stats.get("parts") or [{"name": name, "num_samples": stats["num_samples"]}]:
            if part["num_samples"]:  # a unit split by size (mode=encode) lists its parts
                shards.append({"name": part["name"], "num_samples": part["num_samples"]})
        skipped.update(stats.get("skipped", {}))
        converted.update(stats.get("converted", {}))
        if "captioned" in stats:  # a captioning run: how many captions the model wrote
            captioned = (captioned or 0) + stats["captioned"]
    manifest = {
        "tool": "nemo_controlnet.prep",
        "version": __version__,
        "params": params,
        "shards": shards,
        "num_shards": len(shards),
        "num_units": num_units,
        "complete": done == num_units,
        "num_samples": sum(s["num_samples"] for s in shards),
        "skipped": dict(sorted(skipped.items())),
        "converted": dict(sorted(converted.items())),
    }
    if captioned is not None:
        manifest["captioned"] = captioned
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


ENCODINGS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode(image: Image.Image, member: str, quality: int) -> bytes:
    """Bytes in the format the member's extension names (``jpg``, ``target.png``, ...)."""
    fmt = ENCODINGS.get(member.rsplit(".", 1)[-1].lower())
    if fmt is None:
        raise ValueError(f"cannot encode an image as '{member}': use one of {sorted(ENCODINGS)}")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def resolve_task(task_index: int | None, num_tasks: int | None) -> tuple[int, int]:
    """This task's slice, by default from the SLURM array (whose ids need not start at 0)."""
    env = os.environ
    if num_tasks is None:
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if task_index is None:
        task_index = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task_index={task_index} is outside 0..{num_tasks - 1} (num_tasks={num_tasks})")
    return task_index, num_tasks


def task_units(num_units: int, task_index: int, num_tasks: int) -> list[int]:
    """Round-robin: every unit belongs to exactly one task, and big inputs spread evenly."""
    return list(range(task_index, num_units, num_tasks))


def plan_units(out_dir: Path, num_units: int, prefix: str, task_index: int, num_tasks: int,
               overwrite: bool) -> tuple[list[int], list[int]]:  # fmt: skip
    """Record the plan (``plan.json``, for merge); this task's units, and those of them still to write.
    Temp files a killed run left for those are removed: only this task ever writes these units."""
    write_json_atomic(out_dir / STATE_DIR / "plan.json", {"num_units": num_units})
    mine = task_units(num_units, task_index, num_tasks)
    todo = [i for i in mine if overwrite or not is_complete(out_dir, shard_name(prefix, i))]
    for i in todo:
        for stale in out_dir.glob(f".{shard_name(prefix, i)}.tmp-*"):
            stale.unlink(missing_ok=True)
    return mine, todo
