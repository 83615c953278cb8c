"""Auxiliary losses beside the diffusion loss (``controlnet.aux_loss``; docs/control_train.md).

The module adds ``aux_loss_weight`` times the term to the step's MSE; the weighted term of the last step
is kept in ``last`` (detached, on the device) for ``callbacks.StepMetrics``, which logs it as
``train/<aux_loss>`` beside ``train/loss`` (which includes it).

- ``edge_loss``: the pixel-level consistency loss of ControlNet++ (Li et al., "ControlNet++: Improving
  Conditional Controls with Efficient Consistency Feedback", arXiv 2404.07987). For the samples drawn at
  timestep <= ``aux_t_max`` (where one step reads x0 well; the paper's threshold is 200 of 1000), the
  one-step x0 estimate from the prediction (the family's ``predicted_x0``: epsilon or v) is decoded by the
  locked autoencoder (its weights frozen, gradients passing through to the ControlNet), and a
  differentiable edge map of the decoded image (Sobel magnitude, kornia) is compared by MSE with the
  hint's edges (the hint, [0, 1], dilated by one pixel to the width of a step's Sobel response). The
  paper's reward model for Canny hints is an edge detector as here; its other conditions (depth,
  segmentation) would need their own networks. The decode and its backward cost memory and time in
  proportion to the selected samples.
- ``masked_recon``: the diffusion MSE restricted to where the hint is (LumiCtrl's masked reconstruction
  loss): the hint's nonzero pixels dilated by ``aux_mask_dilate`` pixels, max-pooled to the latent grid
  (a one-pixel edge still marks its latent cell), or the sample's own ``<aux_mask_key>.png`` member
  (``data.mask_key``, read by the loader; white = inside) where it has one. Normalised by the mask's
  area (latent cells times channels); an empty mask gives 0.
"""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F

from nemo_controlnet.config import AUX_LOSSES, aux_loss_problems
from nemo_controlnet.data.layout import MASK, MASK_PRESENT

__all__ = ["AUX_LOSSES", "EdgeLoss", "MaskedRecon", "edge_map", "hint_edges", "make_aux_loss", "pixel_mask"]

EDGE_GAIN = 4.0  # a full-contrast step gives a normalised Sobel magnitude of 0.5: tanh(2) = 0.96


def _check(controlnet_cfg, num_train_timesteps: int | None = None, hint_channels: int | None = None) -> None:
    problems = aux_loss_problems(controlnet_cfg, num_train_timesteps, hint_channels)
    if problems:
        raise ValueError("; ".join(problems))


def make_aux_loss(controlnet_cfg):
    """The configured auxiliary loss, or None (``controlnet.aux_loss=none``, the default)."""
    _check(controlnet_cfg)
    cfg = controlnet_cfg if controlnet_cfg is not None else {}
    kind = str(cfg.get("aux_loss") or "none")
    weight = float(cfg.get("aux_loss_weight", 0.1))
    if kind == "edge_loss":
        return EdgeLoss(weight, int(cfg.get("aux_t_max", 200)))
    if kind == "masked_recon":
        return MaskedRecon(weight, int(cfg.get("aux_mask_dilate", 3)))
    return None


def edge_map(image: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, 1 or 3, H, W) -> soft edges in [0, 1) (B, 1, H, W), differentiable."""
    gray = kornia.color.rgb_to_grayscale(image) if image.shape[1] == 3 else image
    return torch.tanh(EDGE_GAIN * kornia.filters.sobel(gray, normalized=True))


def hint_edges(hint: torch.Tensor) -> torch.Tensor:
    """An edge-map hint in [0, 1] (B, 1 or 3, H, W) -> the target (B, 1, H, W): its brightest channel,
    widened by one pixel to the two-pixel band a step gives under Sobel."""
    return F.max_pool2d(hint.float().amax(1, keepdim=True), 3, stride=1, padding=1)


def pixel_mask(batch: dict, hint: torch.Tensor, dilate: int) -> torch.Tensor:
    """(B, 1, H, W) float 0/1: the sample's own mask where the batch has one, else the hint's nonzero pixels
    dilated by ``dilate`` pixels."""
    mask = (hint.amax(1, keepdim=True) > 0).float()
    if dilate > 0:
        mask = F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
    own = batch.get(MASK)
    if own is not None:
        own = (own.float() > (127 if own.dtype == torch.uint8 else 0.5)).float()  # normalize_batch: 0/1
        present = batch.get(MASK_PRESENT)
        mask = own if present is None else torch.where(present.to(mask.device).view(-1, 1, 1, 1), own, mask)
    return mask


class EdgeLoss:
    name = "edge_loss"

    def __init__(self, weight: float, t_max: int):
        self.weight, self.t_max = weight, t_max
        self.last: torch.Tensor | None = None
        self._checked = False

    def __call__(self, module, batch: dict, latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                 pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # fmt: skip
        hint = batch[module.control_key]  # [0, 1] after normalize_batch
        if not self._checked:  # the scheduler's range is known once the stack is built
            cfg = {"aux_loss": self.name, "aux_loss_weight": self.weight, "aux_t_max": self.t_max}
            _check(cfg, int(module.noise_scheduler.config.num_train_timesteps), int(hint.shape[1]))
            self._checked = True
        # Selecting before the decode costs a host sync (nonzero's size) each step; decoding every sample
        # and masking would avoid it at the price of the decode and its backward for all of them.
        selected = torch.nonzero(timesteps <= self.t_max).squeeze(1)
        if selected.numel() == 0:
            term = pred.new_zeros((), dtype=torch.float32)
        else:
            x0 = module.family.predicted_x0(module, noisy[selected], timesteps[selected], pred[selected])
            image = (module.family.decode(module, x0) + 1) / 2  # not clamped: the gradient stays alive
            term = F.mse_loss(edge_map(image), hint_edges(hint[selected].to(image.device)))
        term = self.weight * term
        self.last = term.detach()
        return term


class MaskedRecon:
    name = "masked_recon"

    def __init__(self, weight: float, dilate: int):
        self.weight, self.dilate = weight, dilate
        self.last: torch.Tensor | None = None

    def __call__(self, module, batch: dict, latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                 pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # fmt: skip
        mask = pixel_mask(batch, batch[module.control_key], self.dilate)
        # max-pooled to the latent grid: a latent cell is inside when any of its pixels is
        grid = F.adaptive_max_pool2d(mask, pred.shape[-2:]).to(pred.device)
        error = (pred.float() - target.float()).square() * grid
        area = grid.sum() * pred.shape[1]
        term = self.weight * error.sum() / area.clamp_min(1.0)  # an empty mask: 0 / 1, no sync, no NaN
        self.last = term.detach()
        return term
