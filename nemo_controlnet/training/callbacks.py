"""Callbacks: step checkpoints kept last-K, and validation image grids (hint | sample)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from nemo_controlnet.inference.pipeline import controlnet_pipeline, grid, hint_to_uint8, sample
from nemo_controlnet.io import atomic_path
from nemo_controlnet.training.checkpoint import checkpoint_name, list_checkpoints

log = logging.getLogger(__name__)


class _EveryNOptimizerSteps(L.Callback):
    """Fires right after every N-th optimizer step (never mid-accumulation), and at the end."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._step_at_batch_start = -1
        self._last_fired = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        stepped = step != self._step_at_batch_start  # an optimizer step happened in this batch
        if stepped and self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self._fire(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        self._fire(trainer, pl_module, trainer.global_step)

    def _fire(self, trainer, pl_module, step: int) -> None:
        if step != self._last_fired:
            self._last_fired = step
            self.fire(trainer, pl_module, step)

    def fire(self, trainer, pl_module, step: int) -> None:
        raise NotImplementedError


class StepCheckpoint(_EveryNOptimizerSteps):
    """``checkpoints/step=NNNNNNN.ckpt`` every N steps and at the end; keeps the newest ``keep_last``.

    Names carry the step so the newest complete checkpoint is found by name alone.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_last: int = 2):
        super().__init__(every_n_steps)
        self.dirpath = Path(dirpath)
        self.keep_last = keep_last

    def fire(self, trainer, pl_module, step: int) -> None:
        path = self.dirpath / checkpoint_name(step)
        if step == 0 or path.exists():
            return
        trainer.save_checkpoint(path, weights_only=False)  # every rank calls it; the strategy writes on rank 0
        if trainer.is_global_zero and self.keep_last > 0:
            for _, old in list_checkpoints(self.dirpath)[: -self.keep_last]:
                old.unlink(missing_ok=True)
                log.info("removed old checkpoint %s", old)


class ValidationImages(_EveryNOptimizerSteps):
    """Samples the fixed validation prompts and hints with the training modules themselves.

    Runs under no_grad in eval mode and the compute dtype, restores train mode and the RNG state
    afterwards, and writes ``samples/step_NNNNNNN.png`` with one row per sample: hint | image.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prompts: list[str],
        hints: torch.Tensor,
        every_n_steps: int,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        seed: int = 0,
        sampler: str = "unipc",
    ):
        super().__init__(every_n_steps)
        self.out_dir = Path(out_dir)
        self.prompts, self.hints = list(prompts), hints
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.seed, self.sampler = seed, sampler

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:  # the untrained baseline, to compare later grids with
            self._fire(trainer, pl_module, 0)

    def fire(self, trainer, pl_module, step: int) -> None:
        if not trainer.is_global_zero or not self.prompts:
            return
        start = time.time()
        was_training = pl_module.training
        pl_module.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                pipe = controlnet_pipeline(
                    pl_module.unet,
                    pl_module.controlnet,
                    pl_module.vae,
                    pl_module.text_encoder,
                    pl_module.tokenizer,
                    pl_module.noise_scheduler.config,
                    self.sampler,
                    pl_module.text_encoder_2,
                    pl_module.tokenizer_2,
                )
                images = sample(
                    pipe,
                    self.prompts,
                    self.hints,
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale,
                    control_scale=pl_module.control_scale,
                    seed=self.seed,
                    dtype=pl_module.locked_dtype,
                )
        finally:
            pl_module.train(was_training)
        picture = grid([[hint_to_uint8(h), img] for h, img in zip(self.hints, images, strict=True)])
        path = self.out_dir / f"step_{step:07d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_image("validation/hint_sample", picture, step, dataformats="HWC")
        seconds = time.time() - start
        if trainer.logger is not None:
            trainer.logger.log_metrics({"validation/seconds": seconds}, step=step)
        log.info("validation grid %s (%d samples, %.1fs)", path, len(self.prompts), seconds)
