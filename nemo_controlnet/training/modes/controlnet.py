"""ControlNet training, the default mode: a ControlNet copied from (or loaded over) the locked base
trains; with ``model.sd_locked=false`` the base's decoder trains too, at ``optim.unet_lr``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from nemo_controlnet.models.formats import export_controlnet
from nemo_controlnet.training.modes import TrainingMode

log = logging.getLogger(__name__)


class ControlNetMode(TrainingMode):
    name = "controlnet"

    def build(self, module) -> None:
        if not module.model_cfg.get("control_stage_config"):
            raise ValueError("training_mode=controlnet needs model.control_stage_config (the ControlNet to train)")
        module.controlnet = module.family.make_controlnet(module.model_cfg, module)

    def unlock(self, module) -> None:
        if not module.sd_locked:
            for part in module.family.decoder_modules(module):
                part.requires_grad_(True).to(torch.float32).train()

    def set_train(self, module, mode: bool) -> None:
        if not module.sd_locked:
            for part in module.family.decoder_modules(module):
                part.train(mode)

    def describe(self, module) -> str:
        return "controlnet" + ("" if module.sd_locked else " + unet decoder")

    def control_residuals(self, module, batch, noisy, timesteps, cond):
        return module.family.control_residuals(module.controlnet, noisy, timesteps, cond, batch[module.control_key],
                                               module.control_scale)  # fmt: skip

    def param_groups(self, module, optim: DictConfig) -> list[dict]:
        # role (training/schedule.py): the decoder is the ControlNet's partner on the base side, trained with it;
        # a schedule's phases name controlnet | adapter, and this mode trains no adapter
        groups = [{"params": [p for p in module.controlnet.parameters() if p.requires_grad], "lr": optim.lr,
                   "name": "controlnet", "role": "controlnet"}]  # fmt: skip
        if not module.sd_locked:
            decoder = [p for part in module.family.decoder_modules(module) for p in part.parameters()]
            groups.append({"params": decoder, "lr": optim.unet_lr, "name": "unet_decoder", "role": "controlnet"})
        return groups

    def export(self, module, run_dir: Path, metadata: dict, export_cfg: DictConfig, controlnet=None) -> Path:
        """run_dir/controlnet (diffusers, with model card and the newest validation grid) and, with
        ``export.original``, run_dir/control_<run name>.safetensors for A1111 and ComfyUI."""
        controlnet = module.controlnet if controlnet is None else controlnet
        grids = sorted((run_dir / "samples").glob("step_*.png"))
        out = export_controlnet(controlnet, run_dir / "controlnet", metadata,
                                unet=None if module.sd_locked else module.unet,
                                grid=grids[-1] if grids else None)  # fmt: skip
        if export_cfg.get("original") and not module.family.original_layout:
            log.info("export.original: the %s family has no single-file ControlNet layout; the diffusers "
                     "directory is its format", module.family.name)  # fmt: skip
        elif export_cfg.get("original"):
            try:
                module.family.export_original_controlnet(
                    controlnet, run_dir / f"control_{run_dir.resolve().name}.safetensors", export_cfg.dtype
                )
            except ValueError as e:  # the diffusers export above is written; do not fail the run here
                log.error("original-format export skipped: %s", e)
        return out
