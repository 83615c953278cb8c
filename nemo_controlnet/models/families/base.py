"""The interface every model family implements (see the package docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import diffusers
import torch
from omegaconf import DictConfig

Residuals = tuple  # a family's control residuals, as its ``denoise`` takes them


class ModelFamily(ABC):
    name: str
    default_guidance_scale = 7.5  # sampling's guidance_scale when generate, eval or validation leave it null
    original_layout = True  # has a single-file ControlNet layout (export_original_controlnet); else diffusers only
    control_lora = True  # Control-LoRA applies (a ControlNet copied from a UNet's encoder)
    residual_precompute = True  # controlnet-prep mode=residuals and controlnet_reroute=precompute (UNet residuals)
    encodes_hint = False  # the ControlNet takes the hint VAE-encoded (controlnet-prep mode=encode caches it)
    lora_pipeline_class: type = diffusers.StableDiffusionPipeline  # writes and reads the base's LoRA (adapter mode)

    @abstractmethod
    def build_stack(self, model_cfg: DictConfig):
        """The locked parts, from config (random init, local diffusers directories or one single file)."""

    @abstractmethod
    def make_controlnet(self, model_cfg: DictConfig, stack) -> torch.nn.Module:
        """A ControlNet for this base: copied from it (zero convolutions zero) or a pretrained one."""

    @abstractmethod
    def decoder_modules(self, stack) -> list[torch.nn.Module]:
        """What ``model.sd_locked=false`` unlocks in the base."""

    @abstractmethod
    def decoder_blocks(self, stack) -> list[torch.nn.Module]:
        """The base's decoder blocks, one activation-checkpointing unit each."""

    @abstractmethod
    def fsdp_unit_types(self, controlnet) -> set[type]:
        """The ControlNet's module types that are FSDP units (its blocks, and itself)."""

    @abstractmethod
    def load_controlnet(self, directory: Path, meta: dict, stack) -> tuple[torch.nn.Module, int]:
        """(the ControlNet saved in this diffusers directory, its hint channels) for controlnet-generate and
        controlnet-eval: its config checked against this base before the weights are read (a mismatch
        names both values), the module options of ``meta`` (its metadata.json) re-applied."""

    @abstractmethod
    def configure_controlnet(self, controlnet, model_cfg: DictConfig) -> None:
        """Options that live on the module, not its weights (re-applied to a rebuilt ControlNet)."""

    @abstractmethod
    def resolution_multiple(self, stack) -> int:
        """Training resolutions must be multiples of this."""

    @abstractmethod
    def encode_text(self, stack, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-token embeddings, pooled embedding or None) for captions."""

    @abstractmethod
    def latents(self, stack, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        """The batch's latents in float32, scaled: encoded now, or sampled from a cached posterior."""

    def hint_posterior(self, stack, hint: torch.Tensor) -> torch.Tensor:
        """Families that VAE-encode the hint (``encodes_hint``): the VAE posterior's parameters (mean,
        log-variance) of a hint batch in [0, 1], as controlnet-prep mode=encode caches them."""
        raise NotImplementedError(f"the {self.name} family takes the hint as pixels")

    @abstractmethod
    def conditioning(self, stack, batch: dict, text: tuple, latents: torch.Tensor) -> dict:
        """The keyword arguments both networks take besides the noisy input (text, micro-conditioning)."""

    @abstractmethod
    def noise(self, stack, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training objective's draw: (noisy input, timesteps, regression target)."""

    def loss_weighting(self, stack, timesteps: torch.Tensor, ndim: int = 4) -> torch.Tensor | None:
        """Per-sample weights of the squared error at these timesteps, broadcastable over the prediction
        (float32); None: the plain mean squared error."""
        return None

    # Auxiliary losses (training/aux_loss.py) need these; a family without them cannot train with those.
    def predicted_x0(self, stack, noisy: torch.Tensor, timesteps: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The one-step estimate of the clean latents from the prediction at these timesteps, in float32,
        differentiable with respect to ``pred``."""
        raise NotImplementedError(f"the {self.name} family has no one-step x0 estimate (controlnet.aux_loss)")

    def decode(self, stack, latents: torch.Tensor) -> torch.Tensor:
        """Latents, scaled as ``latents`` returns them -> images in [-1, 1] (float32) through the locked
        autoencoder, differentiable with respect to the latents (its weights stay frozen)."""
        raise NotImplementedError(f"the {self.name} family has no latent decode (controlnet.aux_loss)")

    @abstractmethod
    def control_residuals(self, controlnet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                          hint: torch.Tensor, scale: float) -> Residuals:  # fmt: skip
        """The ControlNet's residuals for this input."""

    @abstractmethod
    def denoise(self, base, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                residuals: Residuals | None) -> torch.Tensor:  # fmt: skip
        """The base's prediction, with the residuals added where the family adds them (None: plain)."""

    @abstractmethod
    def pipeline(self, stack, controlnet, sampler: str = "unipc"):
        """A diffusers sampling pipeline over these modules (text-to-image without a ControlNet)."""

    @abstractmethod
    def prompt_embeds(self, pipe, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The text inputs of this family's ``pipeline`` call for these prompts (``prompt_embeds`` and the
        others it takes, the empty negative prompt's where it guides with one), as the pipeline itself
        encodes them: computed once ahead of time, they let sampling run without the text encoders."""

    @abstractmethod
    def export_original_controlnet(self, controlnet, path: Path, dtype: str = "fp16") -> Path:
        """The ControlNet in the original single-file layout (A1111, ComfyUI)."""
