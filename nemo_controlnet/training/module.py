"""The LightningModule: a trainable ControlNet over a locked Stable Diffusion."""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from hydra.utils import instantiate
from omegaconf import DictConfig

from nemo_controlnet.data.transforms import normalize_batch
from nemo_controlnet.training.distributed import clean_name, is_fsdp
from nemo_controlnet.models.adapters import ControlResiduals, add_adapter, make_adapter_config
from nemo_controlnet.models.controlnet import controlled_unet_forward, set_only_mid_control, unet_decoder_modules
from nemo_controlnet.models.stack import (
    build_stack,
    compute_dtype,
    encode_prompts,
    encoder_fingerprint,
    fingerprint,
    freeze,
)

log = logging.getLogger(__name__)

CHECKPOINT_META = "nemo_controlnet"


class ControlNetModule(L.LightningModule):
    def __init__(
        self,
        model_cfg: DictConfig,
        optim_cfg: DictConfig,
        precision: str | int = 32,
        seed: int = 0,
        adapter_cfg: DictConfig | None = None,
        controlnet_cfg: DictConfig | None = None,
    ):
        super().__init__()
        self.model_cfg, self.optim_cfg = model_cfg, optim_cfg
        self.sd_locked = bool(model_cfg.sd_locked)
        self.control_key = model_cfg.control_key
        self.control_scale = float(model_cfg.control_scale)
        self.proportion_empty_prompts = float(model_cfg.proportion_empty_prompts)
        self.locked_dtype = compute_dtype(precision)

        stack = build_stack(model_cfg)
        self.unet, self.vae, self.text_encoder = stack.unet, stack.vae, stack.text_encoder
        self.tokenizer, self.noise_scheduler = stack.tokenizer, stack.noise_scheduler
        self.text_encoder_2, self.tokenizer_2 = stack.text_encoder_2, stack.tokenizer_2
        self.prediction_type = self.noise_scheduler.config.prediction_type
        # Identity of the base as built from config, before any of it trains.
        self.base_fingerprint = fingerprint(self.unet, self.vae, *stack.text_encoders())
        self.encoder_fingerprint = encoder_fingerprint(self.vae, *stack.text_encoders())  # cached latents' check
        # No ControlNet in the config: the UNet itself trains (pretraining a base; examples/fill50k).
        self.base_training = not model_cfg.get("control_stage_config")
        self.controlnet = None
        if not self.base_training:
            self.controlnet = instantiate(
                model_cfg.control_stage_config, unet=self.unet, hint_channels=int(model_cfg.hint_channels)
            )
            set_only_mid_control(self.controlnet, bool(model_cfg.only_mid_control))

        for module in self.locked_modules():
            freeze(module, self.locked_dtype)
        if self.base_training:
            self.unet.requires_grad_(True).to(torch.float32).train()
        elif not self.sd_locked:
            for module in unet_decoder_modules(self.unet):
                module.requires_grad_(True).to(torch.float32).train()
        # Adapter mode: a LoRA/LoKr on the locked UNet under a frozen (pretrained) ControlNet.
        self.adapter_cfg, self.controlnet_opts = adapter_cfg, controlnet_cfg or {}
        self.controlnet_trains = not self.adapter_cfg or bool(self.controlnet_opts.get("train", False))
        self.residuals = None
        if self.adapter_cfg:
            self._setup_adapter_mode()
        trainable = "unet (base training, no ControlNet)" if self.base_training else "controlnet"
        if self.adapter_cfg:
            trainable = f"{self.adapter_cfg.type} adapter" + (" + controlnet" if self.controlnet_trains else "")
        log.info("locked parts in %s; trainable: %s%s", self.locked_dtype, trainable,
                 "" if self.sd_locked or self.base_training else " + unet decoder")  # fmt: skip
        # Checkpoints hold only the trainable weights; the locked ones come from the config.
        self.strict_loading = False
        self.data_position: tuple[int, int] = (0, -1)
        self._first_batch_logged = False
        self._empty_prompt = None  # the empty caption's embeddings, for dropout with cached embeddings
        self.seed = seed
        self.channels_last = False  # set by training.perf.apply_performance
        self.lr_scale = 1.0  # optim.scale_lr: the effective batch

    def _setup_adapter_mode(self) -> None:
        a, c = self.adapter_cfg, self.controlnet_opts
        if self.base_training and c.get("use_controlnet", True):
            raise ValueError("adapter mode with controlnet.use_controlnet=true needs model.control_stage_config "
                             "(the pretrained ControlNet: controlnet.name_or_path)")  # fmt: skip
        if not self.sd_locked:
            raise ValueError("adapter mode trains an adapter on the locked UNet: keep model.sd_locked=true")
        self.base_training = False  # the UNet itself stays locked; only the adapter trains
        freeze(self.unet, self.locked_dtype)
        if self.controlnet is not None and not self.controlnet_trains:
            freeze(self.controlnet, self.locked_dtype)
        add_adapter(self.unet, make_adapter_config(a.type, int(a.rank), float(a.alpha), list(a.target_modules),
                                                   float(a.get("dropout", 0.0))))  # fmt: skip
        if self.controlnet is not None and not self.controlnet_trains:
            self.residuals = ControlResiduals(self.controlnet, c.get("offload_strategy", "none"),
                                              c.get("residual_storage", "gpu"))  # fmt: skip
        log.info("adapter mode: %s rank %s on the UNet; ControlNet %s (offload %s, residuals on %s)", a.type, a.rank,
                 "trains too" if self.controlnet_trains else "frozen (controlnet.train=false)",
                 c.get("offload_strategy", "none"), c.get("residual_storage", "gpu"))  # fmt: skip

    def on_fit_start(self) -> None:
        if self.residuals is None:
            return
        if self.residuals.offload == "accelerate" and self.device.type == "cpu":
            # Nothing to offload to; and diffusers' pipelines would take the hooks' meta weights for
            # the pipeline's device. (The hooks themselves are tested: tests/test_adapters.py.)
            log.info("offload_strategy=accelerate on a CPU: the ControlNet stays resident")
            self.residuals.offload = "none"
        self.residuals.place(self.device)  # after Lightning placed the module: offload/swap from here

    # -- parameters ------------------------------------------------------------------------
    def locked_modules(self) -> list[torch.nn.Module]:
        unet = None if self.base_training else self.unet
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2, unet) if m is not None]

    def trainable_named_parameters(self) -> dict[str, torch.nn.Parameter]:
        # Names as checkpoints store them, also when FSDP or checkpointing wrappers sit in the path.
        return {clean_name(n): p for n, p in self.named_parameters() if p.requires_grad}

    def unet_decoder_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in unet_decoder_modules(self.unet) for p in m.parameters()]

    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode; the locked parts stay in eval.
        super().train(mode)
        for module in self.locked_modules():
            module.eval()
        if self.base_training or getattr(self, "adapter_cfg", None):
            self.unet.train(mode)  # (adapter mode: the adapter's dropout; SD's UNet itself has none)
        elif not self.sd_locked:
            for module in unet_decoder_modules(self.unet):
                module.train(mode)
        if getattr(self, "residuals", None) is not None:
            self.controlnet.eval()  # frozen
        return self

    # -- the step --------------------------------------------------------------------------
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_prompts(self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2, captions)

    def cached_prompts(self, batch: dict, drop_captions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cached text embeddings, with caption dropout done by swapping in the empty prompt's."""
        # Stored in float16: run in the locked parts' dtype, as freshly encoded ones would be.
        states, pooled = batch["text_embeds"].to(self.locked_dtype), batch.get("pooled_text_embeds")
        pooled = pooled.to(self.locked_dtype) if pooled is not None else None
        if drop_captions and self.proportion_empty_prompts > 0:
            drop_cpu = torch.rand(states.shape[0]) < self.proportion_empty_prompts  # decided on the host: no sync
            if drop_cpu.any():
                drop = drop_cpu.to(states.device)
                if self._empty_prompt is None:
                    self._empty_prompt = self.encode_prompts([""])
                empty_states, empty_pooled = self._empty_prompt
                states = torch.where(drop[:, None, None], empty_states.to(states.dtype), states)
                if pooled is not None:
                    pooled = torch.where(drop[:, None], empty_pooled.to(pooled.dtype), pooled)
        return states, pooled

    def text_conditioning(self, batch: dict, drop_captions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's text embeddings (and SDXL's pooled ones): cached in the batch, or encoded now."""
        if "text_embeds" in batch:  # cached: the text encoders are not run
            return self.cached_prompts(batch, drop_captions)
        captions = self.drop_captions(batch["caption"]) if drop_captions else list(batch["caption"])
        return self.encode_prompts(captions)

    @torch.no_grad()
    def compute_control_residuals(
        self, batch: dict, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None, added_cond_kwargs: dict | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
        """Adapter mode: the frozen ControlNet's residuals for this step, detached, one per UNet skip
        (12 down + 1 mid for SD 1.5), on the UNet's device and in its dtype, wherever the ControlNet
        lives (``controlnet.offload_strategy``) and the residuals waited (``residual_storage``).

        The text conditioning is the step's (caption dropout already applied); without it, the batch's
        captions are encoded as they are. A dropped caption keeps its hint: the unconditional pass of
        classifier-free guidance at sampling time sees the same hint too (diffusers' pipelines)."""
        if self.residuals is None:
            raise RuntimeError("compute_control_residuals: only in adapter mode with a frozen ControlNet "
                               "(adapter: block, controlnet.train=false)")  # fmt: skip
        if encoder_hidden_states is None:
            encoder_hidden_states, pooled = self.text_conditioning(batch, drop_captions=False)
            added_cond_kwargs = self.micro_conditioning(batch, pooled, noisy_latents)
        down, mid = self.residuals(noisy_latents, timesteps, encoder_hidden_states, batch[self.control_key],
                                   self.control_scale, added_cond_kwargs)  # fmt: skip
        return self.residuals.fetch(down, mid, noisy_latents.device, self.unet.dtype)

    def micro_conditioning(
        self, batch: dict, pooled: torch.Tensor | None, latents: torch.Tensor | None = None
    ) -> dict | None:
        """SDXL's added conditions: pooled text and (original size, crop top-left, target size)."""
        if pooled is None:
            return None
        if "image" in batch:
            b, _, h, w = batch["image"].shape
        else:  # cached latents: the target size is the latent grid times the VAE's factor
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            b, h, w = latents.shape[0], latents.shape[-2] * factor, latents.shape[-1] * factor
        # Built where the batch is: no device-to-host copy (and sync) in the step.
        device = pooled.device
        size = torch.tensor([h, w], device=device).expand(b, 2)
        original = batch.get("original_size", size).to(device)
        crop = batch.get("crop_top_left", torch.zeros(b, 2, dtype=torch.long, device=device)).to(device)
        time_ids = torch.cat([original, crop, size], dim=1).to(pooled.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def drop_captions(self, captions: list[str]) -> list[str]:
        if self.proportion_empty_prompts <= 0:
            return list(captions)
        drop = torch.rand(len(captions)) < self.proportion_empty_prompts
        return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]

    def diffusion_loss(self, batch: dict, drop_captions: bool = True) -> torch.Tensor:
        """The loss of diffusers' ControlNet example: noise, uniform timesteps, MSE on the target."""
        hint = batch[self.control_key]
        with torch.no_grad():
            # fp32 from here: noise and target keep full precision even when the VAE runs in bf16.
            if "latent_dist" in batch:  # cached posterior (controlnet-prep mode=encode): sampled as online
                posterior = DiagonalGaussianDistribution(batch["latent_dist"].float())
                latents = posterior.sample() * self.vae.config.scaling_factor
            elif "latents" in batch:  # cached and already scaled: the VAE encoder is not run
                latents = batch["latents"].float()
            else:
                image = batch["image"].to(self.locked_dtype)
                latents = self.vae.encode(image).latent_dist.sample().float() * self.vae.config.scaling_factor
            encoder_hidden_states, pooled = self.text_conditioning(batch, drop_captions)
            added_cond_kwargs = self.micro_conditioning(batch, pooled, latents)
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            latents = latents.contiguous(memory_format=layout)
        # Not randn_like: that fills in memory order, so the noise would depend on the latents'
        # layout (channels_last, or the strided view the VAE returns), not only on the seed.
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        )
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.residuals is not None:  # frozen ControlNet: detached residuals, then the UNet with its adapter
            down, mid = self.compute_control_residuals(batch, noisy_latents, timesteps, encoder_hidden_states,
                                                       added_cond_kwargs)  # fmt: skip
            dtype = self.unet.dtype
            pred = self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=encoder_hidden_states.to(dtype),
                             down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]  # fmt: skip
        else:
            pred = controlled_unet_forward(
                self.unet, self.controlnet, noisy_latents, timesteps, encoder_hidden_states, hint,
                self.control_scale, added_cond_kwargs,
            )  # fmt: skip
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"model.prediction_type={self.prediction_type!r}: use epsilon or v_prediction")
        return F.mse_loss(pred.float(), target.float())

    def on_train_start(self) -> None:
        # Every rank was seeded alike (the same random init everywhere); noise must differ per
        # rank. Rank 0 keeps its stream, so a single-process resume stays exact.
        if self.global_rank > 0:
            torch.manual_seed(self.seed + 7919 * self.global_rank + self.trainer.global_step)
        for name in ("controlnet", "unet", "vae", "text_encoder"):
            module = getattr(self, name)
            if module is not None:
                log.info("%s on %s in %s", name, module.device, module.dtype)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # The loader sends uint8; the floats of the contract are made here, on the device.
        batch = normalize_batch(batch, self.control_key)
        if self.channels_last:
            for key in ("image", self.control_key, "latents", "latent_dist"):
                if key in batch:
                    batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if not self._first_batch_logged:
            self._first_batch_logged = True
            log.info(
                "first batch: %s",
                ", ".join(f"{k} {tuple(v.shape)} {v.dtype} {v.device}" for k, v in batch.items() if torch.is_tensor(v)),
            )
        loss = self.diffusion_loss(batch)
        self.data_position = tuple(batch["data_position"])
        # Rank 0's loss: averaging over ranks would cost an all-reduce every step. The progress bar
        # shows it here; callbacks.StepMetrics logs it, before the step's checkpoint is written.
        self.log("train/loss", loss, prog_bar=True, logger=False, batch_size=len(batch["caption"]))
        return loss

    # -- optimizer -------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        if self.adapter_cfg:
            adapter = [p for p in self.unet.parameters() if p.requires_grad]
            lr = float(self.adapter_cfg.get("lr") or o.lr)
            groups = [{"params": adapter, "lr": lr * self.lr_scale, "name": f"{self.adapter_cfg.type}_adapter"}]
            if self.controlnet_trains and self.controlnet is not None:
                cn_lr = float(self.controlnet_opts.get("lr") or o.lr)
                groups.append({"params": [p for p in self.controlnet.parameters() if p.requires_grad],
                               "lr": cn_lr * self.lr_scale, "name": "controlnet"})  # fmt: skip
        elif self.base_training:
            groups = [{"params": list(self.unet.parameters()), "lr": o.lr * self.lr_scale, "name": "unet"}]
        else:
            trainable = [p for p in self.controlnet.parameters() if p.requires_grad]
            groups = [{"params": trainable, "lr": o.lr * self.lr_scale, "name": "controlnet"}]
        if not self.sd_locked and not self.base_training and not self.adapter_cfg:
            groups.append({"params": self.unet_decoder_parameters(), "lr": o.unet_lr * self.lr_scale,
                           "name": "unet_decoder"})  # fmt: skip
        fused = bool(o.fused) and self.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused or None
        )
        log.info(
            "AdamW%s: %s",
            " (fused)" if fused else "",
            ", ".join(f"{g['name']} {sum(p.numel() for p in g['params']) / 1e6:.2f}M lr={g['lr']}" for g in groups),
        )
        scheduler = get_scheduler(
            o.lr_scheduler, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=self.trainer.max_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's FSDP precision refuses norm clipping; FSDP's own clip computes the norm over
        # all shards (a plain per-rank clip would use each rank's partial norm).
        if gradient_clip_val and is_fsdp(self.trainer.strategy) and gradient_clip_algorithm in (None, "norm"):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trainable_named_parameters())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CHECKPOINT_META] = {
            "base_fingerprint": self.base_fingerprint,
            "sd_locked": self.sd_locked,
            "adapter": self.adapter_cfg.type if self.adapter_cfg else None,
            "controlnet_finetuned": bool(self.adapter_cfg) and self.controlnet_trains,
            "data_position": list(self.data_position),
            # Noise, timesteps and caption dropout continue where they were instead of replaying
            # the draws of step 0 (this rank's generator; ranks are seeded alike).
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CHECKPOINT_META, {})
        if meta.get("base_fingerprint") not in (None, self.base_fingerprint):
            raise RuntimeError(
                f"checkpoint was trained over base model {meta['base_fingerprint']}, but this config builds "
                f"{self.base_fingerprint}: resume with the run's own model config, or start over with resume=false"
            )
        missing = sorted(set(self.trainable_named_parameters()) - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trainable weight(s), first: {missing[0]} "
                f"(was it written with another sd_locked? it says sd_locked={meta.get('sd_locked')})"
            )
        self.data_position = tuple(meta.get("data_position", (0, -1)))
        if meta.get("torch_rng") is not None:
            torch.set_rng_state(meta["torch_rng"])
        if meta.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(meta["cuda_rng"], self.device)
