"""Base training: no ControlNet; the base model itself trains, text to image (pretraining a small
base, as examples/fill50k does, for a ControlNet to train over later)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from nemo_controlnet.models.formats import export_base
from nemo_controlnet.training.modes import TrainingMode


class BaseMode(TrainingMode):
    name = "base"

    def locked_modules(self, module) -> list[torch.nn.Module]:
        return [m for m in (module.vae, module.text_encoder, module.text_encoder_2) if m is not None]

    def unlock(self, module) -> None:
        module.unet.requires_grad_(True).to(torch.float32).train()

    def set_train(self, module, mode: bool) -> None:
        module.unet.train(mode)

    def describe(self, module) -> str:
        return "unet (base training, no ControlNet)"

    def param_groups(self, module, optim: DictConfig) -> list[dict]:
        return [{"params": list(module.unet.parameters()), "lr": optim.lr, "name": "unet"}]

    def export(self, module, run_dir: Path, metadata: dict, export_cfg: DictConfig, controlnet=None) -> Path:
        """run_dir/base: a diffusers directory of the trained base, with the training scheduler."""
        pipe = module.family.pipeline(module, None, "ddim")
        pipe.scheduler = module.noise_scheduler  # the training scheduler, as a base directory carries it
        return export_base(pipe, run_dir / "base", metadata)
