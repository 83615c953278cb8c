"""The Stable Diffusion 3 family: SD3Transformer2DModel over a 16-channel KL VAE (shift and scale), CLIP-L,
CLIP-G and T5 text encoders, SD3ControlNetModel copied from the transformer's first blocks, rectified
flow matching as diffusers' train_controlnet_sd3.py trains it, diffusers' SD3 (ControlNet) pipelines.

The module keeps the locked parts as ``unet``, ``vae``, ``text_encoder`` and ``text_encoder_2`` (with
their tokenizers): here ``unet`` is the transformer, ``text_encoder`` CLIP-L, and ``text_encoder_2`` a
``SecondEncoders`` holding CLIP-G and T5 (``tokenizer_2`` their two tokenizers), so the module registers,
freezes and places all three encoders without knowing there is a third.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.config import validate_model_config
from nemo_controlnet.models.families.base import Residuals
from nemo_controlnet.models.families.flow import FlowMatchingFamily, RecipeCalls
from nemo_controlnet.models.stack import instantiate_seeded as seeded

log = logging.getLogger(__name__)

# The keys an SD3 ControlNet shares with the transformer it drives.
CONTROLNET_KEYS = ("in_channels", "patch_size", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                   "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size")  # fmt: skip


class SecondEncoders(torch.nn.Module):
    """CLIP-G and T5 (None: SD3 without T5, whose embeddings are zeros) as one locked module."""

    def __init__(self, clip: torch.nn.Module, t5: torch.nn.Module | None):
        super().__init__()
        self.clip, self.t5 = clip, t5

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


@dataclass
class SD3Stack:
    """The locked parts of SD3, under the names the LightningModule reads."""

    unet: torch.nn.Module  # the SD3Transformer2DModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module  # CLIP-L (with projection)
    tokenizer: object
    noise_scheduler: object
    text_encoder_2: SecondEncoders
    tokenizer_2: tuple  # (CLIP-G's tokenizer, T5's tokenizer or None)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]


def controlnet_from_transformer(transformer, num_layers: int | None = None, pretrained: str | None = None,
                                conditioning_embedding_out_channels=None) -> SD3ControlNetModel:  # fmt: skip
    """An SD3ControlNetModel: a local diffusers directory (``pretrained``), or copied from the transformer as
    ``SD3ControlNetModel.from_transformer`` does (its first ``num_layers`` blocks, the hint-latent input
    zeroed). diffusers' from_transformer writes the new num_layers into the transformer's own config, so it
    is given a copy. ``conditioning_embedding_out_channels`` (a UNet-family option) has no use here."""
    if pretrained:
        return SD3ControlNetModel.from_pretrained(pretrained)

    class _Copy:  # the transformer, with a config of its own
        config = dict(transformer.config)
        pos_embed, time_text_embed = transformer.pos_embed, transformer.time_text_embed
        context_embedder, transformer_blocks = transformer.context_embedder, transformer.transformer_blocks

    layers = int(num_layers) if num_layers else transformer.config.num_layers
    return SD3ControlNetModel.from_transformer(_Copy, num_layers=layers, num_extra_conditioning_channels=0)


class _RecipeCalls(RecipeCalls):
    family_name = "SD3"


# Named as diffusers' own, so a saved pipeline's model_index.json names a class diffusers loads.
class StableDiffusion3Pipeline(_RecipeCalls, diffusers.StableDiffusion3Pipeline):
    pass


class StableDiffusion3ControlNetPipeline(_RecipeCalls, diffusers.StableDiffusion3ControlNetPipeline):
    pass


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    default_guidance_scale = 7.0  # StableDiffusion3Pipeline's
    controlnet_class = SD3ControlNetModel
    controlnet_keys = CONTROLNET_KEYS
    lora_pipeline_class = diffusers.StableDiffusion3Pipeline

    def __init__(self, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, max_sequence_length: int = 77):  # fmt: skip
        super().__init__(weighting_scheme, logit_mean, logit_std, mode_scale, max_sequence_length)

    # -- the stack -------------------------------------------------------------------------
    def single_file_modules(self, stack) -> dict[str, torch.nn.Module | None]:
        second = stack.text_encoder_2
        return {"vae": stack.vae, "clip_l": stack.text_encoder, "clip_g": second.clip, "t5": second.t5}

    def assemble_stack(self, model_cfg: DictConfig) -> SD3Stack:
        validate_model_config(OmegaConf.create({"model": model_cfg}))
        seed, cond = int(model_cfg.seed), model_cfg.cond_stage_config
        tokenizers = [instantiate(cond.get(k)) if cond.get(k) else None for k in ("tokenizer", "tokenizer_2",
                                                                                     "tokenizer_3")]  # fmt: skip
        t5 = seeded(cond.text_encoder_3, seed + 4, "text_encoder_3") if cond.get("text_encoder_3") else None
        return SD3Stack(
            unet=self.build_transformer(model_cfg),
            vae=seeded(model_cfg.first_stage_config, seed + 1, "vae"),
            text_encoder=seeded(cond.text_encoder, seed + 2, "text_encoder"),
            tokenizer=tokenizers[0],
            noise_scheduler=instantiate(model_cfg.scheduler_config),
            text_encoder_2=SecondEncoders(seeded(cond.text_encoder_2, seed + 3, "text_encoder_2"), t5),
            tokenizer_2=(tokenizers[1], tokenizers[2]),
        )

    def decoder_modules(self, stack) -> list[torch.nn.Module]:
        """The transformer's second half of blocks and its output layers (SD3 has no decoder)."""
        t = stack.unet
        return [*t.transformer_blocks[len(t.transformer_blocks) // 2 :], t.norm_out, t.proj_out]

    def decoder_blocks(self, stack) -> list[torch.nn.Module]:
        """The transformer itself: its own switch checkpoints each of its blocks."""
        return [stack.unet]

    def fsdp_unit_types(self, controlnet) -> set[type]:
        return {type(controlnet), *(type(b) for b in controlnet.transformer_blocks)}

    def resolution_multiple(self, stack) -> int:
        return 2 ** (len(stack.vae.config.block_out_channels) - 1) * stack.unet.config.patch_size

    # -- inputs ----------------------------------------------------------------------------
    def encode_text(self, stack, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G penultimate hidden states side by
        side, zero-padded to T5's width, then T5's states after them along the sequence; pooled: both
        CLIPs' projected embeddings side by side."""
        clip_g, t5 = stack.text_encoder_2.clip, stack.text_encoder_2.t5
        tok_g, tok_t5 = stack.tokenizer_2
        device = next(stack.text_encoder.parameters()).device
        states, pooled = [], []
        for encoder, tok in ((stack.text_encoder, stack.tokenizer), (clip_g, tok_g)):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)  # fmt: skip
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip_states = torch.cat(states, dim=-1)
        if t5 is None:
            width = stack.unet.config.joint_attention_dim
            t5_states = clip_states.new_zeros(len(captions), self.max_sequence_length, width)
        else:
            ids = tok_t5(captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                         add_special_tokens=True, return_tensors="pt").input_ids.to(device)  # fmt: skip
            t5_states = t5(ids)[0].to(clip_states.dtype)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return torch.cat([clip_states, t5_states], dim=-2), torch.cat(pooled, dim=-1)

    def conditioning(self, stack, batch: dict, text: tuple, latents: torch.Tensor) -> dict:
        """Text and pooled embeddings, and the hint as the ControlNet takes it: VAE latents of the hint in
        [-1, 1], shifted and scaled (diffusers' train_controlnet_sd3.py); None without a ControlNet."""
        states, pooled = text
        return {"encoder_hidden_states": states, "pooled_projections": pooled,
                "controlnet_cond": self.hint_latents(stack, batch)}  # fmt: skip

    # -- the objective ---------------------------------------------------------------------
    def noise(self, stack, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rectified flow as diffusers' train_controlnet_sd3.py: timesteps drawn by the weighting scheme's
        density on the scheduler's (shifted) grid, x_t = (1 - sigma) x0 + sigma noise, target noise - x0."""
        scheduler = stack.noise_scheduler
        indices = (self.draw_u(latents.shape[0]) * scheduler.config.num_train_timesteps).long()
        return self.flow(stack, latents, scheduler.timesteps[indices].to(latents.device))

    # -- the controlled forward ------------------------------------------------------------
    def control_residuals(self, controlnet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                          hint: torch.Tensor, scale: float) -> Residuals:  # fmt: skip
        """The ControlNet's block samples; the hint comes VAE-encoded in ``cond`` (``conditioning``)."""
        if cond.get("controlnet_cond") is None:
            raise ValueError("the sd3 family needs the hint's latents in the conditioning (no hint in the batch?)")
        dtype = next(controlnet.parameters()).dtype
        out = controlnet(hidden_states=noisy.to(dtype), controlnet_cond=cond["controlnet_cond"].to(dtype),
                         conditioning_scale=scale, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                         pooled_projections=cond["pooled_projections"].to(dtype), timestep=timesteps,
                         return_dict=False)[0]  # fmt: skip
        return tuple(out)

    def denoise(self, base, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                residuals: Residuals | None) -> torch.Tensor:  # fmt: skip
        dtype = next(base.parameters()).dtype
        control = [r.to(dtype) for r in residuals] if residuals is not None else None
        return base(hidden_states=noisy.to(dtype), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                    pooled_projections=cond["pooled_projections"].to(dtype), timestep=timesteps,
                    block_controlnet_hidden_states=control, return_dict=False)[0]  # fmt: skip

    # -- sampling and formats --------------------------------------------------------------
    def pipeline(self, stack, controlnet, sampler: str = "unipc"):
        """diffusers' SD3 (ControlNet) pipeline over these modules; SD3 samples with the flow-matching Euler
        scheduler whatever ``sampler`` names (a fresh one: the training scheduler is left as it is)."""
        self.check_sampler(sampler)
        tok_g, tok_t5 = stack.tokenizer_2
        second = stack.text_encoder_2  # None: released after caching what sampling needs
        parts = dict(transformer=stack.unet, vae=stack.vae, text_encoder=stack.text_encoder, tokenizer=stack.tokenizer,
                     text_encoder_2=second.clip if second is not None else None, tokenizer_2=tok_g,
                     text_encoder_3=second.t5 if second is not None else None, tokenizer_3=tok_t5,
                     scheduler=FlowMatchEulerDiscreteScheduler.from_config(stack.noise_scheduler.config))  # fmt: skip
        if controlnet is not None:
            pipe = StableDiffusion3ControlNetPipeline(**parts, controlnet=controlnet)
        else:
            pipe = StableDiffusion3Pipeline(**parts)
        pipe.max_sequence_length = self.max_sequence_length
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def prompt_embeds(self, pipe, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """StableDiffusion3Pipeline.encode_prompt with classifier-free guidance, the empty negative prompt and
        the family's T5 length, as ``pipeline`` samples."""
        out = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=device,
                                 do_classifier_free_guidance=True,
                                 max_sequence_length=pipe.max_sequence_length)  # fmt: skip
        keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return dict(zip(keys, out, strict=True))
