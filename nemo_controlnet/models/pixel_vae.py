"""A weightless "autoencoder" for tiny pixel-space bases (examples/fill50k).

The controllability proof needs a base, trained from scratch on a CPU in minutes, whose images a
metric can score, so its autoencoder must decode what it encodes. A random-init AutoencoderKL does
not, and training one would be a second training loop. This one has no weights:

- ``mode=pool`` (default): average pooling by the factor ``f`` in, bilinear upsampling out. Flat
  colour regions survive exactly and edges blur within a band of about ``f`` pixels: on the shapes
  data at 32 px and f=2 a round trip keeps the disk at IoU 0.96 (0.86 at f=4). The latent is a
  small image, which a convolutional UNet learns to denoise far faster than packed pixels.
- ``mode=space_to_depth``: each ``f`` x ``f`` patch becomes ``3 f^2`` channels; exactly invertible,
  but a UNet learns it much more slowly (measured: still noisy after 1500 steps at 32 px).

It speaks AutoencoderKL's interface (``encode(...).latent_dist``, ``decode(...).sample``,
``config.scaling_factor``, ``config.block_out_channels`` whose length sets the factor, as in
AutoencoderKL), so the trainer and diffusers' pipelines use it unchanged; it saves and loads as a
diffusers model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

LOG_VARIANCE = -30.0  # the posterior's spread: exp(-15) ~ 3e-7, a deterministic encoder
MODES = ("pool", "space_to_depth")


class PixelAutoencoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (1, 1),
        mode: str = "pool",
        latent_channels: int | None = None,
        scaling_factor: float = 1.0,
        force_upcast: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        self.factor = 2 ** (len(block_out_channels) - 1)
        expected = in_channels * self.factor**2 if mode == "space_to_depth" else in_channels
        if latent_channels not in (None, expected):
            raise ValueError(f"latent_channels={latent_channels}: mode={mode} with factor {self.factor} and "
                             f"{in_channels} channels gives {expected}")  # fmt: skip
        self.register_to_config(latent_channels=expected)
        # No weights; a saved buffer gives the model a device, a dtype and a weights file.
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if self.config.mode == "pool":
            mean = F.avg_pool2d(x, self.factor)
        else:
            mean = F.pixel_unshuffle(x, self.factor)
        posterior = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, LOG_VARIANCE)], dim=1))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        if self.config.mode == "pool":
            sample = F.interpolate(z, scale_factor=self.factor, mode="bilinear", align_corners=False)
        else:
            sample = F.pixel_shuffle(z, self.factor)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, x: torch.Tensor, return_dict: bool = True):
        return self.decode(self.encode(x).latent_dist.mode(), return_dict=return_dict)
