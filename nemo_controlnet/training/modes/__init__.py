"""Training modes: what trains, and over what. One class per mode answers, for the mode-agnostic
LightningModule (``training/module.py``): which modules it builds, freezes and trains; the optimizer's
parameter groups; the control residuals for a batch; what a checkpoint records; what is exported.

A mode is chosen by ``training_mode=<name>`` (``conf/training_mode/<name>.yaml``: a ``_target_`` node);
without one, the config decides as it always has: an ``adapter`` block -> adapter (control_lora when
``adapter.type=control_lora``), no ``model.control_stage_config`` -> base, else controlnet. Adding a mode:
a subclass here (or anywhere importable) and a config entry.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

# For configs without ``mode``: the built-in mode their other keys describe.
_INFERRED = {
    "adapter": "nemo_controlnet.training.modes.adapter.AdapterMode",
    "base": "nemo_controlnet.training.modes.base.BaseMode",
    "controlnet": "nemo_controlnet.training.modes.controlnet.ControlNetMode",
    "control_lora": "nemo_controlnet.training.modes.control_lora.ControlLoraMode",
}


class TrainingMode:
    """The interface, with the defaults most modes share. ``module`` is the LightningModule: it holds
    the locked stack's parts (``unet``, ``vae``, ``text_encoder``...), ``controlnet`` (None unless a
    mode builds one), ``family`` (the model family) and the model config."""

    name = "?"

    def __init__(self, adapter: DictConfig | None = None, controlnet: DictConfig | None = None):
        self.adapter_cfg, self.controlnet_opts = adapter, controlnet or {}

    # -- modules ---------------------------------------------------------------------------
    def check_family(self, family) -> None:
        """Refuse a model family this mode cannot train, before the base loads (default: any)."""

    def build(self, module) -> None:
        """Build what the mode adds to the locked stack (``module.controlnet``); before freezing."""

    def locked_modules(self, module) -> list[torch.nn.Module]:
        """Frozen in the compute dtype, kept in eval mode."""
        return [m for m in (module.vae, module.text_encoder, module.text_encoder_2, module.unet) if m is not None]

    def unlock(self, module) -> None:
        """Make the trained parts trainable (after the locked ones were frozen)."""

    def set_train(self, module, mode: bool) -> None:
        """After ``module.train(mode)`` put the locked parts in eval: which parts follow ``mode``."""

    def on_fit_start(self, module) -> None:
        """Placement that needs the final device."""

    def describe(self, module) -> str:
        return self.name

    # -- the step --------------------------------------------------------------------------
    def latents(self, module, batch: dict) -> torch.Tensor:
        """The batch's clean latents, float32: the family's (encoded now, or cached in the batch)."""
        return module.family.latents(module, batch, module.locked_dtype)

    def drops_captions(self, batch: dict) -> bool:
        """Whether the step draws caption dropout (false where the loader already drew it)."""
        return True

    def noise(self, module, batch: dict, latents: torch.Tensor):
        """The step's (noisy input, timesteps, target): the family's draw (precomputed residuals bring their own)."""
        return module.family.noise(module, latents)

    def control_residuals(self, module, batch: dict, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict):
        """The ControlNet's residuals for the step, or None (the base alone)."""
        return None

    # -- optimizer, checkpoints, export ----------------------------------------------------
    def param_groups(self, module, optim: DictConfig) -> list[dict]:
        """``{"params", "lr", "name"}`` per group (the module scales ``lr`` with ``optim.scale_lr``)."""
        raise NotImplementedError

    def checkpoint_meta(self, module) -> dict:
        return {"adapter": None, "controlnet_finetuned": False}

    def export(self, module, run_dir: Path, metadata: dict, export_cfg: DictConfig,
               controlnet: torch.nn.Module | None = None) -> Path:  # fmt: skip
        """Write the run's result under ``run_dir``; ``controlnet``: the whole one when sharded."""
        raise NotImplementedError


def make_mode(mode_cfg, model_cfg: DictConfig, adapter_cfg: DictConfig | None = None,
              controlnet_cfg: DictConfig | None = None) -> TrainingMode:  # fmt: skip
    """The run's mode: ``mode_cfg`` (a mode, a ``_target_`` node, a built-in name) or, when None, inferred."""
    if isinstance(mode_cfg, TrainingMode):
        return mode_cfg
    if mode_cfg is None:
        name = "adapter" if adapter_cfg else "controlnet" if model_cfg.get("control_stage_config") else "base"
        if adapter_cfg and adapter_cfg.get("type") == "control_lora":
            name = "control_lora"
        target, options = _INFERRED[name], {}
    elif isinstance(mode_cfg, str):
        if mode_cfg not in _INFERRED:
            raise ValueError(f"training_mode={mode_cfg!r}: use one of {sorted(_INFERRED)} or a _target_ node")
        target, options = _INFERRED[mode_cfg], {}
    else:
        options = {k: v for k, v in mode_cfg.items() if not str(k).startswith("_")}
        target = mode_cfg.get("_target_")
        if not target:
            raise ValueError("training_mode: a node without _target_ (the mode's class)")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, TrainingMode)):
        raise TypeError(f"training_mode._target_={target}: not a TrainingMode")
    return cls(adapter=adapter_cfg, controlnet=controlnet_cfg, **options)
