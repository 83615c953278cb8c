"""The LightningDataModule: shards -> an endless, resumable stream of batches; validation samples."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader

from nemo_controlnet.data.transforms import prepare_hint
from nemo_controlnet.data.webdataset import EpochStream, SampleDecoder, epoch_pipeline, expand_shards

log = logging.getLogger(__name__)


def make_decoder(data_cfg: DictConfig, hint_channels: int, control_key: str = "hint") -> SampleDecoder:
    return SampleDecoder(
        int(data_cfg.resolution),
        data_cfg.image_key,
        data_cfg.hint_key,
        data_cfg.caption_key,
        hint_channels,
        control_key,
    )


class ShardDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: DictConfig, hint_channels: int, seed: int, control_key: str = "hint"):
        super().__init__()
        self.cfg = data_cfg
        self.decoder = make_decoder(data_cfg, hint_channels, control_key)
        self.seed = seed
        self.resume_position: tuple[int, int] = (0, -1)
        self.urls: list[str] = []

    def setup(self, stage: str) -> None:
        self.urls = expand_shards(self.cfg.shards)
        world = self.trainer.world_size if self.trainer is not None else 1
        readers = world * max(1, int(self.cfg.num_workers))
        if len(self.urls) < readers:
            # A rank or worker without a shard yields nothing, and DDP then waits on it forever.
            raise ValueError(
                f"data.shards: {len(self.urls)} shard(s) for {world} rank(s) x {self.cfg.num_workers} worker(s); "
                f"need at least {readers} (write smaller shards or lower data.num_workers)"
            )
        log.info(
            "training data: %d shard(s), first %s, batch %d, %d worker(s)",
            len(self.urls),
            self.urls[0],
            self.cfg.batch_size,
            self.cfg.num_workers,
        )

    def _epoch_loader(self, epoch: int) -> DataLoader:
        pipeline = epoch_pipeline(
            self.urls,
            self.decoder,
            int(self.cfg.batch_size),
            epoch,
            seed=self.seed,
            shuffle_buffer=int(self.cfg.shuffle_buffer),
        )
        workers = int(self.cfg.num_workers)
        # Its own generator: creating an iterator must not draw from the global RNG, which the
        # training step's noise comes from (and which a resumed run restores).
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            generator=generator,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if workers else None,
        )

    def train_dataloader(self) -> EpochStream:
        return EpochStream(self._epoch_loader, start=self.resume_position)

    # Lightning stores this in every checkpoint and hands it back on resume, before train_dataloader().
    def state_dict(self) -> dict:
        module = self.trainer.lightning_module if self.trainer is not None else None
        position = getattr(module, "data_position", self.resume_position)
        return {"data_position": list(position)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_position = tuple(state_dict.get("data_position", (0, -1)))


def validation_samples(val_cfg: DictConfig, data_cfg: DictConfig, hint_channels: int) -> tuple[list[str], torch.Tensor]:
    """Fixed (prompts, hints) for validation: explicit ``samples`` ({prompt, hint: path}) or the
    first ``num_samples`` of ``shards``, read in order."""
    resolution = int(data_cfg.resolution)
    if val_cfg.get("samples"):
        prompts, hints = [], []
        for i, item in enumerate(val_cfg.samples):
            path = Path(item.hint)
            if not path.is_file():
                raise FileNotFoundError(f"validation.samples[{i}].hint: no file {path}")
            prompts.append(str(item.prompt))
            hints.append(prepare_hint(Image.open(path), resolution, hint_channels))
        return prompts, torch.stack(hints)
    if not val_cfg.get("shards") or int(val_cfg.num_samples) <= 0:
        return [], torch.empty(0)
    decoder = make_decoder(data_cfg, hint_channels)
    source = wds.DataPipeline(
        wds.SimpleShardList(expand_shards(val_cfg.shards)), wds.tarfile_to_samples(), wds.map(decoder)
    )
    samples = [s for _, s in zip(range(int(val_cfg.num_samples)), source)]
    return [s["caption"] for s in samples], torch.stack([s["hint"] for s in samples])
