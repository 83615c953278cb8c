"""The Flux.1 family: FluxTransformer2DModel over a 16-channel KL VAE (shift and scale), CLIP-L (pooled)
and T5 text encoders, FluxControlNetModel copied from the transformer's first blocks, rectified flow
matching with Flux's resolution-dependent shift, diffusers' Flux (ControlNet) pipelines.

The module keeps the locked parts as ``unet``, ``vae``, ``text_encoder`` and ``text_encoder_2`` (with
their tokenizers): here ``unet`` is the transformer, ``text_encoder`` CLIP-L (its pooled output only) and
``text_encoder_2`` T5 (its states are the per-token embeddings).

Latents stay 4-D, (B, 16, h, w), wherever the module sees them (``latents``, ``noise``, the target,
``predicted_x0``, ``decode``): ``control_residuals`` and ``denoise`` pack them into Flux's 2x2 token
sequence on the way in, and ``denoise`` unpacks the prediction on the way out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.config import validate_model_config
from nemo_controlnet.models.families.base import Residuals
from nemo_controlnet.models.families.flow import FlowMatchingFamily, RecipeCalls
from nemo_controlnet.models.stack import instantiate_seeded as seeded

log = logging.getLogger(__name__)

# The keys a Flux ControlNet shares with the transformer it drives.
CONTROLNET_KEYS = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                   "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")  # fmt: skip


@dataclass
class FluxStack:
    """The locked parts of Flux, under the names the LightningModule reads."""

    unet: torch.nn.Module  # the FluxTransformer2DModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module  # CLIP-L (CLIPTextModel: its pooler_output)
    tokenizer: object
    noise_scheduler: object
    text_encoder_2: torch.nn.Module  # T5 (T5EncoderModel)
    tokenizer_2: object

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]


def controlnet_from_transformer(transformer, num_layers: int | None = None, num_single_layers: int | None = None,
                                pretrained: str | None = None,
                                conditioning_embedding_out_channels=None) -> FluxControlNetModel:  # fmt: skip
    """A FluxControlNetModel: a local diffusers directory (``pretrained``), or copied from the transformer as
    ``FluxControlNetModel.from_transformer`` does (its first ``num_layers`` double and ``num_single_layers``
    single blocks, the hint-latent input embedder zeroed; None: all of them). from_transformer's head
    defaults are the 12B model's, so the transformer's own are passed. diffusers (0.42) copies the config
    before writing the new layer counts into it; a copy is given anyway, as sd3.py must.
    ``conditioning_embedding_out_channels`` (a UNet-family option) has no use here."""
    if pretrained:
        return FluxControlNetModel.from_pretrained(pretrained, local_files_only=True)
    config = transformer.config

    class _Copy:  # the transformer, with a config of its own
        pass

    _Copy.config = dict(config)
    for name in ("pos_embed", "time_text_embed", "context_embedder", "x_embedder", "transformer_blocks",
                 "single_transformer_blocks"):  # fmt: skip
        setattr(_Copy, name, getattr(transformer, name))
    return FluxControlNetModel.from_transformer(
        _Copy,
        num_layers=config.num_layers if num_layers is None else int(num_layers),
        num_single_layers=config.num_single_layers if num_single_layers is None else int(num_single_layers),
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> Flux's (B, h/2 * w/2, 4C) token sequence (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return diffusers.FluxPipeline._pack_latents(latents.contiguous(), b, c, h, w)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack`` for an (h, w) latent grid (FluxPipeline._unpack_latents at scale 1)."""
    return diffusers.FluxPipeline._unpack_latents(tokens, height, width, 1)


class _RecipeCalls(RecipeCalls):
    family_name = "Flux"
    max_sequence_length = 512
    guidance_scale_default = 3.5


# Named as diffusers' own, so a saved pipeline's model_index.json names a class diffusers loads.
class FluxPipeline(_RecipeCalls, diffusers.FluxPipeline):
    pass


class FluxControlNetPipeline(_RecipeCalls, diffusers.FluxControlNetPipeline):
    pass


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    controlnet_class = FluxControlNetModel
    controlnet_keys = CONTROLNET_KEYS
    lora_pipeline_class = diffusers.FluxPipeline

    @property
    def default_guidance_scale(self) -> float:
        """Sampling feeds the guidance training fed (a guidance-distilled transformer's embedded scale)."""
        return self.guidance_scale

    def __init__(self, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, max_sequence_length: int = 512, guidance_scale: float = 3.5,
                 resolution_shift: bool = True):  # fmt: skip
        super().__init__(weighting_scheme, logit_mean, logit_std, mode_scale, max_sequence_length)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
            raise ValueError(f"model.family.guidance_scale={guidance_scale!r}: a number >= 0")
        if not isinstance(resolution_shift, bool):
            raise ValueError(f"model.family.resolution_shift={resolution_shift!r}: true or false")
        self.guidance_scale, self.resolution_shift = float(guidance_scale), resolution_shift

    # -- the stack -------------------------------------------------------------------------
    def single_file_modules(self, stack) -> dict[str, torch.nn.Module | None]:
        return {"vae": stack.vae, "clip_l": stack.text_encoder, "t5": stack.text_encoder_2}

    def assemble_stack(self, model_cfg: DictConfig) -> FluxStack:
        validate_model_config(OmegaConf.create({"model": model_cfg}))
        seed, cond = int(model_cfg.seed), model_cfg.cond_stage_config
        return FluxStack(
            unet=self.build_transformer(model_cfg),
            vae=seeded(model_cfg.first_stage_config, seed + 1, "vae"),
            text_encoder=seeded(cond.text_encoder, seed + 2, "text_encoder"),
            tokenizer=instantiate(cond.tokenizer),
            noise_scheduler=instantiate(model_cfg.scheduler_config),
            text_encoder_2=seeded(cond.text_encoder_2, seed + 3, "text_encoder_2"),
            tokenizer_2=instantiate(cond.tokenizer_2),
        )

    def decoder_modules(self, stack) -> list[torch.nn.Module]:
        """The transformer's second half of single blocks and its output layers (Flux has no decoder)."""
        t = stack.unet
        singles = t.single_transformer_blocks
        return [*singles[len(singles) // 2 :], t.norm_out, t.proj_out]

    def decoder_blocks(self, stack) -> list[torch.nn.Module]:
        """The transformer itself: its own switch checkpoints each of its double and single blocks."""
        return [stack.unet]

    def fsdp_unit_types(self, controlnet) -> set[type]:
        return {type(controlnet), *(type(b) for b in controlnet.transformer_blocks),
                *(type(b) for b in controlnet.single_transformer_blocks)}  # fmt: skip

    def resolution_multiple(self, stack) -> int:
        return 2 ** (len(stack.vae.config.block_out_channels) - 1) * 2  # the VAE's factor, then 2x2 packing

    # -- inputs ----------------------------------------------------------------------------
    def encode_text(self, stack, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As FluxPipeline.encode_prompt: T5's states over ``max_sequence_length`` tokens; pooled: CLIP's
        pooled output."""
        device = next(stack.text_encoder.parameters()).device
        tok = stack.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)  # fmt: skip
        pooled = stack.text_encoder(ids, output_hidden_states=False).pooler_output
        ids = stack.tokenizer_2(captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt").input_ids.to(device)  # fmt: skip
        states = stack.text_encoder_2(ids, output_hidden_states=False)[0]
        return states, pooled

    def conditioning(self, stack, batch: dict, text: tuple, latents: torch.Tensor) -> dict:
        """Text and pooled embeddings, the text and image position ids of the packed grid, the embedded
        guidance (guidance-distilled transformers), and the hint as the ControlNet takes it: VAE latents of
        the hint in [-1, 1], shifted, scaled and packed (diffusers' train_controlnet_flux.py,
        FluxControlNetPipeline); None without a ControlNet."""
        states, pooled = text
        b, _, h, w = latents.shape
        device = latents.device
        guidance = None
        if stack.unet.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=device, dtype=torch.float32)
        cond = {
            "encoder_hidden_states": states,
            "pooled_projections": pooled,
            "txt_ids": torch.zeros(states.shape[1], 3, device=device, dtype=torch.float32),
            "img_ids": diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, torch.float32),
            "guidance": guidance,
            "controlnet_cond": None,
        }
        hint = self.hint_latents(stack, batch)
        if hint is not None:
            cond["controlnet_cond"] = pack(hint)
        return cond

    # -- the objective ---------------------------------------------------------------------
    def noise(self, stack, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rectified flow: u drawn by the weighting scheme's density, shifted as Flux samples at this
        resolution (``resolution_shift``: sigma = e^mu / (e^mu + 1/u - 1), mu from the packed sequence
        length), x_t = (1 - sigma) x0 + sigma noise, target noise - x0; timesteps sigma * T (float)."""
        config = stack.noise_scheduler.config
        sigma = self.draw_u(latents.shape[0]).float()
        if self.resolution_shift:
            seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
            mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))  # fmt: skip
            sigma = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
        return self.flow(stack, latents, (sigma * config.num_train_timesteps).to(latents.device))

    # -- the controlled forward ------------------------------------------------------------
    @staticmethod
    def _inputs(noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, dtype: torch.dtype) -> dict:
        """What the transformer and the ControlNet both take: packed input, timestep / 1000 (as the
        pipelines pass it), text, ids and guidance."""
        guidance = cond.get("guidance")
        return dict(hidden_states=pack(noisy).to(dtype), timestep=(timesteps.float() / 1000).to(dtype),
                    encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                    pooled_projections=cond["pooled_projections"].to(dtype), img_ids=cond["img_ids"],
                    txt_ids=cond["txt_ids"], guidance=guidance.to(dtype) if guidance is not None else None)  # fmt: skip

    def control_residuals(self, controlnet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                          hint: torch.Tensor, scale: float) -> Residuals:  # fmt: skip
        """(double-block samples, single-block samples), either None where the ControlNet has no such
        blocks; the hint comes VAE-encoded and packed in ``cond`` (``conditioning``)."""
        if cond.get("controlnet_cond") is None:
            raise ValueError("the flux family needs the hint's latents in the conditioning (no hint in the batch?)")
        dtype = next(controlnet.parameters()).dtype
        blocks, singles = controlnet(controlnet_cond=cond["controlnet_cond"].to(dtype), conditioning_scale=scale,
                                     return_dict=False, **self._inputs(noisy, timesteps, cond, dtype))  # fmt: skip
        return (tuple(blocks) if blocks is not None else None, tuple(singles) if singles is not None else None)

    def denoise(self, base, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                residuals: Residuals | None) -> torch.Tensor:  # fmt: skip
        """The transformer's velocity on the packed input, unpacked to the latents' 4-D shape."""
        dtype = next(base.parameters()).dtype
        blocks, singles = residuals if residuals is not None else (None, None)
        pred = base(controlnet_block_samples=[r.to(dtype) for r in blocks] if blocks is not None else None,
                    controlnet_single_block_samples=[r.to(dtype) for r in singles] if singles is not None else None,
                    return_dict=False, **self._inputs(noisy, timesteps, cond, dtype))[0]  # fmt: skip
        return unpack(pred, noisy.shape[-2], noisy.shape[-1])

    # -- sampling and formats --------------------------------------------------------------
    def pipeline(self, stack, controlnet, sampler: str = "unipc"):
        """diffusers' Flux (ControlNet) pipeline over these modules; Flux samples with the flow-matching Euler
        scheduler whatever ``sampler`` names (a fresh one: the training scheduler is left as it is)."""
        self.check_sampler(sampler)
        parts = dict(transformer=stack.unet, vae=stack.vae, text_encoder=stack.text_encoder, tokenizer=stack.tokenizer,
                     text_encoder_2=stack.text_encoder_2, tokenizer_2=stack.tokenizer_2,
                     scheduler=FlowMatchEulerDiscreteScheduler.from_config(stack.noise_scheduler.config))  # fmt: skip
        if controlnet is not None:
            pipe = FluxControlNetPipeline(**parts, controlnet=controlnet)
        else:
            pipe = FluxPipeline(**parts)
        pipe.max_sequence_length, pipe.guidance_scale_default = self.max_sequence_length, self.guidance_scale
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def prompt_embeds(self, pipe, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """FluxPipeline.encode_prompt at the family's T5 length (Flux guides by embedding, with no negative)."""
        states, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                               max_sequence_length=pipe.max_sequence_length)  # fmt: skip
        return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}
