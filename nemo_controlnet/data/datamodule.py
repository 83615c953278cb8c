"""The LightningDataModule: data config -> an endless, resumable stream of batches; validation samples."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from itertools import islice
from typing import Iterator

import cv2
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from nemo_controlnet.data.decode import read_file, retain_heap
from nemo_controlnet.data.indexed import FolderSet, IndexedStream, SampleTable, ShardSet, buckets_for, is_local
from nemo_controlnet.data.subset import first_of_sources, first_of_table, log_limit
from nemo_controlnet.data.transforms import normalize_hint, prepare_hint
from nemo_controlnet.data.webdataset import (
    EpochStream,
    SampleDecoder,
    SampleStream,
    ShardSource,
    batches,
    describe_counts,
    expand_shards,
)

log = logging.getLogger(__name__)


def make_decoder(
    data_cfg: DictConfig,
    hint_channels: int,
    control_key: str = "hint",
    seed: int = 0,
    augment: bool = True,
    cached: bool = False,
) -> SampleDecoder:
    """The decoder a data config describes; ``augment=False`` for validation (center crop, no flip);
    ``cached`` for shards with cached latents (``data.cached.cached_encoding`` checked them)."""
    hint_cfg = data_cfg.get("hint") or {}
    on_the_fly = bool(hint_cfg.get("on_the_fly", False))
    folder = data_cfg.get("folder")
    detector = instantiate(hint_cfg.detector) if (on_the_fly and hint_cfg.get("detector")) else None
    if on_the_fly and detector is None:
        raise ValueError("data.hint.on_the_fly=true needs data.hint.detector (e.g. the canny node)")
    aug = data_cfg.get("augment") or {}
    return SampleDecoder(
        int(data_cfg.resolution),
        data_cfg.image_key,
        data_cfg.hint_key,
        data_cfg.caption_key,
        hint_channels,
        control_key,
        crop=aug.get("crop", "center") if augment else "center",
        hflip=float(aug.get("hflip", 0.0)) if augment else 0.0,
        detector=detector,
        regenerate=on_the_fly and not folder,  # a folder prefers its precomputed hints
        seed=seed,
        cached=cached,
        missing_caption=data_cfg.get("missing_caption", "empty"),
        mask_key=data_cfg.get("mask_key"),  # follows controlnet.aux_mask_key (conf/data/_common.yaml)
    )


def make_sources(data_cfg: DictConfig) -> list[tuple[object, float]]:
    """(source, weight) pairs: ``data.folder``, ``data.hf``, or weighted ``data.datasets``, or ``data.shards``."""
    if data_cfg.get("hf"):
        from nemo_controlnet.data.hf import HfSource

        on_the_fly = bool((data_cfg.get("hint") or {}).get("on_the_fly", False))
        hf = OmegaConf.to_container(data_cfg.hf, resolve=True)
        keys = {k: data_cfg[k] for k in ("image_key", "hint_key", "caption_key")}
        return [(HfSource(**hf, on_the_fly=on_the_fly, **keys), 1.0)]
    if data_cfg.get("folder"):
        from nemo_controlnet.data.folder import FolderSource

        f = data_cfg.folder
        on_the_fly = bool((data_cfg.get("hint") or {}).get("on_the_fly", False))
        return [(FolderSource(f.root, f.get("hints_dir"), f.get("suffix", "canny"), on_the_fly), 1.0)]
    if data_cfg.get("datasets"):
        sources = []
        for i, d in enumerate(data_cfg.datasets):
            weight = float(d.get("weight", 1.0))
            if weight <= 0:
                raise ValueError(f"data.datasets[{i}].weight={weight}: must be > 0")
            sources.append((ShardSource(expand_shards(d.shards)), weight))
        return sources
    return [(ShardSource(expand_shards(data_cfg.shards)), 1.0)]


# What a signal to the whole process group (Ctrl-C, scancel, SLURM's time limit, kill -TERM -<pgid>)
# must not do to a loader worker: end it (torch's worker handler re-raises SIGTERM from anyone but
# its parent; SIGUSR1 kills by default; a worker exits on SIGINT), which makes the main process die
# with "DataLoader worker ... is killed" instead of checkpointing (training/callbacks.Preemption).
WORKER_SIGNALS = {getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, n)}


def worker_init(worker_id: int) -> None:
    """A loader worker leaves SIGTERM, SIGUSR1 and SIGINT to the main process, which checkpoints at
    the end of the step, stops, and shuts its workers down itself. (One thread each: torch's worker
    loop sets torch's; OpenCV's is set before the fork, ``sequential_opencv``.)"""
    for signum in WORKER_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)  # blocked since the fork (signals_blocked)
    retain_heap()  # each sample's arrays reuse the last one's memory, not fresh pages (decode.retain_heap)


def sequential_opencv() -> None:
    """OpenCV runs sequentially in this process and in the loader workers forked from it: the workers
    are the loader's parallelism (``training.perf.configure_threads`` gives the step the other cores),
    and a thread-count call inside a forked worker can deadlock on the pool the parent started."""
    cv2.setNumThreads(0)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGTERM/SIGUSR1/SIGINT held back while loader workers are forked, so none arrives in a worker
    before ``worker_init`` ignores it; the main process gets any held one right after."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


ACCESS = ("auto", "indexed", "stream")


class ShardDataModule(L.LightningDataModule):
    """Training batches from ``data``: indexed (local shards and folders: planned epochs, O(1) resume,
    aspect buckets; ``data/indexed.py``) or streamed (any URL; shuffle buffers; ``data/webdataset.py``),
    by ``data.access`` (``auto``: indexed when every source is local, unless resuming a streamed run)."""

    def __init__(
        self, data_cfg: DictConfig, hint_channels: int, seed: int, control_key: str = "hint", cached: bool = False
    ):
        super().__init__()
        self.cfg = data_cfg
        self.decoder = make_decoder(data_cfg, hint_channels, control_key, seed, cached=cached)
        self.seed = seed
        self.cached = cached
        self.resume_position: tuple[int, int] = (0, -1)
        self.resumed_access: str | None = None  # what the checkpoint's data stream was
        self.access: str | None = None
        self.sources: list[tuple[object, float]] = []
        self.stream: EpochStream | None = None
        self.table = None  # indexed access: data.indexed.SampleTable
        self.buckets: list[tuple[int, int]] | None = None
        self.bucket_of = None

    def map_samples(self, stage) -> None:
        """Wrap the sample decoder in a per-sample stage (``stage(decoder)`` -> a decoder-like callable, such as
        ``data.residuals.ResidualStage``: precomputed residuals by key); before ``train_dataloader()``."""
        self.decoder = stage(self.decoder)
        log.info("training samples pass through %s", type(self.decoder).__name__)

    def setup(self, stage: str) -> None:
        if int(self.cfg.num_workers) > 0:
            sequential_opencv()
        self.sources = make_sources(self.cfg)
        log.info("training data: %d source(s) %s, batch %d, %d worker(s), resampled=%s",
                 len(self.sources), [repr_source(s) for s, _ in self.sources], self.cfg.batch_size,
                 self.cfg.num_workers, bool(self.cfg.get("resampled")))  # fmt: skip

    def choose_access(self) -> str:
        """``data.access`` resolved: the checkpoint's when resuming (its batch order), else indexed
        when every source is local (a file, not a URL or a pipe)."""
        wanted = self.cfg.get("access", "auto")
        if wanted not in ACCESS:
            raise ValueError(f"data.access={wanted!r}: use one of {list(ACCESS)}")
        resuming = self.resume_position != (0, -1)
        recorded = self.resumed_access or ("stream" if resuming else None)  # before indexed access existed
        local = all(not hasattr(s, "urls") or all(is_local(u) for u in s.urls) for s, _ in self.sources)
        streamed = [s for s, _ in self.sources if not getattr(s, "seekable", True)]  # data.hf parquet
        buckets = bool((self.cfg.get("buckets") or {}).get("enabled"))
        if recorded and wanted not in ("auto", recorded):
            raise ValueError(
                f"data.access={wanted}, but the checkpoint was trained with data.access={recorded}: resume with "
                f"data.access={recorded} (or auto), or start over with resume=false (another access mode is "
                "another sample order)"
            )
        access = recorded or (wanted if wanted != "auto" else ("indexed" if local and not streamed else "stream"))
        if access == "indexed" and streamed:
            streamed[0].indexed_set()  # raises: why it cannot be indexed, and what to do
        if access == "indexed" and not local:
            remote = next(u for s, _ in self.sources for u in getattr(s, "urls", []) if not is_local(u))
            raise ValueError(f"data.access=indexed reads local files only; {remote} is not one (use data.access="
                             "stream for URLs and pipes)")  # fmt: skip
        if buckets and access != "indexed":
            raise ValueError(
                "data.buckets.enabled=true needs indexed access (local shards or a folder, data.access=auto|"
                f"indexed); this run's data is read with data.access={access}"
            )
        if buckets and self.cached:
            raise ValueError(
                "data.buckets.enabled=true cannot use cached latents (encoded as square crops); train from "
                "images, or without buckets"
            )
        return access

    def check_stream_readers(self) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        readers = world * max(1, int(self.cfg.num_workers))
        for i, (source, _) in enumerate(self.sources):
            units = len(getattr(source, "urls", getattr(source, "items", [])))
            if not self.cfg.get("resampled") and units < readers:
                # A rank or worker without data yields nothing, and DDP then waits on it forever.
                kind = "shard(s)" if hasattr(source, "urls") else getattr(source, "unit_kind", "image(s)")
                raise ValueError(
                    f"data source {i}: {units} {kind} for {world} rank(s) x {self.cfg.num_workers} worker(s); "
                    f"need at least {readers} (write smaller shards, lower data.num_workers, or data.resampled=true)"
                )

    def build_table(self) -> None:
        trainer = self.trainer
        first = trainer is None or trainer.world_size == 1 or trainer.local_rank == 0
        if not first:  # one process per node builds missing indexes; the others then load them
            trainer.strategy.barrier("index shards")
        sizes = bool((self.cfg.get("buckets") or {}).get("enabled"))
        sets = [ShardSet(s.urls, self.cfg.image_key) if hasattr(s, "urls") else s.indexed_set(sizes)
                if hasattr(s, "indexed_set") else FolderSet(s) for s, _ in self.sources]  # fmt: skip
        if first and trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("index shards")
        self.table = SampleTable.of(sets, [w for _, w in self.sources])
        limit = self.cfg.get("max_train_samples")
        if limit:  # data.max_train_samples: the first N in the table's order (data/subset.py)
            log_limit(int(limit), len(self.table))
            self.table = first_of_table(self.table, int(limit))
        if len(self.table) == 0:
            raise ValueError(f"training data: no samples in {[repr_source(s) for s, _ in self.sources]}")
        self.buckets, self.bucket_of = buckets_for(self.cfg, self.table)

    def _epoch_loader(self, epoch: int, first: int = 0) -> DataLoader:
        resampled = bool(self.cfg.get("resampled"))
        if self.access == "indexed":
            per_epoch = self.cfg.get("samples_per_epoch") if resampled else None
            stream = IndexedStream(self.table, self.decoder, int(self.cfg.batch_size), epoch, self.seed,
                                   self.buckets, self.bucket_of, first, per_epoch)  # fmt: skip
        else:
            stream = SampleStream(
                self.sources, self.decoder, int(self.cfg.batch_size), epoch, seed=self.seed,
                shuffle_buffer=int(self.cfg.shuffle_buffer), resampled=resampled,
                samples_per_epoch=self.cfg.get("samples_per_epoch"),
            )  # fmt: skip
        workers = int(self.cfg.num_workers)
        # Its own generator: creating an iterator must not draw from the global RNG, which the
        # training step's noise comes from (and which a resumed run restores).
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        loader = DataLoader(stream, batch_size=None, num_workers=workers, generator=generator,
                            pin_memory=torch.cuda.is_available(), prefetch_factor=2 if workers else None,
                            worker_init_fn=worker_init if workers else None)  # fmt: skip
        with signals_blocked():  # the workers start with them blocked, then ignore them (worker_init)
            return iter(loader)

    def train_dataloader(self) -> EpochStream:
        self.access = self.choose_access()
        if self.access == "indexed":
            self.build_table()
        else:
            if self.cfg.get("max_train_samples"):  # the same first N as indexed access (data/subset.py)
                log_limit(int(self.cfg.max_train_samples), None)
                self.sources = first_of_sources(self.sources, int(self.cfg.max_train_samples), self.cfg.image_key)
            self.check_stream_readers()
        log.info("data access: %s%s", self.access,
                 f", {len(self.buckets)} aspect buckets" if self.buckets else "")  # fmt: skip
        self.stream = EpochStream(self._epoch_loader, start=self.resume_position)
        return self.stream

    def teardown(self, stage: str) -> None:
        if self.stream is not None and (self.stream.skipped or self.stream.notes):
            log.warning("finished epochs: %s", describe_counts(self.stream.skipped, self.stream.notes))

    # Lightning stores this in every checkpoint and hands it back on resume, before train_dataloader().
    def state_dict(self) -> dict:
        module = self.trainer.lightning_module if self.trainer is not None else None
        position = getattr(module, "data_position", self.resume_position)
        return {"data_position": list(position), "data_access": self.access or self.resumed_access}

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_position = tuple(state_dict.get("data_position", (0, -1)))
        self.resumed_access = state_dict.get("data_access")


def repr_source(source) -> str:
    if hasattr(source, "urls"):
        return f"{len(source.urls)} shards from {source.urls[0]}"
    if not hasattr(source, "root"):
        return repr(source)
    return f"{len(source.items)} images under {source.root}"


def held_out_samples(
    shards, data_cfg: DictConfig, hint_channels: int, num_samples: int, keys=None, resolution: int | None = None
) -> list[dict]:
    """Samples of a shard set in order, center-cropped, with their json metadata: the first
    ``num_samples``, or the samples named by ``keys`` (in that order; a missing key is an error)."""
    data_cfg = OmegaConf.merge(data_cfg, {"resolution": resolution or data_cfg.resolution})
    decoder = make_decoder(data_cfg, hint_channels, augment=False)
    decoder.keep_meta = True
    stream = SampleStream([(ShardSource(expand_shards(shards)), 1.0)], decoder, 1, 0, shuffle_buffer=0)
    if not keys:
        return list(islice(batches(stream), int(num_samples)))
    wanted = [str(k) for k in keys]
    found = {}
    for s in batches(stream):
        if s["key"][0] in wanted:
            found[s["key"][0]] = s
            if len(found) == len(wanted):
                break
    missing = [k for k in wanted if k not in found]
    if missing:
        raise KeyError(f"validation.keys: {len(missing)} key(s) not in {shards}, first: {missing[0]!r}")
    return [found[k] for k in wanted]


def validation_samples(
    val_cfg: DictConfig, data_cfg: DictConfig, hint_channels: int
) -> tuple[list[str], torch.Tensor, list[dict]]:
    """Fixed (prompts, hints, metadata) for validation: explicit ``samples`` ({prompt, hint: path}),
    the samples of ``shards`` named by ``keys``, or the first ``num_samples`` of ``shards``, read in
    order, center-cropped."""
    resolution = int(data_cfg.resolution)
    if val_cfg.get("samples"):
        prompts, hints = [], []
        for i, item in enumerate(val_cfg.samples):
            prompts.append(str(item.prompt))
            hints.append(prepare_hint(read_file(item.hint, f"validation.samples[{i}].hint"), resolution, hint_channels))
        return prompts, torch.stack(hints), [{} for _ in prompts]
    if not val_cfg.get("shards") or (int(val_cfg.num_samples) <= 0 and not val_cfg.get("keys")):
        return [], torch.empty(0), []
    prompts, hints, metas, _ = held_out(val_cfg.shards, data_cfg, hint_channels, int(val_cfg.num_samples),
                                        val_cfg.get("keys"))  # fmt: skip
    return prompts, hints, metas


def held_out(
    shards, data_cfg: DictConfig, hint_channels: int, num_samples: int, keys=None, resolution: int | None = None
) -> tuple[list[str], torch.Tensor, list[dict], list[str]]:
    """(prompts, hints float [0, 1], metadata, keys) of held-out samples (``held_out_samples``), as
    validation and evaluation use them."""
    samples = held_out_samples(shards, data_cfg, hint_channels, num_samples, keys, resolution)
    if not samples:
        return [], torch.empty(0), [], []
    hints = normalize_hint(torch.cat([s["hint"] for s in samples]))
    return [s["caption"][0] for s in samples], hints, [s["meta"][0] for s in samples], [s["key"][0] for s in samples]
