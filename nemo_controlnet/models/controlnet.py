"""The trainable ControlNet: built from the base UNet or loaded, and its controlled forward."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

log = logging.getLogger(__name__)


def build_controlnet(
    unet: UNet2DConditionModel,
    hint_channels: int,
    pretrained: str | None = None,
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
) -> ControlNetModel:
    """A ControlNet over ``unet``: its encoder and middle copied, zero convolutions zero; or a
    pretrained one from a local diffusers directory, checked against the base before use."""
    if pretrained:
        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"control_stage_config.pretrained: no diffusers ControlNet at {path}")
        controlnet = ControlNetModel.from_pretrained(path, local_files_only=True)
        check_compatible(controlnet, unet, hint_channels)
        log.info("loaded ControlNet from %s", path)
    else:
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            conditioning_channels=hint_channels,
        )
        log.info("ControlNet initialized from the base UNet (encoder + middle copied, zero convs zero)")
    n = sum(p.numel() for p in controlnet.parameters())
    log.info("ControlNet: %.2fM parameters, hint_channels=%d", n / 1e6, hint_channels)
    return controlnet


def check_compatible(controlnet: ControlNetModel, unet: UNet2DConditionModel, hint_channels: int) -> None:
    """Fail with both values named when a ControlNet cannot drive this base."""
    pairs = {
        "in_channels": (controlnet.config.in_channels, unet.config.in_channels),
        "cross_attention_dim": (controlnet.config.cross_attention_dim, unet.config.cross_attention_dim),
        "block_out_channels": (tuple(controlnet.config.block_out_channels), tuple(unet.config.block_out_channels)),
    }
    for key, (c, u) in pairs.items():
        if c != u:
            raise ValueError(f"ControlNet {key}={c} does not match the base UNet {key}={u}")
    if controlnet.config.conditioning_channels != hint_channels:
        raise ValueError(
            f"ControlNet conditioning_channels={controlnet.config.conditioning_channels} "
            f"does not match model.hint_channels={hint_channels}"
        )


def _zero_down_residuals(module, args, output):
    if isinstance(output, tuple):  # return_dict=False, as training and the pipelines call it
        down, mid = output
        return [torch.zeros_like(d) for d in down], mid
    output.down_block_res_samples = tuple(torch.zeros_like(d) for d in output.down_block_res_samples)
    return output


def set_only_mid_control(controlnet: ControlNetModel, enabled: bool) -> None:
    """Only the middle-block residual reaches the UNet (the original recipe's ``only_mid_control``).

    diffusers' UNet ignores a mid residual without down residuals, so the down residuals are zeroed
    rather than dropped. A forward hook does it so training, validation and the diffusers pipeline
    all see the same ControlNet.
    """
    handle = getattr(controlnet, "_only_mid_control_hook", None)
    if handle is not None:
        handle.remove()
        controlnet._only_mid_control_hook = None
    if enabled:
        controlnet._only_mid_control_hook = controlnet.register_forward_hook(_zero_down_residuals)


def controlled_unet_forward(
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    hint: torch.Tensor,
    control_scale: float = 1.0,
) -> torch.Tensor:
    """The UNet's prediction with the ControlNet's residuals added at the skips and the middle."""
    down, mid = controlnet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=hint,
        conditioning_scale=control_scale,
        return_dict=False,
    )
    dtype = next(unet.parameters()).dtype
    return unet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states=encoder_hidden_states.to(dtype),
        down_block_additional_residuals=[d.to(dtype) for d in down],
        mid_block_additional_residual=mid.to(dtype),
        return_dict=False,
    )[0]


def unet_decoder_modules(unet: UNet2DConditionModel) -> list[torch.nn.Module]:
    """What ``sd_locked=false`` unlocks: the decoder (up blocks) and the output layers."""
    return [unet.up_blocks, unet.conv_norm_out, unet.conv_out]
