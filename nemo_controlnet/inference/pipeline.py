"""Sampling with a family's diffusers pipeline: hints in the training range, seeds per sample, grids."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from nemo_controlnet.models.families.sd_unet import SAMPLERS, controlnet_pipeline

__all__ = ["SAMPLERS", "controlnet_pipeline", "grid", "hint_to_uint8", "sample", "sampling_precision"]
# controlnet_pipeline: the SD UNet family's


def sampling_precision(device: torch.device, dtype: torch.dtype):
    """The autocast sampling runs under (none in float32): also where its prompts are encoded ahead of time."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


@torch.no_grad()
def sample(
    pipe,
    prompts: list[str],
    hints: torch.Tensor,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    control_scale: float = 1.0,
    seed: int | list[int] = 0,
    dtype: torch.dtype = torch.float32,
    negative_prompt: str | None = None,
    guess_mode: bool = False,
    prompt_embeds: dict[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for prompts and hints (N, C, H, W) in [0, 1] (the training range).

    Hints go in as tensors, so the pipeline sees exactly what training saw (its own image
    preprocessing of a [0, 1] tensor is the identity). ``seed``: one for the batch, or one per
    sample (then a sample's image does not depend on which others share its batch). ``prompt_embeds``:
    the pipeline's text inputs for these prompts, encoded ahead of time (``ModelFamily.prompt_embeds``;
    training with released text encoders), given in place of the prompts.
    """
    device = pipe.unet.device
    height, width = hints.shape[-2:]
    if isinstance(seed, (list, tuple)):
        generator = [torch.Generator(device="cpu").manual_seed(s) for s in seed]
    else:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    control = {}
    if getattr(pipe, "controlnet", None) is not None:  # a text-to-image pipeline takes no hint
        # Classifier-free guidance: the pipeline runs the unconditional pass with the same hint; with
        # guess_mode the ControlNet drives the conditional pass only (control without relying on text).
        control = {"image": hints.to(device, torch.float32), "controlnet_conditioning_scale": control_scale,
                   "guess_mode": guess_mode}  # fmt: skip
    if prompt_embeds is not None:
        text = {k: v.to(device) for k, v in prompt_embeds.items()}
        if negative_prompt:
            raise ValueError("negative_prompt: the prompts were encoded ahead of time, without it")
    else:
        text = {"prompt": list(prompts)}
    with sampling_precision(device, dtype):
        out = pipe(
            **text,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            generator=generator,
            output_type="np",
            **control,
        )
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


def grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Rows of equal-size HWC uint8 images -> one image."""
    return np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)


def hint_to_uint8(hint: torch.Tensor) -> np.ndarray:
    arr = (hint.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr
