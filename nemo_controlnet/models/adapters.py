"""Adapter mode (issue: LoRA/LoKr under a frozen pretrained ControlNet): the pieces below the trainer.

- ``make_adapter_config`` / ``add_adapter``: a peft LoRA or LoKr on the base UNet through diffusers'
  own peft integration (``UNet2DConditionModel.add_adapter``), trainable weights kept in fp32.
- ``ControlResiduals``: runs the frozen ControlNet for a step and hands back detached per-scale
  residuals (12 down + 1 mid for SD 1.5), with the ControlNet resident, offloaded by accelerate's
  hooks (weights on the host, brought to the device for the call), or swapped by hand; and the
  residuals kept on the device or parked in pinned host memory until the UNet takes them.
- ``check_adapter_options``: the combinations that cannot work, refused before anything loads.
"""

from __future__ import annotations

import inspect
import logging
import time

import torch

log = logging.getLogger(__name__)

OFFLOAD_STRATEGIES = ("none", "accelerate", "manual_swap")
RESIDUAL_STORAGE = ("gpu", "cpu_pinned")
ADAPTER_TYPES = ("lora", "lokr", "control_lora")  # control_lora: its own mode (training/modes/control_lora.py)


def check_adapter_options(offload: str, storage: str, cuda: bool, dev_mode: bool = False) -> None:
    """Refuse what cannot run, naming the key: unknown values; pinned host memory without CUDA
    (allowed with ``manual_swap`` in ``dev_mode``, where the host copy is plain memory)."""
    if offload not in OFFLOAD_STRATEGIES:
        raise ValueError(f"controlnet.offload_strategy={offload!r}: use one of {OFFLOAD_STRATEGIES}")
    if storage not in RESIDUAL_STORAGE:
        raise ValueError(f"controlnet.residual_storage={storage!r}: use one of {RESIDUAL_STORAGE}")
    if storage == "cpu_pinned" and not cuda and not (dev_mode and offload == "manual_swap"):
        raise ValueError(
            "controlnet.residual_storage=cpu_pinned needs CUDA (pinned host memory feeds a GPU); on a CPU use "
            "residual_storage=gpu, or offload_strategy=manual_swap with controlnet.dev_mode=true to test the path"
        )


def check_adapter_run(cfg, cuda: bool) -> None:
    """A training config's ``adapter``/``controlnet`` blocks, before anything loads."""
    c, a = cfg.get("controlnet") or {}, cfg.get("adapter")
    if not a:
        return
    if a.get("type") not in ADAPTER_TYPES:
        raise ValueError(f"adapter.type={a.get('type')!r}: use one of {ADAPTER_TYPES}")
    if a.type == "control_lora":  # a ControlNet copied from the base, not a pretrained one: no controlnet.* keys
        check_control_lora_run(cfg)
        return
    check_adapter_options(c.get("offload_strategy", "none"), c.get("residual_storage", "gpu"), cuda,
                          bool(c.get("dev_mode", False)))  # fmt: skip
    if c.get("control_size") not in (None, cfg.data.resolution):
        raise ValueError(f"controlnet.control_size={c.get('control_size')}: hints are made at data.resolution="
                         f"{cfg.data.resolution}; leave it null or equal")  # fmt: skip
    if c.get("use_controlnet", True) and not c.get("name_or_path"):
        raise ValueError("controlnet.name_or_path: required in adapter mode (the pretrained ControlNet to keep frozen)")
    if c.get("precompute_control") and c.get("generate_on_the_fly"):
        raise ValueError("controlnet.precompute_control=true and generate_on_the_fly=true: choose one hint source")
    log.info("adapter mode: controlnet.train=%s", bool(c.get("train", False)))


def check_control_lora_run(cfg) -> None:
    """``adapter.type=control_lora``: a LoRA on a ControlNet copied from the locked UNet."""
    a = cfg.adapter
    if not (isinstance(a.get("rank"), int) and a.rank > 0):
        raise ValueError(f"adapter.rank={a.get('rank')!r}: a positive integer (the LoRA's rank)")
    if a.get("target_modules") is not None and not list(a.target_modules):
        raise ValueError("adapter.target_modules=[]: name the layers that get a LoRA (e.g. to_q, conv1), or null")
    if cfg.model.get("sd_locked") is False:
        raise ValueError("adapter.type=control_lora with model.sd_locked=false: a Control-LoRA is a low-rank update "
                         "of a copy of the locked UNet's encoder; keep model.sd_locked=true")  # fmt: skip
    if (cfg.model.get("control_stage_config") or {}).get("pretrained"):
        raise ValueError(f"model.control_stage_config.pretrained={cfg.model.control_stage_config.pretrained}: "
                         "adapter.type=control_lora copies the locked UNet's encoder; leave it null")  # fmt: skip


def make_adapter_config(kind: str, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0):
    """A peft config: LoRA, or LoKr (peft's Kronecker-product adapter)."""
    from peft import LoKrConfig, LoraConfig

    if kind == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                          init_lora_weights="gaussian")  # fmt: skip
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=list(target_modules), rank_dropout=dropout)
    if kind == "control_lora":
        raise ValueError("adapter.type=control_lora is a mode of its own (a LoRA on the ControlNet, not the UNet): "
                         "training_mode=control_lora, or no training_mode")  # fmt: skip
    raise ValueError(f"adapter.type={kind!r}: use one of {ADAPTER_TYPES}")


def add_adapter(unet: torch.nn.Module, config) -> list[torch.nn.Parameter]:
    """Inject the adapter into the (frozen) UNet; its weights train in fp32 whatever the UNet's dtype."""
    unet.add_adapter(config)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"adapter target_modules={list(config.target_modules)} matched no layer of the UNet")
    for p in trainable:
        p.data = p.data.float()
    log.info("%s adapter: %.3fM trainable parameters in %d tensors", type(config).__name__,
             sum(p.numel() for p in trainable) / 1e6, len(trainable))  # fmt: skip
    return trainable


class ControlResiduals:
    """The frozen ControlNet's residuals for one step, wherever the ControlNet and the residuals live.

    ``manual_swap`` keeps the weights on the host (pinned when the device is a GPU) and hooks the
    ControlNet's forward: before it, the weights are copied to the device; after it, the parameters
    point at the host copy again (frozen weights: nothing to copy back, the device copy is freed).
    Being hooks, the swap also happens when a diffusers pipeline calls the ControlNet (validation,
    sampling), not only in the training step."""

    def __init__(self, controlnet: torch.nn.Module, offload: str = "none", storage: str = "gpu"):
        self.controlnet, self.offload, self.storage = controlnet, offload, storage
        self.device: torch.device | None = None
        self._host: dict[tuple[torch.nn.Module, str, str], torch.Tensor] = {}  # (module, kind, name)
        self._hooks: list = []

    def place(self, device: torch.device) -> None:
        """Put the ControlNet where the strategy wants it, once the compute device is known."""
        self.device = torch.device(device)
        if self.offload == "accelerate":
            from accelerate import cpu_offload

            self.controlnet.to("cpu")
            cpu_offload(self.controlnet, execution_device=self.device)  # weights stay on the host
        elif self.offload == "manual_swap":
            self._install_swap()
        else:
            self.controlnet.to(self.device)

    def _install_swap(self) -> None:
        """The host copy of every weight (pinned for a GPU), once; the hooks swap it in and out."""
        for handle in self._hooks:
            handle.remove()
        pin = self.device.type == "cuda"
        self._host = {}
        for module in self.controlnet.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is not None:
                        host = t.detach().to("cpu")
                        self._host[(module, kind, name)] = host.pin_memory() if pin else host
        self._swap(to_device=False)
        self._hooks = [
            self.controlnet.register_forward_pre_hook(lambda *_: self._swap(to_device=True)),
            self.controlnet.register_forward_hook(lambda *_: self._swap(to_device=False), always_call=True),
        ]

    def _swap(self, to_device: bool) -> None:
        start = time.perf_counter()
        for (module, kind, name), host in self._host.items():
            # copy=True: a fresh device copy even when the "device" is the CPU (dev mode tests the path)
            data = host.to(self.device, non_blocking=True, copy=True) if to_device else host
            if kind == "_parameters":
                module._parameters[name].data = data
            else:
                module._buffers[name] = data
        if log.isEnabledFor(logging.DEBUG):  # the copies are non-blocking: the time is the host's, not the copy's
            size = sum(t.numel() * t.element_size() for t in self._host.values())
            log.debug("manual_swap: ControlNet %s %s: %d tensors, %.2f MiB, %.2f ms on the host",
                      "host -> device" if to_device else "device -> host (device copy dropped)", self.device,
                      len(self._host), size / 2**20, (time.perf_counter() - start) * 1e3)  # fmt: skip

    @torch.no_grad()
    def __call__(self, family, noisy, timesteps, cond: dict, hint, scale: float = 1.0):
        """The family's residuals for this input (SD UNets: down residuals and the mid one; transformers: per
        block), detached, parked per ``storage``; ``fetch`` brings them back."""
        if self.device is None:
            self.place(noisy.device)
        residuals = _each(lambda r: r.detach(), family.control_residuals(self.controlnet, noisy, timesteps, cond,
                                                                          hint, scale))  # fmt: skip
        if self.storage == "cpu_pinned":
            if self.device.type == "cuda":  # a non-blocking device-to-host copy lands in pinned memory
                return _each(lambda r: r.to("cpu", non_blocking=True), residuals)
            return _each(lambda r: r.to("cpu", copy=True), residuals)  # dev mode: plain host memory, a copy
        return residuals

    def fetch(self, residuals, device, dtype):
        """The residuals on the base's device and dtype (non-blocking copies from pinned memory)."""
        return _each(lambda r: r.to(device=device, dtype=dtype, non_blocking=True), residuals)


def _each(fn, residuals):
    """``fn`` on every tensor of a family's residuals (nested tuples and lists; None where a family has none)."""
    if isinstance(residuals, (tuple, list)):
        return type(residuals)(_each(fn, r) for r in residuals)
    return None if residuals is None else fn(residuals)


def save_lora(unet: torch.nn.Module, out_dir, metadata: dict | None = None, pipeline_cls=None) -> None:
    """The UNet's LoRA as diffusers writes it (``pytorch_lora_weights.safetensors``, with the adapter's
    rank/alpha recorded so the scale survives), which ``pipe.load_lora_weights(out_dir)`` reads; a
    LoKr in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    import json
    from pathlib import Path

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from nemo_controlnet.io import atomic_dir

    config = unet.peft_config["default"]
    with atomic_dir(Path(out_dir), checksums=True) as tmp:
        if type(config).__name__ == "LoraConfig":
            cls = pipeline_cls or StableDiffusionPipeline  # the family's: SD3 and Flux name the part "transformer"
            names = inspect.signature(cls.save_lora_weights).parameters
            part = "unet" if "unet_lora_layers" in names else "transformer"
            layers = get_peft_model_state_dict(unet)  # peft's names, as diffusers' SD3 and Flux LoRA scripts save
            if part == "unet":  # diffusers' UNet LoRA names
                layers = convert_state_dict_to_diffusers(layers)
            cls.save_lora_weights(tmp, safe_serialization=True, **{f"{part}_lora_layers": layers,
                                                                   f"{part}_lora_adapter_metadata": config.to_dict()})
        else:  # LoKr: diffusers' LoRA loader does not read it; peft's own format (adapter_config.json + weights)
            from safetensors.torch import save_file

            config.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()},
                      tmp / "adapter_model.safetensors")  # fmt: skip
        if metadata is not None:
            (tmp / "nemo_controlnet.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))


def load_adapter(pipe, path) -> str:
    """An adapter saved by ``save_lora`` into a pipeline's UNet: a LoRA through diffusers'
    ``load_lora_weights``; a LoKr (peft's format, which diffusers' loader does not read) through peft.
    Returns the adapter's type."""
    from pathlib import Path

    from nemo_controlnet.models.formats import verify_weights

    path = Path(path)
    verify_weights(path)
    if (path / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(str(path))
        return "lora"
    if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file():
        from peft import PeftConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        config = PeftConfig.from_pretrained(str(path))
        pipe.unet.add_adapter(config)
        result = set_peft_model_state_dict(pipe.unet, load_file(path / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise ValueError(f"lora={path}: {len(result.unexpected_keys)} adapter weights match no layer of this "
                             f"UNet (first: {result.unexpected_keys[0]}); was it trained on another base?")  # fmt: skip
        return str(config.peft_type).split(".")[-1].lower()
    raise FileNotFoundError(f"lora={path}: no pytorch_lora_weights.safetensors (LoRA) or adapter_config.json + "
                            "adapter_model.safetensors (LoKr) there; adapter-mode runs write run_dir/lora")  # fmt: skip
