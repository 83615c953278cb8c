"""Validation while training: every N optimizer steps, sample the validation hints with the current
ControlNet (each rank a slice), write the grid (hint | images per row), score hint-following, log both."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from nemo_controlnet.eval.metrics import mean_metrics, sample_metrics
from nemo_controlnet.inference.pipeline import grid, hint_to_uint8, sample
from nemo_controlnet.io import atomic_path
from nemo_controlnet.training.distributed import full_controlnet
from nemo_controlnet.training.callbacks import EveryNOptimizerSteps

log = logging.getLogger(__name__)


class ValidationImages(EveryNOptimizerSteps):
    """Samples the fixed validation prompts and hints with the training modules themselves.

    Runs under no_grad in eval mode and the compute dtype, restores train mode and the RNG state
    afterwards, and writes ``samples/step_NNNNNNN.png`` with one row per sample: hint | image, or
    hint | ``num_images`` images (diffusers' ``--num_validation_images``), image ``j`` of sample ``i``
    seeded ``seed + i + j * len(prompts)`` (image 0: ``seed + i`` whatever ``num_images``).
    With several ranks each samples every world-th image (seeded per image, so an image does not
    depend on the number of ranks) and rank 0 gathers and writes the grid.

    Rank 0 then scores the images against their hints (``eval/metrics.py``: edge F1, SSIM, and the
    shapes' ground-truth IoU and colour errors when ``metas`` carry them), logs the means as
    ``validation/<metric>`` and appends them to ``samples/metrics.jsonl``: the hint-following curve.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prompts: list[str],
        hints: torch.Tensor,
        every_n_steps: int,
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        seed: int = 0,
        sampler: str = "unipc",
        metas: list[dict] | None = None,
        guess_mode: bool = False,
        num_images: int = 1,
    ):
        super().__init__(every_n_steps)
        self.out_dir = Path(out_dir)
        self.prompts, self.hints = list(prompts), hints
        self.metas = list(metas) if metas else [{} for _ in self.prompts]
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.seed, self.sampler = seed, sampler
        self.last_metrics: dict = {}  # the newest means, with their step (for the model card)
        self.guess_mode = guess_mode
        self.num_images = max(1, int(num_images))

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:  # the untrained baseline, to compare later grids with
            self._fire(trainer, pl_module, 0)

    def _gather(self, trainer, pl_module, images, n: int):
        """Every rank's slice to every rank (padded to one size), back in the images' order."""
        world = trainer.world_size
        h, w = self.hints.shape[-2:]
        padded = torch.zeros(-(-n // world), h, w, 3, dtype=torch.uint8, device=pl_module.device)
        if images is not None:
            padded[: len(images)] = torch.from_numpy(images).to(pl_module.device)
        gathered = trainer.strategy.all_gather(padded)  # (world, per rank, h, w, 3)
        return [gathered[i % world, i // world].cpu().numpy() for i in range(n)]

    def fire(self, trainer, pl_module, step: int) -> None:
        if not self.prompts:
            return
        start = time.time()
        n, world, rank = len(self.prompts), trainer.world_size, trainer.global_rank
        total = n * self.num_images  # image k: sample k % n, its (k // n)-th image, seed + k
        mine = list(range(rank, total, world))  # each rank samples a slice; rank 0 assembles the grid
        was_training = pl_module.training
        pl_module.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                # A plain ControlNet (under FSDP: gathered on every rank; a collective, so before
                # any rank may skip sampling).
                controlnet = full_controlnet(trainer, pl_module, everywhere=True)
                pipe = pl_module.family.pipeline(pl_module, controlnet, self.sampler)
                prompts = [self.prompts[k % n] for k in mine]
                images = sample(
                    pipe, prompts, self.hints[[k % n for k in mine]],
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=pl_module.family.default_guidance_scale if self.guidance_scale is None
                    else self.guidance_scale,
                    control_scale=pl_module.control_scale, seed=[self.seed + k for k in mine],
                    dtype=pl_module.locked_dtype, guess_mode=self.guess_mode,
                    prompt_embeds=pl_module.validation_text(prompts),  # None: the pipeline encodes them
                ) if mine else None  # fmt: skip
        finally:
            pl_module.train(was_training)
        if world > 1:
            images = self._gather(trainer, pl_module, images, total)
        if not trainer.is_global_zero:
            return
        hints = [hint_to_uint8(h) for h in self.hints]
        picture = grid([[hints[i], *(images[i + j * n] for j in range(self.num_images))] for i in range(n)])
        path = self.out_dir / f"step_{step:07d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("validation/hint_sample", picture, step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image("validation/hint_sample", [picture], step=step)
        scores = mean_metrics([sample_metrics(img, hints[k % n], self.metas[k % n]) for k, img in enumerate(images)])
        self.last_metrics = {"step": step, **scores}
        self._append_metrics(self.last_metrics)
        seconds = time.time() - start
        logged = {"validation/seconds": seconds, **{f"validation/{k}": v for k, v in scores.items()}}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        log.info("validation grid %s (%d samples x %d images, %.1fs): %s", path, n, self.num_images, seconds,
                 ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))  # fmt: skip

    def _append_metrics(self, row: dict) -> None:
        path = self.out_dir / "metrics.jsonl"
        previous = path.read_text() if path.is_file() else ""
        with atomic_path(path) as tmp:
            tmp.write_text(previous + json.dumps(row, sort_keys=True) + "\n")
