"""What the transformer families (SD3, Flux) share: rectified flow matching as diffusers' SD3 and Flux
ControlNet scripts train it, a 16-channel VAE with shift and scale, the hint VAE-encoded for the ControlNet,
ControlNets copied from the transformer and checked against it on load, and the recipe's calls on diffusers'
pipelines. ``FlowMatchingFamily`` is their common base; ``sd3.py`` and ``flux.py`` add the architecture.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from hydra.utils import instantiate
from omegaconf import DictConfig

from nemo_controlnet.models.families.base import ModelFamily
from nemo_controlnet.models.single_file import release_checkpoints, single_file_parts, single_file_transformer
from nemo_controlnet.models.stack import instantiate_seeded

log = logging.getLogger(__name__)

# Timestep densities (logit_normal, mode, uniform) and loss weightings (sigma_sqrt, cosmap: drawn uniformly).
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "uniform")
SAMPLERS = ("unipc", "ddim", "euler", "flow_match_euler")  # accepted; the family samples with flow_match_euler


def _as_lists(config) -> dict:
    """A config with tuples as lists: JSON gives lists where a config built in Python may hold tuples."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items()}


def check_transformer_controlnet(config: dict, transformer_config: dict, keys, source) -> None:
    """A transformer ControlNet's config against the base transformer's: every shared key equal, or an error
    naming the key and both values."""
    config, base = _as_lists(config), _as_lists(transformer_config)
    for key in keys:
        if key in config and key in base and config[key] != base[key]:
            raise ValueError(f"{source}: the ControlNet's {key}={config[key]!r} does not fit this base's "
                             f"{key}={base[key]!r}; was it trained over another model?")  # fmt: skip


class RecipeCalls:
    """What the recipe's sampling (inference/pipeline.py ``sample``) asks of a pipeline, on diffusers' SD3 and
    Flux pipelines: ``unet`` (the transformer), the hint as ``image`` (one channel repeated to three, as
    training reads it), ``guess_mode`` (none here: refused when true), and T5's sequence length and the
    embedded guidance as training saw them (defaults; a caller's values win)."""

    family_name = "transformer"
    max_sequence_length = 256
    guidance_scale_default: float | None = None  # None: the pipeline's own

    @property
    def unet(self):
        return self.transformer

    def __call__(self, *args, image=None, guess_mode: bool = False, **kwargs):
        if guess_mode:
            raise ValueError(f"guess_mode=true: the {self.family_name} ControlNet pipeline has no guess mode")
        if image is not None:
            if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == 1:
                image = image.expand(-1, 3, -1, -1)
            kwargs["control_image"] = image
        kwargs.setdefault("max_sequence_length", self.max_sequence_length)
        if self.guidance_scale_default is not None:
            kwargs.setdefault("guidance_scale", self.guidance_scale_default)
        return super().__call__(*args, **kwargs)


class FlowMatchingFamily(ModelFamily):
    """A transformer over a shifted, scaled VAE, trained by rectified flow; the hint VAE-encoded."""

    original_layout = False
    control_lora = False  # Control-LoRA copies a UNet's encoder
    residual_precompute = False  # the residual store holds SD UNet (down, mid) residuals
    encodes_hint = True
    controlnet_class: type  # the diffusers ControlNet class (from_pretrained)
    controlnet_keys: tuple = ()  # config keys a ControlNet shares with the transformer it drives

    def __init__(self, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, max_sequence_length: int = 256):  # fmt: skip
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"model.family.weighting_scheme={weighting_scheme!r}: one of {list(WEIGHTING_SCHEMES)}")
        for key, value in (("logit_mean", logit_mean), ("logit_std", logit_std), ("mode_scale", mode_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"model.family.{key}={value!r}: a number")
        if logit_std <= 0:
            raise ValueError(f"model.family.logit_std={logit_std!r}: a positive number")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"model.family.max_sequence_length={max_sequence_length!r}: a positive integer")
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, float(logit_mean), float(logit_std)
        self.mode_scale, self.max_sequence_length = float(mode_scale), max_sequence_length

    def build_stack(self, model_cfg: DictConfig):
        """The locked parts from their config nodes; with ``model.checkpoint``, the transformer and whatever
        else that one file carries (VAE, text encoders: ``single_file_parts``) read from it, read once."""
        try:
            stack = self.assemble_stack(model_cfg)
            checkpoint = model_cfg.get("checkpoint")
            if checkpoint:
                loaded = single_file_parts(checkpoint, self.single_file_modules(stack))
                log.info("model.checkpoint %s: the transformer%s read from it; the rest from %s", checkpoint,
                         "".join(f", {name}" for name in loaded),
                         "model.path" if model_cfg.get("path") else "the config (random init)")  # fmt: skip
            return stack
        finally:
            release_checkpoints()

    @abstractmethod
    def assemble_stack(self, model_cfg: DictConfig):
        """The stack from the model config's nodes (the transformer through ``build_transformer``)."""

    @abstractmethod
    def single_file_modules(self, stack) -> dict[str, torch.nn.Module | None]:
        """The stack's parts an all-in-one file may also carry, under ``single_file_parts``'s names."""

    def build_transformer(self, model_cfg: DictConfig) -> torch.nn.Module:
        """The transformer: from ``model.checkpoint`` (one original-layout file, as its makers ship it; the
        other parts then come from the same file where it carries them, else from their own nodes), or
        from its node (random init, or model.path)."""
        checkpoint = model_cfg.get("checkpoint")
        if not checkpoint:
            return instantiate_seeded(model_cfg.unet_config, int(model_cfg.seed), "transformer")
        return single_file_transformer(model_cfg.unet_config, checkpoint)

    # -- the ControlNet --------------------------------------------------------------------
    def make_controlnet(self, model_cfg: DictConfig, stack) -> torch.nn.Module:
        controlnet = instantiate(model_cfg.control_stage_config, transformer=stack.unet)
        self.configure_controlnet(controlnet, model_cfg)
        return controlnet

    def configure_controlnet(self, controlnet, model_cfg: DictConfig) -> None:
        if model_cfg.get("only_mid_control"):
            raise ValueError(f"model.only_mid_control=true: a {self.name} ControlNet has no middle block")
        if int(model_cfg.hint_channels) not in (1, 3):
            raise ValueError(f"model.hint_channels: the {self.name} family VAE-encodes the hint, so 1 or 3 channels")

    def load_controlnet(self, directory: Path, meta: dict, stack) -> tuple[torch.nn.Module, int]:
        """The ControlNet, checked key by key against the transformer first; its hint channels as training
        read them (3 by default)."""
        check_transformer_controlnet(self.controlnet_class.load_config(directory), stack.unet.config,
                                     self.controlnet_keys, directory)  # fmt: skip
        controlnet = self.controlnet_class.from_pretrained(directory, local_files_only=True)
        return controlnet, int(meta.get("hint", {}).get("channels", 3))

    # -- latents and the hint ----------------------------------------------------------------
    @staticmethod
    def to_latents(vae, sample: torch.Tensor) -> torch.Tensor:
        """A raw VAE sample -> the latents the transformer takes (float32): shifted, then scaled."""
        shift = vae.config.shift_factor or 0.0
        return (sample.float() - shift) * vae.config.scaling_factor

    def latents(self, stack, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        vae = stack.vae
        if "latent_dist" in batch:  # a cached posterior (controlnet-prep mode=encode): sampled as online
            return self.to_latents(vae, DiagonalGaussianDistribution(batch["latent_dist"].float()).sample())
        if "latents" in batch:  # cached, already shifted and scaled
            return batch["latents"].float()
        return self.to_latents(vae, vae.encode(batch["image"].to(dtype)).latent_dist.sample())

    def hint_latents(self, stack, batch: dict) -> torch.Tensor | None:
        """The hint as the ControlNet takes it: VAE latents of the hint in [-1, 1] (one channel repeated to
        three), shifted and scaled, as diffusers' SD3 and Flux ControlNet scripts encode it (or drawn from
        the cached posterior of shards from controlnet-prep mode=encode); None without a hint in the batch
        or without a ControlNet."""
        if getattr(stack, "controlnet", True) is None:
            return None
        vae = stack.vae
        if "hint_latent_dist" in batch:  # cached (controlnet-prep mode=encode): sampled as online
            return self.to_latents(vae, DiagonalGaussianDistribution(batch["hint_latent_dist"].float()).sample())
        hint = batch.get(getattr(stack, "control_key", "hint"))
        if hint is None:
            return None
        with torch.no_grad():
            return self.to_latents(vae, vae.encode(self.hint_pixels(hint, vae.dtype)).latent_dist.sample())

    @staticmethod
    def hint_pixels(hint: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A hint batch in [0, 1] (one channel or three) -> the VAE's input: three channels in [-1, 1]."""
        if hint.shape[1] == 1:
            hint = hint.expand(-1, 3, -1, -1)
        return (hint * 2 - 1).to(dtype)

    def hint_posterior(self, stack, hint: torch.Tensor) -> torch.Tensor:
        vae = stack.vae
        return vae.encode(self.hint_pixels(hint, vae.dtype)).latent_dist.parameters

    def decode(self, stack, latents: torch.Tensor) -> torch.Tensor:
        vae = stack.vae
        raw = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(raw.to(vae.dtype)).sample.float()

    # -- the objective -----------------------------------------------------------------------
    def draw_u(self, batch_size: int) -> torch.Tensor:
        """u in (0, 1) from the weighting scheme's timestep density (diffusers' training_utils)."""
        return compute_density_for_timestep_sampling(self.weighting_scheme, batch_size, logit_mean=self.logit_mean,
                                                     logit_std=self.logit_std, mode_scale=self.mode_scale)  # fmt: skip

    def flow(self, stack, latents: torch.Tensor, timesteps: torch.Tensor):
        """(x_t = (1 - sigma) x0 + sigma noise, timesteps, target noise - x0)."""
        sigmas = self.sigmas(stack, timesteps, latents.ndim)
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)  # not randn_like
        return (1.0 - sigmas) * latents + sigmas * noise, timesteps, noise - latents

    def sigmas(self, stack, timesteps: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """The flow schedule's sigma at these timesteps (float32, broadcastable over latents)."""
        sigma = timesteps.float() / stack.noise_scheduler.config.num_train_timesteps
        return sigma.view(-1, *[1] * (ndim - 1))

    def loss_weighting(self, stack, timesteps: torch.Tensor, ndim: int = 4) -> torch.Tensor | None:
        """diffusers' per-sample loss weights: sigma_sqrt and cosmap weight the squared error (their timesteps
        drawn uniformly); the density schemes shape the draw instead and keep the plain MSE (None)."""
        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigmas(stack, timesteps, ndim))

    def predicted_x0(self, stack, noisy: torch.Tensor, timesteps: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma v, v the predicted velocity noise - x0."""
        return noisy.float() - self.sigmas(stack, timesteps, noisy.ndim) * pred.float()

    # -- sampling and formats ------------------------------------------------------------------
    def check_sampler(self, sampler: str) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: the {self.name} family samples with flow_match_euler")

    def export_original_controlnet(self, controlnet, path: Path, dtype: str = "fp16") -> Path:
        raise ValueError(f"the {self.name} family has no original single-file ControlNet layout; the diffusers "
                         f"directory ({self.controlnet_class.__name__}.from_pretrained) is its format")  # fmt: skip
