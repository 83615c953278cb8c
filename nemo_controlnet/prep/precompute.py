"""``controlnet-prep mode=precompute``: hint files beside an image folder,
``<root>/<hints_dir>/<stem>_<suffix>.png``, one per image, for the folder data source."""

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
    jobs, present = [], 0
    for path in find_images(root, (hints_dir.name,)):
        relpath = path.relative_to(root)
        target = precomputed_hint_path(hints_dir, relpath, cfg.precompute.suffix)
        if target.is_file() and not cfg.overwrite:
            present += 1
            continue
        jobs.append((str(path), target, hint, cfg.seed, str(relpath)))
    log.info("precompute: %d images, %d hints present, %d to compute", present + len(jobs), present, len(jobs))
    start, written, skipped = time.time(), 0, Counter()
    if cfg.workers > 1:
        pool = multiprocessing.get_context("fork").Pool(cfg.workers, initializer=default_signals)
        results = pool.imap_unordered(_precompute_one, jobs, chunksize=4)
    else:
        pool, results = None, map(_precompute_one, jobs)
    try:
        for status, reason in results:
            if status == "written":
                written += 1
            else:
                skipped[reason] += 1
            done = written + sum(skipped.values())
            job.report("precompute", done, len(jobs), done, len(jobs), written, sum(skipped.values()))
            if job.cancelled():
                break
    finally:
        if pool is not None:  # a cancel terminates the workers: each hint is written atomically
            if job.cancelled():
                pool.terminate()
            else:
                pool.close()
            pool.join()
    summary = summarize("precompute", written, skipped, Counter(), time.time() - start)
    total = sum(1 for _ in hints_dir.rglob(f"*_{cfg.precompute.suffix}.png"))
    write_json_atomic(hints_dir / MANIFEST, {"params": params, "num_hints": total, "skipped": dict(skipped)})
    return {**summary, "present": present, "num_hints": total}
