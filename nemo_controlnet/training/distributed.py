"""FSDP for the ControlNet (``trainer=fsdp``): what to shard, and the whole ControlNet back for export.

Only the ControlNet is sharded. The locked UNet, VAE and text encoders are FSDP's
``ignored_modules``: they take no gradient, so sharding them would only add all-gathers to every
forward; they stay as bf16 copies on each GPU. Each ControlNet down/mid block is an FSDP unit and
the ControlNet itself one more (its stem, hint encoder and zero convolutions), so a unit's
parameters are gathered only while that block runs.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.strategies import FSDPStrategy


log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def is_fsdp(strategy) -> bool:
    return isinstance(strategy, FSDPStrategy)


def clean_name(name: str) -> str:
    """A parameter's name without FSDP's (or activation checkpointing's) wrapper segments."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def configure_fsdp(strategy, module) -> None:
    """Set what FSDP shards (unless the config already says): the ControlNet's blocks, not the locked parts."""
    if not is_fsdp(strategy):
        return
    if module.controlnet is None:
        raise ValueError("trainer=fsdp shards the ControlNet; base training (no ControlNet) runs with DDP")
    if not module.sd_locked:
        raise ValueError(
            "trainer=fsdp with model.sd_locked=false: the trainable UNet decoder is not sharded by this "
            "setup; train it with DDP (trainer=ddp_bf16) or keep model.sd_locked=true"
        )
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    controlnet = module.controlnet
    units = module.family.fsdp_unit_types(controlnet)
    strategy.kwargs.setdefault("ignored_modules", module.locked_modules())
    strategy.kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy(units))
    log.info("FSDP: sharding the ControlNet in units %s; locked parts ignored (replicated)",
             sorted(u.__name__ for u in units))  # fmt: skip


def full_controlnet(trainer, module, everywhere: bool = False) -> torch.nn.Module | None:
    """The whole ControlNet as a plain module: on rank 0 (None on the others), or with ``everywhere``
    on every rank (validation, where each rank samples a slice).

    Under FSDP every rank must call this: the shards are gathered into a full state dict on the
    CPU and loaded into a fresh ControlNet of the same config (diffusers' pipelines want a plain
    ControlNetModel, and a sampling loop must not depend on FSDP's collectives). Otherwise it is
    the module's own ControlNet.
    """
    if not is_fsdp(trainer.strategy):
        return module.controlnet
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # Through the root (the wrapped LightningModule): calling a nested unit first would make it
    # FSDP's root. The locked parts are ignored modules: their tensors are not copied.
    root = trainer.strategy.model
    # Export: gathered into rank 0's host memory. Validation: kept on the device, where it samples.
    offload = not everywhere and module.device.type == "cuda"  # (CPU offload from a CPU device breaks)
    config = FullStateDictConfig(offload_to_cpu=offload, rank0_only=not everywhere)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    if not (everywhere or trainer.is_global_zero):
        return None
    wrapped = module.controlnet
    inner = wrapped.module if isinstance(wrapped, FSDP) else wrapped
    plain = type(inner).from_config(inner.config)
    prefix = "controlnet."
    plain.load_state_dict({clean_name(k)[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    module.family.configure_controlnet(plain, module.model_cfg)
    return plain.to(module.device)
