"""Control-LoRA mode (``adapter.type=control_lora``): a ControlNet copied from the locked UNet's encoder
stays frozen in the locked dtype; a LoRA on its layers (``adapter.target_modules``, rank ``adapter.rank``)
trains at ``adapter.lr``, its hint embedding and zero convolutions in full at ``optim.lr``. Exports
run_dir/control_lora (what differs from the base) and run_dir/controlnet (the LoRA merged: a plain
diffusers ControlNet that ``controlnet-generate`` and ``controlnet-eval`` read)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.io import human_bytes
from nemo_controlnet.models.control_lora import (
    DEFAULT_TARGETS,
    add_control_lora,
    base_identity,
    counts,
    full_part_parameters,
    lora_parameters,
    merge_control_lora,
    save_control_lora,
)
from nemo_controlnet.training.distributed import is_fsdp
from nemo_controlnet.training.modes.controlnet import ControlNetMode

log = logging.getLogger(__name__)


class ControlLoraMode(ControlNetMode):
    name = "control_lora"

    def __init__(self, adapter: DictConfig | None = None, controlnet: DictConfig | None = None):
        if not adapter or adapter.get("type") != "control_lora":
            raise ValueError("training_mode=control_lora needs the adapter block with adapter.type=control_lora "
                             "(rank, alpha, target_modules); +experiment=control_lora has one")  # fmt: skip
        super().__init__(adapter, controlnet)
        a = adapter
        self.rank, self.alpha = int(a.rank), float(a.get("alpha") or a.rank)
        self.targets = list(a.get("target_modules") or DEFAULT_TARGETS)
        self.dropout = float(a.get("dropout") or 0.0)
        self.base = None  # the base UNet's identity, taken before it is frozen (build)

    def check_family(self, family) -> None:
        if not family.control_lora:
            raise ValueError(f"training_mode=control_lora: not available for the {family.name} family (it "
                             "updates a copy of a UNet's encoder); train its ControlNet instead")  # fmt: skip

    def build(self, module) -> None:
        if not module.sd_locked:
            raise ValueError("training_mode=control_lora trains a low-rank update of a copy of the locked UNet's "
                             "encoder: keep model.sd_locked=true")  # fmt: skip
        stage = module.model_cfg.get("control_stage_config")
        if not stage:
            raise ValueError("training_mode=control_lora needs model.control_stage_config (the ControlNet's hint "
                             "embedding: conditioning_embedding_out_channels)")  # fmt: skip
        if stage.get("pretrained"):
            raise ValueError(f"model.control_stage_config.pretrained={stage.pretrained}: a Control-LoRA copies the "
                             "locked UNet's encoder; leave it null")  # fmt: skip
        self.base = base_identity(module.unet)  # as built from config, before freezing casts it
        module.controlnet = module.family.make_controlnet(module.model_cfg, module)

    def unlock(self, module) -> None:
        add_control_lora(module.controlnet, self.rank, self.alpha, self.targets, self.dropout, module.locked_dtype)
        n = counts(module.controlnet)
        log.info("control_lora: rank %d (alpha %g) on %s: %d LoRA + %d hint embedding/zero conv parameters = %d "
                 "trainable, %.2f%% of the full ControlNet's %d", self.rank, self.alpha, self.targets, n["lora"],
                 n["hint_and_zero_convs"], n["trainable"], 100 * n["trainable"] / n["full_controlnet"],
                 n["full_controlnet"])  # fmt: skip

    def on_fit_start(self, module) -> None:
        if is_fsdp(module.trainer.strategy):  # full_controlnet rebuilds a plain ControlNet from the shards' keys
            raise NotImplementedError("training_mode=control_lora under FSDP: not supported yet (its ControlNet "
                                      "carries peft layers); use trainer=gpu or ddp_bf16")  # fmt: skip

    def set_train(self, module, mode: bool) -> None:
        module.controlnet.train(mode)  # the LoRA's dropout; the frozen copy has none

    def describe(self, module) -> str:
        n = counts(module.controlnet)
        return (f"control_lora rank {self.rank} ({n['trainable'] / 1e6:.3f}M parameters, "
                f"{100 * n['trainable'] / n['full_controlnet']:.1f}% of the ControlNet)")  # fmt: skip

    def param_groups(self, module, optim: DictConfig) -> list[dict]:
        return [
            {"params": lora_parameters(module.controlnet), "lr": float(self.adapter_cfg.get("lr") or optim.lr),
             "name": "control_lora_adapter", "role": "adapter"},
            {"params": full_part_parameters(module.controlnet), "lr": float(optim.lr), "name": "controlnet",
             "role": "controlnet"},
        ]  # fmt: skip

    def checkpoint_meta(self, module) -> dict:
        return {"adapter": "control_lora", "controlnet_finetuned": False,
                "control_lora": {"rank": self.rank, "alpha": self.alpha, "target_modules": self.targets}}  # fmt: skip

    def file_config(self, module) -> dict:
        """What control_lora.json and the file's header record."""
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": self.targets, "dropout": self.dropout,
                "base_fingerprint": module.base_fingerprint, "base": self.base,
                "parameters": counts(module.controlnet)}  # fmt: skip

    def export(self, module, run_dir: Path, metadata: dict, export_cfg: DictConfig, controlnet=None) -> Path:
        """run_dir/control_lora (control_lora.safetensors + control_lora.json: ``load_control_lora``) and
        run_dir/controlnet, the LoRA merged (and, with ``export.original``, the original single file)."""
        controlnet = module.controlnet if controlnet is None else controlnet
        metadata["adapter"] = OmegaConf.to_container(self.adapter_cfg, resolve=True)
        small = save_control_lora(controlnet, run_dir / "control_lora", self.file_config(module), metadata)
        merged = merge_control_lora(controlnet)
        module.family.configure_controlnet(merged, module.model_cfg)  # only_mid_control, as the trained one
        out = super().export(module, run_dir, metadata, export_cfg, controlnet=merged)
        full = out / "diffusion_pytorch_model.safetensors"
        a, b = small.stat().st_size, full.stat().st_size
        log.info("exported the Control-LoRA to %s: %d bytes (%s), %.1f%% of the full ControlNet's %d bytes (%s, "
                 "merged: %s)", small.parent, a, human_bytes(a), 100 * a / b, b, human_bytes(b), out)  # fmt: skip
        return out
