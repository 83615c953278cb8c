"""Adapter mode: a LoRA/LoKr (peft) on the locked UNet trains under a pretrained ControlNet that is
frozen (``controlnet.train=false``: its residuals are computed without gradients, wherever
``controlnet.offload_strategy`` keeps it) or fine-tuned alongside at ``controlnet.lr``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.models.adapters import ControlResiduals, add_adapter, make_adapter_config, save_lora
from nemo_controlnet.models.formats import export_controlnet
from nemo_controlnet.models.stack import freeze
from nemo_controlnet.training.modes import TrainingMode

log = logging.getLogger(__name__)


class AdapterMode(TrainingMode):
    name = "adapter"

    def __init__(self, adapter: DictConfig | None = None, controlnet: DictConfig | None = None):
        if not adapter:
            raise ValueError("training_mode=adapter needs the adapter block (adapter.type, rank, alpha, "
                             "target_modules); +experiment=lora_frozen_controlnet has one")  # fmt: skip
        super().__init__(adapter, controlnet)
        self.controlnet_trains = bool(self.controlnet_opts.get("train", False))

    def build(self, module) -> None:
        if module.model_cfg.get("control_stage_config"):
            module.controlnet = module.family.make_controlnet(module.model_cfg, module)
        elif self.controlnet_opts.get("use_controlnet", True):
            raise ValueError("adapter mode with controlnet.use_controlnet=true needs model.control_stage_config "
                             "(the pretrained ControlNet: controlnet.name_or_path)")  # fmt: skip
        if not module.sd_locked:
            raise ValueError("adapter mode trains an adapter on the locked UNet: keep model.sd_locked=true")

    def unlock(self, module) -> None:
        a, c = self.adapter_cfg, self.controlnet_opts
        frozen = module.controlnet is not None and not self.controlnet_trains
        if frozen:
            freeze(module.controlnet, module.locked_dtype)
        add_adapter(module.unet, make_adapter_config(a.type, int(a.rank), float(a.alpha), list(a.target_modules),
                                                     float(a.get("dropout", 0.0))))  # fmt: skip
        if frozen:
            module.residuals = ControlResiduals(module.controlnet, c.get("offload_strategy", "none"),
                                                c.get("residual_storage", "gpu"))  # fmt: skip
        log.info("adapter mode: %s rank %s on the UNet; ControlNet %s (offload %s, residuals on %s)", a.type, a.rank,
                 "trains too" if self.controlnet_trains else "frozen (controlnet.train=false)",
                 c.get("offload_strategy", "none"), c.get("residual_storage", "gpu"))  # fmt: skip

    def set_train(self, module, mode: bool) -> None:
        module.unet.train(mode)  # the adapter's dropout; SD's UNet itself has none
        if module.residuals is not None:
            module.controlnet.eval()  # frozen

    def on_fit_start(self, module) -> None:
        if module.residuals is None:
            return
        if module.residuals.offload == "accelerate" and module.device.type == "cpu":
            # Nothing to offload to; and diffusers' pipelines would take the hooks' meta weights for
            # the pipeline's device. (The hooks themselves are tested: tests/test_adapters.py.)
            log.info("offload_strategy=accelerate on a CPU: the ControlNet stays resident")
            module.residuals.offload = "none"
        module.residuals.place(module.device)  # after Lightning placed the module: offload/swap from here

    def describe(self, module) -> str:
        return f"{self.adapter_cfg.type} adapter" + (" + controlnet" if self.controlnet_trains else "")

    def control_residuals(self, module, batch, noisy, timesteps, cond):
        if module.controlnet is None:
            return None
        hint = batch[module.control_key]
        if module.residuals is None:  # the ControlNet trains too
            return module.family.control_residuals(module.controlnet, noisy, timesteps, cond, hint,
                                                   module.control_scale)  # fmt: skip
        # Frozen: detached residuals, one per UNet skip, on the UNet's device and in its dtype,
        # wherever the ControlNet lives and the residuals waited. A dropped caption keeps its hint:
        # the unconditional pass of classifier-free guidance at sampling time sees the same hint too.
        with torch.no_grad():
            down, mid = module.residuals(noisy, timesteps, cond["encoder_hidden_states"], hint, module.control_scale,
                                         cond["added_cond_kwargs"])  # fmt: skip
        return module.residuals.fetch(down, mid, noisy.device, module.unet.dtype)

    def param_groups(self, module, optim: DictConfig) -> list[dict]:
        adapter = [p for p in module.unet.parameters() if p.requires_grad]
        groups = [{"params": adapter, "lr": float(self.adapter_cfg.get("lr") or optim.lr),
                   "name": f"{self.adapter_cfg.type}_adapter"}]  # fmt: skip
        if self.controlnet_trains and module.controlnet is not None:
            groups.append({"params": [p for p in module.controlnet.parameters() if p.requires_grad],
                           "lr": float(self.controlnet_opts.get("lr") or optim.lr), "name": "controlnet"})  # fmt: skip
        return groups

    def checkpoint_meta(self, module) -> dict:
        return {"adapter": self.adapter_cfg.type, "controlnet_finetuned": self.controlnet_trains}

    def export(self, module, run_dir: Path, metadata: dict, export_cfg: DictConfig, controlnet=None) -> Path:
        """run_dir/lora (diffusers LoRA format) with the run's metadata; the ControlNet too if it trained."""
        opts = self.controlnet_opts
        metadata["adapter"] = OmegaConf.to_container(self.adapter_cfg, resolve=True)
        metadata["controlnet"] = {
            "name_or_path": opts.get("name_or_path"), "finetuned": self.controlnet_trains,
            "offload_strategy": opts.get("offload_strategy"), "residual_storage": opts.get("residual_storage"),
            "hint": {k: opts.get(k) for k in ("type", "canny_threshold1", "canny_threshold2", "blur", "control_size")},
        }  # fmt: skip
        out = run_dir / "lora"
        save_lora(module.unet, out, metadata)
        if self.controlnet_trains and module.controlnet is not None:
            export_controlnet(module.controlnet if controlnet is None else controlnet, run_dir / "controlnet", metadata)
        log.info("exported the %s adapter to %s", self.adapter_cfg.type, out)
        return out
