"""``controlnet-prep``: sources -> hints -> tar shards + manifest; resumable, parallel, SLURM-array
friendly. Also ``mode=precompute`` (hint files beside an image folder), ``mode=merge``, and
``mode=encode`` (cached latents and text embeddings; ``data/encode.py``)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from nemo_controlnet import __version__
from nemo_controlnet.config import validate_prep_config
from nemo_controlnet.data.decode import BadSample, decode_caption, load_hint, load_image
from nemo_controlnet.data.hints import MissingConditioning
from nemo_controlnet.data.shards import (
    STATE_DIR,
    check_params,
    encode,
    is_complete,
    resolve_task,
    shard_name,
    stats_path,
    task_units,
    write_manifest,
    write_stats,
)
from nemo_controlnet.data.sources import ImageFolder, RawSample
from nemo_controlnet.io import atomic_path, ensure_space, write_json_atomic

log = logging.getLogger(__name__)

def resize_short_side(image: Image.Image, size: int | None) -> Image.Image:
    """Downscale so the shorter side is ``size`` (aspect kept; never upscales: crops are training's job)."""
    if not size or min(image.size) <= size:
        return image
    scale = size / min(image.size)
    return image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)


class SampleProcessor:
    """A raw sample -> the members of one output sample. Runs in the worker processes."""

    def __init__(
        self,
        hint,
        image_key: str = "jpg",
        hint_key: str = "png",
        caption_key: str = "txt",
        jpeg_quality: int = 95,
        resolution: int | None = None,
        seed: int = 0,
        caption_required: bool = True,
    ):
        self.hint = hint
        self.image_key, self.hint_key, self.caption_key = image_key, hint_key, caption_key
        self.jpeg_quality, self.resolution, self.seed = jpeg_quality, resolution, seed
        self.caption_required = caption_required

    def __call__(self, raw: RawSample) -> tuple[dict, list[str]]:
        image, converted = load_image(raw.image, "image")
        conversions = [converted] if converted else []
        conditioning = None
        if raw.conditioning is not None:
            conditioning, converted = load_hint(raw.conditioning, "conditioning")
            conversions += [f"conditioning {converted}"] if converted else []
            if conditioning.size != image.size:
                raise BadSample("size_mismatch", f"image {image.size} vs conditioning {conditioning.size}")
        caption = decode_caption(raw.caption, self.caption_required)
        original_size = image.size
        image = resize_short_side(image, self.resolution)
        if conditioning is not None and conditioning.size != image.size:
            conditioning = conditioning.resize(image.size, Image.BILINEAR)
        # Seeded by the sample's key: the same hint whichever worker, task or re-run computes it.
        try:
            hint, hint_params = self.hint(image, conditioning, random.Random(f"{self.seed}-{raw.key}"))
        except MissingConditioning as e:
            raise BadSample("missing_conditioning", str(e)) from e
        meta = {
            "source": raw.source,
            "original_size": list(original_size),
            "size": list(image.size),
            "hint": hint_params,
            **raw.extra,
        }
        sample = {
            "__key__": raw.key,
            self.image_key: encode(image, self.image_key, self.jpeg_quality),
            self.hint_key: encode(hint, self.hint_key, self.jpeg_quality),
            self.caption_key: caption,
            "json": meta,
        }
        return sample, conversions


def write_unit(index: int, unit, source, processor: SampleProcessor, out_dir: Path, prefix: str) -> dict:
    """Write output shard ``index`` from one unit: temp file, rename, then its stats file."""
    name = shard_name(prefix, index)
    stats_path(out_dir, name).unlink(missing_ok=True)  # until rewritten, this shard is incomplete
    start = time.time()
    written, skipped, converted = 0, Counter(), Counter()
    largest = max((p.stat().st_size for p in out_dir.glob("*.tar")), default=0)
    if largest:  # the next shard is about as large as the largest so far: fail now, not half-way through it
        ensure_space(out_dir / name, largest)
    with atomic_path(out_dir / name, expected_bytes=largest or None) as tmp:
        with wds.TarWriter(str(tmp)) as sink:
            for raw in source.read(unit):
                if isinstance(raw, BadSample):
                    skipped[raw.reason] += 1
                    log.warning("%s: skipped %s", name, raw)
                    continue
                try:
                    sample, conversions = processor(raw)
                except BadSample as e:
                    skipped[e.reason] += 1
                    log.warning("%s: skipped %s: %s", name, raw.source, e)
                    continue
                except Exception as e:  # a bug or an odd file must cost one sample, not the job
                    skipped[f"error_{type(e).__name__}"] += 1
                    log.exception("%s: skipped %s: unexpected %s", name, raw.source, e)
                    continue
                sink.write(sample)
                written += 1
                converted.update(conversions)
    stats = {
        "name": name,
        "num_samples": written,
        "skipped": dict(skipped),
        "converted": dict(converted),
        "seconds": round(time.time() - start, 3),
    }
    write_stats(out_dir, name, stats)
    return stats


def _default_signals() -> None:
    """A forked worker dies on SIGTERM (the pool's terminate) whatever Python handlers the parent had
    installed (a training run's preemption handler, for one): not the parent's, the default."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


# Worker processes get the source and processor once, at start, not with every unit.
_WORKER: dict[str, Any] = {}


def _init_worker(source, processor, out_dir, prefix) -> None:
    _default_signals()
    _WORKER.update(source=source, processor=processor, out_dir=out_dir, prefix=prefix)


def _run_unit(job: tuple[int, Any]) -> dict:
    index, unit = job
    w = _WORKER
    return write_unit(index, unit, w["source"], w["processor"], w["out_dir"], w["prefix"])


def _map(jobs: list, workers: int, init_args: tuple) -> Iterable[dict]:
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(_run_unit, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap_unordered(_run_unit, jobs)


def prep_params(cfg: DictConfig) -> dict:
    keys = ("shard_size", "prefix", "image_key", "hint_key", "caption_key", "jpeg_quality", "resolution", "seed")
    params = {k: cfg[k] for k in keys}
    params.update(
        source=OmegaConf.to_container(cfg.source, resolve=True),
        hint=OmegaConf.to_container(cfg.hint, resolve=True),
        version=__version__,
    )
    return params


def _summary(what: str, written: int, skipped: Counter, converted: Counter, seconds: float) -> dict:
    rate = written / seconds if seconds > 0 else 0.0
    log.info(
        "%s: %d written, %d skipped %s, %d converted %s, %.1fs (%.1f samples/s)",
        what, written, sum(skipped.values()), dict(skipped), sum(converted.values()), dict(converted), seconds, rate,
    )  # fmt: skip
    return {"written": written, "skipped": dict(skipped), "converted": dict(converted), "seconds": round(seconds, 3)}


def make_shards(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = instantiate(cfg.source)
    processor = SampleProcessor(
        instantiate(cfg.hint), cfg.image_key, cfg.hint_key, cfg.caption_key, cfg.jpeg_quality,
        cfg.resolution, cfg.seed, getattr(source, "caption_required", True),
    )  # fmt: skip
    params = prep_params(cfg)
    check_params(out_dir, params, cfg.overwrite)
    units = source.units(cfg.shard_size)
    write_json_atomic(out_dir / STATE_DIR / "plan.json", {"num_units": len(units)})
    task_index, num_tasks = resolve_task(cfg.task_index, cfg.num_tasks)
    mine = task_units(len(units), task_index, num_tasks)
    todo = [i for i in mine if cfg.overwrite or not is_complete(out_dir, shard_name(cfg.prefix, i))]
    for i in todo:  # what a killed run was writing; only this task ever writes these units
        for stale in out_dir.glob(f".{shard_name(cfg.prefix, i)}.tmp-*"):
            stale.unlink(missing_ok=True)
    log.info(
        "task %d/%d: %d of %d shards are this task's, %d already complete, %d to write with %d worker(s)",
        task_index, num_tasks, len(mine), len(units), len(mine) - len(todo), len(todo), cfg.workers,
    )  # fmt: skip
    sizes = [len(units[i]) if isinstance(units[i], list) else None for i in todo]
    total = None if None in sizes else sum(sizes)
    written, skipped, converted = 0, Counter(), Counter()
    start = last_manifest = time.time()
    bar = tqdm(total=total, desc=f"prep {out_dir}", unit="sample", smoothing=0.1)
    init = (source, processor, out_dir, cfg.prefix)
    for stats in _map([(i, units[i]) for i in todo], cfg.workers, init):
        written += stats["num_samples"]
        skipped.update(stats["skipped"])
        converted.update(stats["converted"])
        bar.update(stats["num_samples"] + sum(stats["skipped"].values()))
        bar.set_postfix(written=written, skipped=sum(skipped.values()))
        if num_tasks == 1 and time.time() - last_manifest > 10:  # progress a crash cannot corrupt
            write_manifest(out_dir, params, len(units), cfg.prefix)
            last_manifest = time.time()
    bar.close()
    summary = _summary(f"task {task_index}/{num_tasks}", written, skipped, converted, time.time() - start)
    if num_tasks == 1:
        manifest = write_manifest(out_dir, params, len(units), cfg.prefix)
        summary["manifest"] = str(out_dir / "manifest.json")
        summary["complete"] = manifest["complete"]
    else:
        log.info("when every array task is done, run: controlnet-prep mode=merge out_dir=%s", out_dir)
    return summary


def merge(cfg: DictConfig) -> dict:
    """Write the manifest of an output that array tasks wrote; names what is still missing."""
    out_dir = Path(cfg.out_dir)
    state = out_dir / STATE_DIR
    if not (state / "params.json").is_file() or not (state / "plan.json").is_file():
        raise FileNotFoundError(f"{out_dir}: no prep state ({STATE_DIR}/params.json, plan.json); nothing to merge")
    params = json.loads((state / "params.json").read_text())
    num_units = json.loads((state / "plan.json").read_text())["num_units"]
    manifest = write_manifest(out_dir, params, num_units, params["prefix"])
    missing = [i for i in range(num_units) if not is_complete(out_dir, shard_name(params["prefix"], i))]
    if missing:
        log.error("%d of %d shards are not complete, first: %s", len(missing), num_units, missing[:10])
    log.info("manifest: %d shards, %d samples, complete=%s", manifest["num_shards"], manifest["num_samples"],
             manifest["complete"])  # fmt: skip
    return manifest


def precomputed_hint_path(hints_dir: Path, relpath: str | Path, suffix: str) -> Path:
    """``<hints_dir>/<subdirs>/<stem>_<suffix>.png`` for the image at ``relpath`` under the root."""
    relpath = Path(relpath)
    return hints_dir / relpath.parent / f"{relpath.stem}_{suffix}.png"


def _precompute_one(job) -> tuple[str, str | None]:
    path, target, hint, seed, relpath = job
    try:
        with open(path, "rb") as f:
            image, _ = load_image(f.read(), "image")
        result, _ = hint(image, None, random.Random(f"{seed}-{relpath}"))
    except BadSample as e:
        log.warning("skipped %s: %s", path, e)
        return "skipped", e.reason
    with atomic_path(target) as tmp:
        result.save(tmp, format="PNG")
    return "written", None


def precompute(cfg: DictConfig) -> dict:
    """Hint files beside an image folder: ``<root>/<hints_dir>/<stem>_<suffix>.png``, one per image."""
    root = Path(cfg.source.root)
    hints_dir = Path(cfg.precompute.hints_dir) if cfg.precompute.hints_dir else root / cfg.precompute.suffix
    hint = instantiate(cfg.hint)
    params = {"hint": OmegaConf.to_container(cfg.hint, resolve=True), "suffix": cfg.precompute.suffix,
              "seed": cfg.seed, "version": __version__}  # fmt: skip
    hints_dir.mkdir(parents=True, exist_ok=True)
    check_params(hints_dir, params, cfg.overwrite)
    folder = ImageFolder(str(root), caption="", exclude_dirs=(hints_dir.name,))
    jobs, present = [], 0
    for path in folder.image_paths():
        relpath = path.relative_to(root)
        target = precomputed_hint_path(hints_dir, relpath, cfg.precompute.suffix)
        if target.is_file() and not cfg.overwrite:
            present += 1
            continue
        jobs.append((str(path), target, hint, cfg.seed, str(relpath)))
    log.info("precompute: %d images, %d hints present, %d to compute", present + len(jobs), present, len(jobs))
    start, written, skipped = time.time(), 0, Counter()
    if cfg.workers > 1:
        pool = multiprocessing.get_context("fork").Pool(cfg.workers, initializer=_default_signals)
        results = pool.imap_unordered(_precompute_one, jobs, chunksize=16)
    else:
        pool, results = None, map(_precompute_one, jobs)
    for status, reason in tqdm(results, total=len(jobs), desc=f"hints {hints_dir}", unit="image"):
        if status == "written":
            written += 1
        else:
            skipped[reason] += 1
    if pool is not None:
        pool.close()
        pool.join()
    summary = _summary("precompute", written, skipped, Counter(), time.time() - start)
    total = sum(1 for _ in hints_dir.rglob(f"*_{cfg.precompute.suffix}.png"))
    write_json_atomic(hints_dir / "manifest.json", {"params": params, "num_hints": total, "skipped": dict(skipped)})
    return {**summary, "present": present, "num_hints": total}


def run_prep(cfg: DictConfig) -> dict:
    validate_prep_config(cfg)  # before the model stack is imported: a bad value fails in seconds, naming its key
    from nemo_controlnet.data.encode import encode_shards  # imports the model stack

    modes = {"shards": make_shards, "merge": merge, "precompute": precompute, "encode": encode_shards}
    if cfg.mode not in modes:
        raise ValueError(f"mode={cfg.mode!r}: use one of {sorted(modes)}")
    if cfg.mode != "precompute" and not cfg.get("out_dir"):
        raise ValueError(f"out_dir: required for mode={cfg.mode} (where the shards and manifest.json go)")
    if cfg.shard_size <= 0 or cfg.workers < 0:
        raise ValueError(f"shard_size={cfg.shard_size} must be > 0 and workers={cfg.workers} >= 0")
    return modes[cfg.mode](cfg)
