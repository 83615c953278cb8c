"""``controlnet-prep``: the prep job. ``PrepJob(cfg, progress)`` validates the config, runs its mode
(``shards``: sources -> hints -> tar shards + manifest; ``merge``; ``precompute``: hint files beside an
image folder; ``encode``: cached latents and text embeddings) and can be cancelled from another thread.
Every mode resumes from its complete outputs; the command drives it with a progress bar, a UI with
its own callback."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet import __version__
from nemo_controlnet.config import validate_prep_config
from nemo_controlnet.data.layout import MANIFEST
from nemo_controlnet.prep.progress import JobControl, ProgressBar, ProgressCallback
from nemo_controlnet.prep.shards import (
    STATE_DIR,
    check_params,
    plan_units,
    is_complete,
    resolve_task,
    shard_name,
    skipped_files,
    write_manifest,
)
from nemo_controlnet.prep.writer import Cancelled, SampleProcessor, summarize, write_units

log = logging.getLogger(__name__)


class PrepJob(JobControl):
    """One run of ``controlnet-prep``: ``run()`` returns the summary (``cancelled: true`` when
    ``cancel()`` stopped it; re-running the same config then resumes from the complete shards).
    ``skipped_files`` (from ``JobControl``) lists the samples left out so far, for a UI to poll."""

    def __init__(self, cfg: DictConfig, progress: ProgressCallback | None = None):
        super().__init__(progress)
        # Before the model stack is imported: a bad mode, out_dir, shard_size... fails in seconds, naming its key.
        validate_prep_config(cfg)
        self.cfg = cfg

    def run(self) -> dict:
        self.start()
        mode = self.cfg.mode
        if mode == "merge":
            return merge(self.cfg)
        if mode == "precompute":
            from nemo_controlnet.prep.precompute import precompute

            summary = precompute(self.cfg, self)
        elif mode == "encode":
            from nemo_controlnet.prep.encode import encode_shards  # imports the model stack

            summary = encode_shards(self.cfg, self)
        elif mode == "residuals":
            from nemo_controlnet.prep.residuals import residual_files  # imports the model stack

            summary = residual_files(self.cfg, self)
        else:
            summary = make_shards(self.cfg, self)
        summary["cancelled"] = self.cancelled()
        if self.cancelled():
            log.warning("cancelled: complete outputs kept; run the same command again to resume")
        return summary


def run_prep(cfg: DictConfig) -> dict:
    """The command: the job with a progress bar."""
    bar = ProgressBar(f"{cfg.mode} {cfg.get('out_dir') or cfg.source.get('root', '')}")
    try:
        return PrepJob(cfg, bar).run()
    finally:
        bar.close()


def prep_params(cfg: DictConfig) -> dict:
    keys = ("shard_size", "prefix", "image_key", "hint_key", "caption_key", "jpeg_quality", "resolution", "seed")
    params = {k: cfg[k] for k in keys}
    params.update(
        source=OmegaConf.to_container(cfg.source, resolve=True),
        hint=OmegaConf.to_container(cfg.hint, resolve=True),
        version=__version__,
    )
    return params


def make_captioner(cfg: DictConfig):
    """The ``caption:`` block's captioner, or None when ``caption.model`` is not set (no captioning)."""
    if OmegaConf.select(cfg, "caption.model", default=None) is None:
        return None
    from nemo_controlnet.prep.caption import Captioner  # imports transformers

    writers = cfg.workers if cfg.workers > 1 else 0  # processes beside this one (prep/writer.py:write_units)
    return Captioner(**OmegaConf.to_container(cfg.caption, resolve=True), writers=writers)


def make_shards(cfg: DictConfig, job: JobControl) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = instantiate(cfg.source)
    captioner = make_captioner(cfg)  # reads the model's config only: a bad caption.model fails before any work
    if captioner is not None and hasattr(source, "caption_required"):
        source.caption_required = False  # a sample without a caption is captioned, not skipped
    processor = SampleProcessor(
        instantiate(cfg.hint), cfg.image_key, cfg.hint_key, cfg.caption_key, cfg.jpeg_quality,
        cfg.resolution, cfg.seed, getattr(source, "caption_required", True),
    )  # fmt: skip
    params = prep_params(cfg)
    if captioner is not None:  # recorded in the manifest; a resume with another captioner is refused
        params["caption"] = captioner.describe()
    check_params(out_dir, params, cfg.overwrite)
    units = source.units(cfg.shard_size)
    task_index, num_tasks = resolve_task(cfg.task_index, cfg.num_tasks)
    mine, todo = plan_units(out_dir, len(units), cfg.prefix, task_index, num_tasks, cfg.overwrite)
    log.info(
        "task %d/%d: %d of %d shards are this task's, %d already complete, %d to write with %d worker(s)",
        task_index, num_tasks, len(mine), len(units), len(mine) - len(todo), len(todo), cfg.workers,
    )  # fmt: skip
    # A resumed job lists what its earlier runs skipped too (the shards it keeps).
    job.add_skipped(skipped_files(out_dir, [shard_name(cfg.prefix, i) for i in sorted(set(mine) - set(todo))]))
    sizes = [len(units[i]) if isinstance(units[i], list) else None for i in todo]
    total = None if None in sizes else sum(sizes)
    written, skipped, converted, done = 0, Counter(), Counter(), 0
    start = last_manifest = time.time()
    init = (source, processor, out_dir, cfg.prefix)

    def report() -> None:
        n_skipped = sum(skipped.values())
        captioning = {"captioned": captioner.captioned, "caption_seconds": captioner.seconds} if captioner else {}
        job.report("shards", done, len(todo), written + n_skipped, total, written, n_skipped, **captioning)

    jobs = [(i, units[i]) for i in todo]
    if captioner is not None:  # captioned here, a unit at a time, as the writers ask for them
        jobs = captioner.jobs(jobs, source, job.cancelled, on_batch=report)
    report()
    try:
        # Closed on a break: the pool's workers are terminated at once, not when the generator is collected.
        with closing(write_units(jobs, cfg.workers, init, job.cancelled)) as results:
            for stats in results:
                written += stats["num_samples"]
                skipped.update(stats["skipped"])
                converted.update(stats["converted"])
                job.add_skipped(stats["skipped_files"])
                done += 1
                report()
                if num_tasks == 1 and time.time() - last_manifest > 10:  # progress a crash cannot corrupt
                    write_manifest(out_dir, params, len(units), cfg.prefix)
                    last_manifest = time.time()
                if job.cancelled():
                    break  # leaving the pool terminates its workers; their temp files never become shards
    except Cancelled as e:
        log.info("cancelled while writing %s (not kept)", e)
    finally:
        if captioner is not None:
            captioner.close()
    summary = summarize(f"task {task_index}/{num_tasks}", written, skipped, converted, time.time() - start)
    if captioner is not None:
        log.info("captioned %d samples (%d failed) in %.1fs: %.2f captions/s", captioner.captioned,
                 captioner.failed, captioner.seconds, captioner.rate)  # fmt: skip
        summary.update(captioned=captioner.captioned, captions_per_s=round(captioner.rate, 3))
    if num_tasks == 1:
        manifest = write_manifest(out_dir, params, len(units), cfg.prefix)
        summary["manifest"] = str(out_dir / MANIFEST)
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
