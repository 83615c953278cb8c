"""The trainable ControlNet: built from the base UNet or loaded, and its controlled forward."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from nemo_controlnet.models.formats import load_original_controlnet, original_controlnet_shapes, verify_weights

log = logging.getLogger(__name__)


def build_controlnet(
    unet: UNet2DConditionModel,
    hint_channels: int,
    pretrained: str | None = None,
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
) -> ControlNetModel:
    """A ControlNet over ``unet``: its encoder and middle copied, zero convolutions zero; or a
    pretrained one, from a local diffusers directory or an original-format single file
    (``control_*.safetensors`` / ``.pth`` with ``control_model.*`` keys), checked against the base
    before its weights are read."""
    if pretrained:
        path = Path(pretrained)
        if path.is_file():
            shapes = original_controlnet_shapes(path)
            check_compatible(facts_from_original(shapes), unet, hint_channels, path)
            widths = [shapes[f"hint_width_{i}"] for i in range(4) if f"hint_width_{i}" in shapes]
            config = controlnet_config(
                unet, hint_channels, widths if len(widths) == 4 else conditioning_embedding_out_channels
            )
            controlnet = load_original_controlnet(path, config)
        elif (path / "config.json").is_file():
            check_compatible(dict(ControlNetModel.load_config(path)), unet, hint_channels, path)
            verify_weights(path)
            controlnet = ControlNetModel.from_pretrained(path, local_files_only=True)
        else:
            raise FileNotFoundError(
                f"control_stage_config.pretrained: {path} is neither a diffusers ControlNet directory "
                "nor an original-format ControlNet file"
            )
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


def controlnet_config(unet: UNet2DConditionModel, hint_channels: int, conditioning_embedding_out_channels) -> dict:
    """The config of a ControlNet for ``unet`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            conditioning_channels=hint_channels,
            load_weights_from_unet=False,
        )
    return dict(model.config)


def facts_from_original(shapes: dict) -> dict:
    """Original-format tensor shapes in the names of a diffusers ControlNet config."""
    facts = {"in_channels": shapes.get("in_channels"), "conditioning_channels": shapes.get("hint_channels"),
             "cross_attention_dim": shapes.get("cross_attention_dim")}  # fmt: skip
    if "model_channels" in shapes:
        facts["block_out_channels"] = [shapes["model_channels"]]
    return {k: v for k, v in facts.items() if v is not None}


def check_compatible(controlnet_config: dict, unet: UNet2DConditionModel, hint_channels: int, source="ControlNet"):
    """Fail with both values named when a ControlNet (its config, or facts read from a file) cannot
    drive this base. Only the keys present are compared."""
    base = {
        "in_channels": unet.config.in_channels,
        "cross_attention_dim": unet.config.cross_attention_dim,
        "block_out_channels": list(unet.config.block_out_channels),
        "conditioning_channels": hint_channels,
    }
    for key, expected in base.items():
        if key not in controlnet_config:
            continue
        got = controlnet_config[key]
        got = list(got) if isinstance(got, (list, tuple)) else got
        if key == "block_out_channels" and len(got) == 1:
            expected = expected[:1]  # a file tells only the first block's width
        if got != expected:
            what = "model.hint_channels" if key == "conditioning_channels" else f"the base UNet {key}"
            raise ValueError(f"{source}: ControlNet {key}={got} does not match {what}={expected}")


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
    controlnet: ControlNetModel | None,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    hint: torch.Tensor,
    control_scale: float = 1.0,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """The UNet's prediction with the ControlNet's residuals added at the skips and the middle
    (without a ControlNet, the UNet's own prediction: base training).

    ``added_cond_kwargs``: SDXL's pooled text embedding and micro-conditioning time ids, given to
    both networks."""
    if controlnet is None:
        return unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                    added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]  # fmt: skip
    down, mid = controlnet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=hint,
        conditioning_scale=control_scale,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )
    dtype = next(unet.parameters()).dtype
    return unet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states=encoder_hidden_states.to(dtype),
        down_block_additional_residuals=[d.to(dtype) for d in down],
        mid_block_additional_residual=mid.to(dtype),
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )[0]


def unet_decoder_modules(unet: UNet2DConditionModel) -> list[torch.nn.Module]:
    """What ``sd_locked=false`` unlocks: the decoder (up blocks) and the output layers."""
    return [unet.up_blocks, unet.conv_norm_out, unet.conv_out]
