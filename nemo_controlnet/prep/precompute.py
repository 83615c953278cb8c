"""``controlnet-prep mode=precompute``: hint files beside an image folder,
``<root>/<hints_dir>/<stem>_<suffix>.png``, one per image, for the folder data source (the layout
ai-toolkit and kohya users keep), and ``<hints_dir>/manifest.json`` mapping each image to its hint."""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
from collections import Counter
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet import __version__
from nemo_controlnet.data.decode import BadSample, load_image
from nemo_controlnet.data.layout import MANIFEST, find_images, precomputed_hint_path
from nemo_controlnet.io import atomic_path, write_json_atomic
from nemo_controlnet.prep.progress import JobControl
from nemo_controlnet.prep.shards import check_params
from nemo_controlnet.prep.writer import default_signals, summarize

log = logging.getLogger(__name__)

MANIFEST_EVERY_S = 2.0  # how stale the manifest of a running job may get (a UI or a crash reads it)


class HintManifest:
    """``<hints_dir>/manifest.json``: ``hints`` maps each image (its path relative to ``source.root``) to
    its hint (a path relative to ``hints_dir``, where the manifest lies, so the two move together);
    ``skipped_files`` lists ``[image, reason, detail]`` of the images left out; ``complete`` is true once
    every image is in one of the two. An image is mapped only after its hint file was renamed into
    place, so whenever the manifest is written (atomically) every hint it lists exists and is whole."""

    def __init__(self, hints_dir: Path, params: dict, num_images: int):
        self.hints_dir, self.params, self.num_images = hints_dir, params, num_images
        self.hints: dict[str, str] = {}
        self.skipped_files: list[list[str]] = []
        self._written = time.monotonic()

    @property
    def path(self) -> Path:
        return self.hints_dir / MANIFEST

    def add_hint(self, image: str, hint: Path) -> None:
        self.hints[image] = hint.relative_to(self.hints_dir).as_posix()

    def add_skipped(self, image: str, reason: str, detail: str) -> None:
        self.skipped_files.append([image, reason, detail])

    def write(self, finished: bool = False) -> dict:
        manifest = {
            "tool": "nemo_controlnet.prep.precompute",
            "version": __version__,
            "params": self.params,
            "hints": dict(sorted(self.hints.items())),
            "skipped": dict(sorted(Counter(reason for _, reason, _ in self.skipped_files).items())),
            "skipped_files": sorted(self.skipped_files),
            "num_images": self.num_images,
            "num_hints": len(self.hints),
            "complete": finished and len(self.hints) + len(self.skipped_files) == self.num_images,
        }
        write_json_atomic(self.path, manifest)
        self._written = time.monotonic()
        return manifest

    def write_every(self) -> None:
        if time.monotonic() - self._written >= MANIFEST_EVERY_S:
            self.write()


def _precompute_one(job) -> tuple[str, Path, str | None, str]:
    """One image -> its hint file: ``(image, hint path, None, "")``, or the skip's reason and detail."""
    path, target, hint, seed, relpath = job
    try:
        with open(path, "rb") as f:
            image, _ = load_image(f.read(), "image")
        result, _ = hint(image, None, random.Random(f"{seed}-{relpath}"))
    except BadSample as e:
        log.warning("skipped %s: %s", path, e)
        return relpath, target, e.reason, e.detail
    except Exception as e:  # a bug or an odd file must cost one image, not the job
        log.exception("skipped %s: unexpected %s", path, e)
        return relpath, target, f"error_{type(e).__name__}", str(e)
    with atomic_path(target) as tmp:
        result.save(tmp, format="PNG")
    return relpath, target, None, ""


def _plan(root: Path, hints_dir: Path, suffix: str, overwrite: bool, manifest: HintManifest) -> list[tuple]:
    """(image, hint path) of the images still to do; the hints already there go straight into the
    manifest, so a resumed run keeps their mapping."""
    todo = []
    for path in find_images(root, (hints_dir.name,)):
        relpath = path.relative_to(root).as_posix()
        target = precomputed_hint_path(hints_dir, relpath, suffix)
        if target.is_file() and not overwrite:
            manifest.add_hint(relpath, target)
        else:
            todo.append((path, target, relpath))
    return todo


def precompute(cfg: DictConfig, job: JobControl) -> dict:
    """Hint files beside an image folder: ``<root>/<hints_dir>/<stem>_<suffix>.png``, one per image.
    Resumes by skipping the hints already there (each written atomically, so none is partial)."""
    root = Path(cfg.source.root)
    if not root.is_dir():
        raise FileNotFoundError(f"source.root: no directory {root}")
    hints_dir = Path(cfg.precompute.hints_dir) if cfg.precompute.hints_dir else root / cfg.precompute.suffix
    hint = instantiate(cfg.hint)
    params = {"hint": OmegaConf.to_container(cfg.hint, resolve=True), "suffix": cfg.precompute.suffix,
              "seed": cfg.seed, "version": __version__}  # fmt: skip
    hints_dir.mkdir(parents=True, exist_ok=True)
    check_params(hints_dir, params, cfg.overwrite)
    manifest = HintManifest(hints_dir, params, 0)
    todo = _plan(root, hints_dir, cfg.precompute.suffix, cfg.overwrite, manifest)
    present = len(manifest.hints)
    manifest.num_images = present + len(todo)
    log.info("precompute: %d images, %d hints present, %d to compute", manifest.num_images, present, len(todo))
    jobs = [(str(path), target, hint, cfg.seed, relpath) for path, target, relpath in todo]
    start, written, skipped, finished = time.time(), 0, Counter(), False
    if cfg.workers > 1:
        pool = multiprocessing.get_context("fork").Pool(cfg.workers, initializer=default_signals)
        results = pool.imap_unordered(_precompute_one, jobs, chunksize=4)
    else:
        pool, results = None, map(_precompute_one, jobs)
    try:
        for relpath, target, reason, detail in results:
            if reason is None:
                written += 1
                manifest.add_hint(relpath, target)
            else:
                skipped[reason] += 1
                manifest.add_skipped(relpath, reason, detail)
                job.add_skipped([(str(root / relpath), reason)])
            done = written + sum(skipped.values())
            job.report("precompute", done, len(jobs), done, len(jobs), written, sum(skipped.values()))
            manifest.write_every()
            if job.cancelled():
                break
        finished = not job.cancelled()
    finally:
        if pool is not None:  # a cancel terminates the workers: each hint is written atomically
            if job.cancelled():
                pool.terminate()
            else:
                pool.close()
            pool.join()
        written_manifest = manifest.write(finished)  # also after a cancel or an error: what is done stays mapped
    summary = summarize("precompute", written, skipped, Counter(), time.time() - start)
    return {**summary, "present": present, "num_hints": written_manifest["num_hints"],
            "manifest": str(manifest.path), "complete": written_manifest["complete"]}  # fmt: skip
