"""Per-GPU speed switches, applied outside the model code in torchtitan's order: activation
checkpointing, then channels_last, then regional compile (Lightning wraps for DDP/FSDP after)."""

from __future__ import annotations

import logging
import os

import torch
import torch.utils.checkpoint
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _checkpointed_call(module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def checkpoint_blocks(blocks) -> int:
    """Activation checkpointing on every diffusers block under ``blocks`` (their own switch)."""
    count = 0
    for block in blocks:
        for sub in block.modules():
            if hasattr(sub, "gradient_checkpointing"):
                sub._gradient_checkpointing_func = _checkpointed_call
                sub.gradient_checkpointing = True
                count += 1
    if not count:
        log.warning("activation checkpointing: none of %s has a gradient_checkpointing switch",
                    sorted({type(b).__name__ for b in blocks}))  # fmt: skip
    return count


def compile_blocks(model, backend: str = "inductor") -> int:
    """Regional compile: each down/mid/up block on its own (fast to compile, reused across blocks
    of the same shape), the model's Python glue left eager."""
    blocks = []
    for name in ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks"):
        part = getattr(model, name, None)  # UNets and their ControlNets; transformers (SD3, Flux) and theirs
        if part is not None:
            blocks += list(part) if isinstance(part, torch.nn.ModuleList) else [part]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def resolve(flag, device_type: str) -> bool:
    return device_type == "cuda" if flag == "auto" else bool(flag)


def apply_performance(module, perf: DictConfig, device_type: str) -> dict:
    """Apply the ``perf`` config to a ControlNetModule; returns what was applied, for the log."""
    applied = {}
    ckpt = perf.get("gradient_checkpointing") or {}
    if ckpt.get("controlnet") and module.controlnet is not None:
        applied["checkpointed_controlnet_blocks"] = checkpoint_blocks([module.controlnet])
    if ckpt.get("unet_decoder"):
        # The decoder keeps activations even when locked: the residuals' gradients flow through it.
        applied["checkpointed_unet_decoder_blocks"] = checkpoint_blocks(module.family.decoder_blocks(module))
    if resolve(perf.get("channels_last", "auto"), device_type):
        for name in ("controlnet", "unet", "vae"):
            if getattr(module, name) is not None:
                getattr(module, name).to(memory_format=torch.channels_last)
        module.channels_last = True
        applied["channels_last"] = True
    if device_type == "cuda" and perf.get("tf32", True):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        applied["tf32"] = True
    if perf.get("compile"):
        backend = perf.get("compile_backend", "inductor")
        networks = [m for m in (module.controlnet, module.unet) if m is not None]
        applied["compiled_blocks"] = sum(compile_blocks(m, backend) for m in networks)
    if device_type == "cuda":
        b = torch.backends.cuda
        applied["sdpa"] = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
                           "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}  # fmt: skip
    log.info("performance settings: %s", applied or "none")
    return applied


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: what SLURM's or a container's cpuset gives
    it), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(setting, num_workers: int) -> int:
    """torch's intra-op threads for the training process: ``setting`` when a number; ``auto``: the
    available CPUs less one per DataLoader worker (each worker runs one thread), at least one, so
    the step and the loader do not oversubscribe the cores. OMP_NUM_THREADS, when set, wins."""
    cpus = available_cpus()
    if os.environ.get("OMP_NUM_THREADS"):
        threads, why = torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    elif setting in (None, "auto"):
        threads = max(1, cpus - num_workers)
        why = f"auto: {cpus} available CPU(s) - {num_workers} loader worker(s)"
        torch.set_num_threads(threads)
    else:
        threads, why = int(setting), "perf.cpu_threads"
        torch.set_num_threads(threads)
    log.info("torch threads: %d (%s; each loader worker runs 1)", threads, why)
    return threads
