"""Adapter mode: a LoRA/LoKr (peft) on the locked UNet trains under a pretrained ControlNet that is
frozen (``controlnet.train=false``: its residuals are computed without gradients, wherever
``controlnet.offload_strategy`` keeps it) or fine-tuned alongside at ``controlnet.lr``.

``controlnet_reroute``: ``always`` runs the frozen ControlNet every step; ``precompute`` reads its residuals,
with the latents, timestep and noise they were made for, from ``residuals.dir`` (``controlnet-prep
mode=residuals``; ``data/residuals.py`` attaches them to each sample); ``none`` trains without them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.data.residuals import (
    RESIDUAL_STATE,
    ResidualStage,
    batch_residuals,
    check_manifest,
    read_manifest,
    residual_shapes,
)
from nemo_controlnet.models.adapters import ControlResiduals, add_adapter, make_adapter_config, save_lora
from nemo_controlnet.models.formats import export_controlnet
from nemo_controlnet.models.stack import fingerprint, freeze
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
            self.controlnet_fingerprint = fingerprint(module.controlnet)  # as loaded: precomputed residuals name it
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
        if module.residuals is not None:
            if module.residuals.offload == "accelerate" and module.device.type == "cpu":
                # Nothing to offload to; and diffusers' pipelines would take the hooks' meta weights for
                # the pipeline's device. (The hooks themselves are tested: tests/test_adapters.py.)
                log.info("offload_strategy=accelerate on a CPU: the ControlNet stays resident")
                module.residuals.offload = "none"
            module.residuals.place(module.device)  # after Lightning placed the module: offload/swap from here
        if module.reroute == "precompute":
            datamodule = getattr(module.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "map_samples"):
                raise ValueError("controlnet_reroute=precompute reads residuals in the training data module "
                                 "(data/datamodule.py ShardDataModule); this fit has none")  # fmt: skip
            stage = self.residual_stage(module, datamodule.cfg)
            if stage is not None:
                datamodule.map_samples(stage)

    def residual_stage(self, module, data_cfg: DictConfig):
        """The loader stage attaching ``residuals.dir``'s files, after refusing residuals this run cannot use
        (another ControlNet or base, resolution, scale, augmentation; scales of other shapes)."""
        if module.controlnet is None or module.residuals is None:
            raise ValueError("controlnet_reroute=precompute: precomputed residuals are a frozen ControlNet's "
                             "(controlnet.use_controlnet=true, controlnet.train=false)")  # fmt: skip
        opts = module.research.get("residuals") or {}
        if not opts.get("dir"):
            raise ValueError("controlnet_reroute=precompute needs residuals.dir (the out_dir of controlnet-prep "
                             "mode=residuals)")  # fmt: skip
        manifest = read_manifest(opts["dir"])
        check_manifest(manifest, data_cfg, getattr(self, "controlnet_fingerprint", None), module.base_fingerprint,
                       module.control_scale, module.noise_scheduler.config.num_train_timesteps)  # fmt: skip
        on_mismatch = str(opts.get("on_mismatch") or "error")
        with torch.no_grad():
            empty = module.empty_prompt()  # (also once the text encoders are released)
        expected = residual_shapes(module.residuals, module.family, manifest["latent_shape"], int(data_cfg.resolution),
                                   empty, int(module.model_cfg.hint_channels), module.device)  # fmt: skip
        got = manifest["shapes"]
        for name in sorted(set(expected) | set(got), key=lambda n: (n == "mid", n)):
            if expected.get(name) != got.get(name):
                if on_mismatch == "on_the_fly":
                    log.warning("%s: scale %s has shape %s, but this ControlNet gives %s: every step computes the "
                                "residuals (residuals.on_mismatch=on_the_fly)", manifest["path"], name, got.get(name),
                                expected.get(name))  # fmt: skip
                    return None
                raise ValueError(f"{manifest['path']}: scale {name} has shape {got.get(name)}, but this ControlNet "
                                 f"gives {expected.get(name)} ({len(got)} scales stored, {len(expected)} "
                                 "expected)")  # fmt: skip
        log.info("controlnet_reroute=precompute: residuals from %s (K=%d, %d scales, %d samples, on_mismatch=%s)",
                 opts["dir"], manifest["num_timesteps"], len(got), len(manifest.get("samples", [])),
                 on_mismatch)  # fmt: skip
        return lambda decoder: ResidualStage(decoder, opts["dir"], manifest, on_mismatch,
                                             module.proportion_empty_prompts, module.seed)  # fmt: skip

    def latents(self, module, batch):
        """Precomputed residuals bring the latents they were made for: no VAE when every row has its file."""
        state = batch.get(RESIDUAL_STATE)
        if state is not None and "miss" not in state:
            return batch["residual_latents"].float()
        return super().latents(module, batch)

    def drops_captions(self, batch):
        """The loader drew the dropout with the precomputed residuals (cond or uncond): no second draw."""
        return RESIDUAL_STATE not in batch

    def noise(self, module, batch, latents):
        """Precomputed residuals: the stored latents, timestep and noise they were made for (the family's
        draw for rows without a file, under residuals.on_mismatch=on_the_fly)."""
        state = batch.get(RESIDUAL_STATE)
        if state is None:
            return super().noise(module, batch, latents)
        scheduler = module.noise_scheduler  # the manifest's num_train_timesteps was checked against it
        clean, noise = batch["residual_latents"].float(), batch["residual_noise"].float()
        timesteps = batch["residual_timestep"].long()
        noisy = scheduler.add_noise(clean, noise, timesteps)
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = scheduler.get_velocity(clean, noise, timesteps)
        if "miss" in state:
            hit = torch.tensor([s == "hit" for s in state], device=noisy.device)
            drawn_noisy, drawn_t, drawn_target = super().noise(module, batch, latents)
            rows = hit[:, None, None, None]
            noisy, target = torch.where(rows, noisy, drawn_noisy), torch.where(rows, target, drawn_target)
            timesteps = torch.where(hit, timesteps, drawn_t)
        return noisy, timesteps, target

    def describe(self, module) -> str:
        return f"{self.adapter_cfg.type} adapter" + (" + controlnet" if self.controlnet_trains else "")

    def control_residuals(self, module, batch, noisy, timesteps, cond):
        if module.controlnet is None or module.reroute == "none":
            return None  # controlnet_reroute=none: the adapter trains on the base alone, the ControlNet unused
        state = batch.get(RESIDUAL_STATE)
        if state is not None and module.residuals is not None:  # controlnet_reroute=precompute
            return self.precomputed_residuals(module, batch, state, noisy, timesteps, cond)
        hint = batch[module.control_key]
        if module.residuals is None:  # the ControlNet trains too
            return module.family.control_residuals(module.controlnet, noisy, timesteps, cond, hint,
                                                   module.control_scale)  # fmt: skip
        # Frozen: detached residuals, one per UNet skip, on the UNet's device and in its dtype,
        # wherever the ControlNet lives and the residuals waited. A dropped caption keeps its hint:
        # the unconditional pass of classifier-free guidance at sampling time sees the same hint too.
        residuals = module.residuals(module.family, noisy, timesteps, cond, hint, module.control_scale)
        return module.residuals.fetch(residuals, noisy.device, module.unet.dtype)

    def precomputed_residuals(self, module, batch, state: list[str], noisy, timesteps, cond):
        """The batch's stored residuals (the loader chose k and cond/uncond per sample); rows without a file
        (residuals.on_mismatch=on_the_fly) get the ControlNet's, computed now."""
        hits = sum(s == "hit" for s in state)
        log.debug("residual cache: %d hit(s), %d miss(es) in a batch of %d", hits, len(state) - hits, len(state))
        down, mid = batch_residuals(batch)
        if hits < len(state):
            live = module.residuals(module.family, noisy, timesteps, cond, batch[module.control_key],
                                    module.control_scale)  # fmt: skip
            live_down, live_mid = module.residuals.fetch(live, noisy.device, down[0].dtype)
            hit = torch.tensor([s == "hit" for s in state], device=noisy.device)[:, None, None, None]
            down = [torch.where(hit, d, live) for d, live in zip(down, live_down, strict=True)]
            mid = torch.where(hit, mid, live_mid)
        return module.residuals.fetch((down, mid), noisy.device, module.unet.dtype)

    def param_groups(self, module, optim: DictConfig) -> list[dict]:
        adapter = [p for p in module.unet.parameters() if p.requires_grad]
        groups = [{"params": adapter, "lr": float(self.adapter_cfg.get("lr") or optim.lr),
                   "name": f"{self.adapter_cfg.type}_adapter", "role": "adapter"}]  # fmt: skip
        if self.controlnet_trains and module.controlnet is not None:
            groups.append({"params": [p for p in module.controlnet.parameters() if p.requires_grad],
                           "lr": float(self.controlnet_opts.get("lr") or optim.lr), "name": "controlnet",
                           "role": "controlnet"})  # fmt: skip
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
        save_lora(module.unet, out, metadata, module.family.lora_pipeline_class)
        if self.controlnet_trains and module.controlnet is not None:
            export_controlnet(module.controlnet if controlnet is None else controlnet, run_dir / "controlnet", metadata)
        log.info("exported the %s adapter to %s", self.adapter_cfg.type, out)
        return out
