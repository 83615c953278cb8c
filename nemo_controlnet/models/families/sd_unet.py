"""The Stable Diffusion UNet family (SD 1.5, SD 2.1, SDXL): UNet2DConditionModel over a KL VAE and
CLIP text encoders, ControlNetModel copied from the UNet's encoder, epsilon or v-prediction on a
DDPM schedule, diffusers' (XL) ControlNet pipelines, the original ``control_model.*`` layout."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from hydra.utils import instantiate
from omegaconf import DictConfig

from nemo_controlnet.models.controlnet import check_compatible, set_only_mid_control, unet_decoder_modules
from nemo_controlnet.models.families.base import ModelFamily, Residuals
from nemo_controlnet.models.formats import export_original_controlnet
from nemo_controlnet.models.stack import build_stack, encode_prompts

SAMPLERS = {"unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler}
PREDICTION_TYPES = ("epsilon", "v_prediction")


class SDUNetFamily(ModelFamily):
    name = "sd_unet"

    def build_stack(self, model_cfg: DictConfig):
        return build_stack(model_cfg)

    def make_controlnet(self, model_cfg: DictConfig, stack) -> torch.nn.Module:
        controlnet = instantiate(model_cfg.control_stage_config, unet=stack.unet,
                                 hint_channels=int(model_cfg.hint_channels))  # fmt: skip
        self.configure_controlnet(controlnet, model_cfg)
        return controlnet

    def load_controlnet(self, directory: Path, meta: dict, stack) -> tuple[torch.nn.Module, int]:
        config = dict(ControlNetModel.load_config(directory))
        hint_channels = int(meta.get("hint", {}).get("channels", config["conditioning_channels"]))
        check_compatible(config, stack.unet, hint_channels, directory)  # before reading the weights
        controlnet = ControlNetModel.from_pretrained(directory, local_files_only=True)
        set_only_mid_control(controlnet, bool(meta.get("only_mid_control", False)))
        return controlnet, hint_channels

    def configure_controlnet(self, controlnet, model_cfg: DictConfig) -> None:
        set_only_mid_control(controlnet, bool(model_cfg.only_mid_control))

    def decoder_modules(self, stack) -> list[torch.nn.Module]:
        return unet_decoder_modules(stack.unet)

    def decoder_blocks(self, stack) -> list[torch.nn.Module]:
        return list(stack.unet.up_blocks)

    def fsdp_unit_types(self, controlnet) -> set[type]:
        return {type(controlnet), *(type(b) for b in controlnet.down_blocks), type(controlnet.mid_block)}

    def resolution_multiple(self, stack) -> int:
        """The latent grid must halve cleanly through every UNet down block."""
        vae_factor = 2 ** (len(stack.vae.config.block_out_channels) - 1)
        return vae_factor * 2 ** (len(stack.unet.config.block_out_channels) - 1)

    def encode_text(self, stack, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_prompts(stack.text_encoder, stack.tokenizer, stack.text_encoder_2, stack.tokenizer_2, captions)

    def latents(self, stack, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        # fp32 from here: noise and target keep full precision even when the VAE runs in bf16.
        scaling = stack.vae.config.scaling_factor
        if "latent_dist" in batch:  # cached posterior (controlnet-prep mode=encode): sampled as online
            return DiagonalGaussianDistribution(batch["latent_dist"].float()).sample() * scaling
        if "latents" in batch:  # cached and already scaled: the VAE encoder is not run
            return batch["latents"].float()
        return stack.vae.encode(batch["image"].to(dtype)).latent_dist.sample().float() * scaling

    def conditioning(self, stack, batch: dict, text: tuple, latents: torch.Tensor) -> dict:
        states, pooled = text
        return {"encoder_hidden_states": states, "added_cond_kwargs": self.micro_conditioning(stack, batch, pooled,
                                                                                              latents)}  # fmt: skip

    def micro_conditioning(self, stack, batch: dict, pooled: torch.Tensor | None,
                           latents: torch.Tensor | None = None) -> dict | None:  # fmt: skip
        """SDXL's added conditions: pooled text and (original size, crop top-left, target size)."""
        if pooled is None:
            return None
        if "image" in batch:
            b, _, h, w = batch["image"].shape
        else:  # cached latents: the target size is the latent grid times the VAE's factor
            factor = 2 ** (len(stack.vae.config.block_out_channels) - 1)
            b, h, w = latents.shape[0], latents.shape[-2] * factor, latents.shape[-1] * factor
        # Built where the batch is: no device-to-host copy (and sync) in the step.
        device = pooled.device
        size = torch.tensor([h, w], device=device).expand(b, 2)
        original = batch.get("original_size", size).to(device)
        crop = batch.get("crop_top_left", torch.zeros(b, 2, dtype=torch.long, device=device)).to(device)
        time_ids = torch.cat([original, crop, size], dim=1).to(pooled.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def noise(self, stack, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """diffusers' ControlNet example: Gaussian noise, uniform timesteps, epsilon or v target."""
        scheduler = stack.noise_scheduler
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"model.prediction_type={prediction_type!r}: use epsilon or v_prediction")
        # Not randn_like: that fills in memory order, so the noise would depend on the latents'
        # layout (channels_last, or the strided view the VAE returns), not only on the seed.
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        return noisy, timesteps, target

    def predicted_x0(self, stack, noisy: torch.Tensor, timesteps: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """x0 from x_t = sqrt(a) x0 + sqrt(1 - a) eps, a the schedule's alphas_cumprod at t: from the epsilon
        prediction, or from v = sqrt(a) eps - sqrt(1 - a) x0."""
        scheduler = stack.noise_scheduler
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"model.prediction_type={prediction_type!r}: use epsilon or v_prediction")
        alphas = scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps]
        alphas = alphas.view(-1, *[1] * (noisy.ndim - 1))
        noisy, pred = noisy.float(), pred.float()
        if prediction_type == "epsilon":
            return (noisy - (1 - alphas).sqrt() * pred) / alphas.sqrt()
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * pred

    def decode(self, stack, latents: torch.Tensor) -> torch.Tensor:
        vae = stack.vae  # an AutoencoderKL, or the weightless PixelAutoencoder (its dtype from its buffer)
        return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()

    def control_residuals(self, controlnet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                          hint: torch.Tensor, scale: float) -> Residuals:  # fmt: skip
        dtype = next(controlnet.parameters()).dtype  # a frozen ControlNet is in the locked parts' dtype
        return controlnet(noisy.to(dtype), timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                          controlnet_cond=hint.to(dtype), conditioning_scale=scale,
                          added_cond_kwargs=cond["added_cond_kwargs"], return_dict=False)  # fmt: skip

    def denoise(self, base, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                residuals: Residuals | None) -> torch.Tensor:  # fmt: skip
        if residuals is None:
            return base(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                        added_cond_kwargs=cond["added_cond_kwargs"], return_dict=False)[0]  # fmt: skip
        down, mid = residuals
        dtype = next(base.parameters()).dtype
        return base(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            down_block_additional_residuals=[d.to(dtype) for d in down],
            mid_block_additional_residual=mid.to(dtype),
            added_cond_kwargs=cond["added_cond_kwargs"],
            return_dict=False,
        )[0]

    def pipeline(self, stack, controlnet, sampler: str = "unipc"):
        return controlnet_pipeline(stack.unet, controlnet, stack.vae, stack.text_encoder, stack.tokenizer,
                                   stack.noise_scheduler.config, sampler, stack.text_encoder_2,
                                   stack.tokenizer_2)  # fmt: skip

    def prompt_embeds(self, pipe, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """StableDiffusion(XL)Pipeline.encode_prompt with classifier-free guidance and no negative prompt (SDXL
        then zeros the negative embeddings, as its force_zeros_for_empty_prompt says)."""
        if isinstance(pipe, (StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline)):
            keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
            out = pipe.encode_prompt(prompt=list(prompts), device=device, do_classifier_free_guidance=True)
        else:
            keys = ("prompt_embeds", "negative_prompt_embeds")
            out = pipe.encode_prompt(list(prompts), device, 1, True)
        return dict(zip(keys, out, strict=True))

    def export_original_controlnet(self, controlnet, path: Path, dtype: str = "fp16") -> Path:
        return export_original_controlnet(controlnet, path, dtype)


def controlnet_pipeline(
    unet, controlnet, vae, text_encoder, tokenizer, scheduler_config, sampler: str = "unipc",
    text_encoder_2=None, tokenizer_2=None,
):  # fmt: skip
    """diffusers' ControlNet pipeline over these modules (no copies): the SDXL one when there is a
    second text encoder (or its tokenizer: the encoders may have been released after caching what sampling
    needs); without a ControlNet (base training), the text-to-image pipeline."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: choose one of {sorted(SAMPLERS)}")
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                  scheduler=SAMPLERS[sampler].from_config(scheduler_config))  # fmt: skip
    if controlnet is not None:
        common["controlnet"] = controlnet
    if text_encoder_2 is not None or tokenizer_2 is not None:
        cls = StableDiffusionXLControlNetPipeline if controlnet is not None else StableDiffusionXLPipeline
        pipe = cls(**common, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, add_watermarker=False)
    else:
        cls = StableDiffusionControlNetPipeline if controlnet is not None else StableDiffusionPipeline
        pipe = cls(**common, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
