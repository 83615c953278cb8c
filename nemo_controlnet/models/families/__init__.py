"""Model families: everything that differs between kinds of base model, behind one interface.

Training, validation, generation and evaluation talk to the base only through a ``ModelFamily``:
build the locked stack, make a ControlNet from the base, the training objective (noise, timesteps,
target), the controlled forward (residuals, then the base with them), the sampling pipeline and the
original single-file layout. The Stable Diffusion UNet family (SD 1.5, SD 2.1, SDXL) is
``sd_unet.SDUNetFamily``; a transformer family (SD3, Flux) is another subclass and a ``model.family``
entry in its model configs, with no edit under training/.

``stack`` below is anything with the locked parts as attributes (``unet``, ``vae``,
``text_encoder``, ``tokenizer``, ``noise_scheduler``, ...): a ``LockedStack``, or the
LightningModule that holds the same parts.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from nemo_controlnet.models.families.base import ModelFamily, Residuals
from nemo_controlnet.models.families.sd_unet import SDUNetFamily

__all__ = ["ModelFamily", "Residuals", "SDUNetFamily", "family_for"]


def family_for(model_cfg: DictConfig) -> ModelFamily:
    """``model.family`` (a ``_target_`` node); configs written before families existed are SD UNets."""
    node = model_cfg.get("family")
    if node is None:
        return SDUNetFamily()
    family = instantiate(node)
    if not isinstance(family, ModelFamily):
        raise TypeError(f"model.family: {node.get('_target_')} is not a ModelFamily")
    return family
