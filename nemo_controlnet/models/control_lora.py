"""Control-LoRA: a ControlNet whose encoder is a frozen copy of the locked UNet's encoder plus a
low-rank update (peft LoRA), with the hint embedding and the zero convolutions trained in full.

- ``add_control_lora``: turns a ControlNet copied from the UNet (``ControlNetModel.from_unet``) into one:
  the copy frozen in the locked dtype, LoRA on the chosen layers of the copy, hint embedding + zero convs
  trainable; every trainable weight in fp32.
- ``merge_control_lora``: a plain ``ControlNetModel`` with the LoRA merged into its weights (what
  ``export_controlnet`` writes, what diffusers' pipelines take).
- ``save_control_lora`` / ``load_control_lora``: ``control_lora.safetensors`` (LoRA factors + hint embedding +
  zero convs: what differs from the base) and ``control_lora.json`` (rank, alpha, targets, the ControlNet's
  config, the base's identity); loading rebuilds the merged ControlNet from a base UNet and refuses another base.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from diffusers import ControlNetModel

from nemo_controlnet.models.formats import verify_weights
from nemo_controlnet.models.stack import fingerprint, freeze

log = logging.getLogger(__name__)

# The ControlNet's own parts, trained in full: the hint embedding and the zero convolutions.
FULL_PARTS = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
# Layers of the encoder copy that get a LoRA: the attention projections, the transformers' in/out
# projections and the resnets' convolutions (the encoder's spatial capacity).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2")
ADAPTER = "default"  # peft's adapter name inside the modules (not written to the file)
WEIGHTS = "control_lora.safetensors"
CONFIG = "control_lora.json"
HEADER_KEY = "nemo_controlnet_control_lora"  # the safetensors metadata entry holding the config
FORMAT = "nemo_controlnet.control_lora.v1"


def is_full_part(name: str) -> bool:
    return name.split(".")[0] in FULL_PARTS


def target_names(controlnet: torch.nn.Module, targets) -> list[str]:
    """The encoder copy's Linear/Conv2d layers named ``t`` or ``*.t`` for a ``t`` in ``targets``
    (never the hint embedding or the zero convs, which train in full)."""
    found = []
    for name, m in controlnet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not is_full_part(name):
            if any(name == t or name.endswith("." + t) for t in targets):
                found.append(name)
    return found


def _lora_config(controlnet: torch.nn.Module, rank: int, alpha: float, targets, dropout: float):
    from peft import LoraConfig

    names = target_names(controlnet, targets)
    if not names:
        raise ValueError(f"adapter.target_modules={list(targets)} matched no Linear/Conv2d layer of the ControlNet's "
                         "encoder (e.g. to_q, to_k, to_v, to_out.0, proj_in, proj_out, conv1, conv2)")  # fmt: skip
    # One regex of the exact names: peft's suffix matching would also take the hint embedding's conv_in.
    pattern = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    # init_lora_weights=True: B = 0, so the ControlNet starts as the plain copy of the encoder.
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=pattern, lora_dropout=float(dropout),
                      init_lora_weights=True)  # fmt: skip


def add_control_lora(controlnet: ControlNetModel, rank: int, alpha: float, targets, dropout: float = 0.0,
                     dtype: torch.dtype = torch.float32) -> ControlNetModel:  # fmt: skip
    """In place: the copy's weights frozen in ``dtype``; LoRA (B = 0) on ``targets``; the hint embedding
    and zero convs trainable. Trainable weights are fp32 whatever ``dtype`` is."""
    from peft import inject_adapter_in_model

    freeze(controlnet, dtype)
    inject_adapter_in_model(_lora_config(controlnet, rank, alpha, targets, dropout), controlnet, adapter_name=ADAPTER)
    for name, p in controlnet.named_parameters():
        trains = "lora_" in name or is_full_part(name)
        p.requires_grad_(trains)
        if trains:
            p.data = p.data.float()
    return controlnet


def lora_parameters(controlnet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in controlnet.named_parameters() if "lora_" in n]


def full_part_parameters(controlnet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in controlnet.named_parameters() if is_full_part(n)]


def counts(controlnet: torch.nn.Module) -> dict[str, int]:
    """Parameters: the LoRA factors, the hint embedding + zero convs, and the plain ControlNet's total."""
    lora = sum(p.numel() for p in lora_parameters(controlnet))
    full = sum(p.numel() for p in full_part_parameters(controlnet))
    total = sum(p.numel() for n, p in controlnet.named_parameters() if "lora_" not in n)
    return {"lora": lora, "hint_and_zero_convs": full, "trainable": lora + full, "full_controlnet": total}


def merge_control_lora(controlnet: ControlNetModel) -> ControlNetModel:
    """A plain fp32 ``ControlNetModel`` (no peft layers) whose weights are the copy's plus the LoRA's delta
    (peft's ``get_delta_weight``); ``controlnet`` itself is left as it is."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in controlnet.named_modules() if isinstance(m, LoraLayer)}
    state = {}
    for key, value in controlnet.state_dict().items():
        if ".lora_" not in key:
            state[key.replace(".base_layer.", ".")] = value.detach().float()
    for name, layer in layers.items():
        base = layer.get_base_layer()
        with torch.no_grad():
            state[f"{name}.weight"] = base.weight.float() + layer.get_delta_weight(ADAPTER).float()
    with torch.device("meta"):
        plain = ControlNetModel.from_config(dict(controlnet.config))
    plain.load_state_dict({k: v.to("cpu").clone() for k, v in state.items()}, strict=True, assign=True)
    return plain.eval()


# -- the base's identity -----------------------------------------------------------------------
def base_probe(unet: torch.nn.Module) -> list[float]:
    """Two values of every UNet tensor (its first and middle element): compared with a tolerance, so a
    base loaded in fp16/bf16 matches the fp32 one it was trained over, and another base does not."""
    out = []
    for _, t in sorted(unet.state_dict().items()):
        flat = t.detach().reshape(-1)
        if flat.numel():  # 5 significant digits: far inside the comparison's tolerance, a short header
            out += [float(f"{float(v):.5g}") for v in (flat[0], flat[flat.numel() // 2])]
    return out


def base_structure(unet: torch.nn.Module) -> str:
    """The UNet's tensor names and shapes (its architecture), hashed."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(unet.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
    return h.hexdigest()[:16]


def base_identity(unet: torch.nn.Module) -> dict:
    return {"unet_fingerprint": fingerprint(unet), "unet_structure": base_structure(unet),
            "unet_probe": base_probe(unet)}  # fmt: skip


def check_base(unet: torch.nn.Module, recorded: dict, source) -> None:
    """Refuse, naming ``source``, a UNet that is not the base the Control-LoRA was trained over."""
    if recorded.get("unet_fingerprint") == fingerprint(unet):
        return
    if recorded.get("unet_structure") != base_structure(unet):
        raise ValueError(f"{source}: this Control-LoRA was trained over another UNet architecture (structure "
                         f"{recorded.get('unet_structure')}, this UNet's {base_structure(unet)}): load it over "
                         "the base it was trained with")  # fmt: skip
    theirs, ours = torch.tensor(recorded.get("unet_probe") or []), torch.tensor(base_probe(unet))
    if theirs.shape != ours.shape or not torch.allclose(ours, theirs, rtol=2e-2, atol=1e-4):
        raise ValueError(f"{source}: this Control-LoRA was trained over base UNet {recorded.get('unet_fingerprint')}"
                         f", not this one ({fingerprint(unet)}): the same architecture with other weights; load it "
                         "over the base it was trained with")  # fmt: skip
    log.info("%s: the base UNet matches (in another dtype)", source)


# -- on disk ----------------------------------------------------------------------------------
def _file_key(name: str) -> str:
    return name.replace(f".{ADAPTER}.", ".")  # lora_A.default.weight -> lora_A.weight


def _model_key(name: str) -> str:
    return re.sub(r"\.(lora_[AB])\.", rf".\1.{ADAPTER}.", name)


def control_lora_state(controlnet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What differs from the base: the LoRA factors, the hint embedding and the zero convs (fp32)."""
    return {_file_key(n): p.detach().float().cpu().contiguous() for n, p in controlnet.named_parameters()
            if "lora_" in n or is_full_part(n)}  # fmt: skip


def save_control_lora(controlnet: ControlNetModel, out_dir, config: dict, metadata: dict | None = None) -> Path:
    """``out_dir``/control_lora.safetensors (with ``config`` in its header too) and control_lora.json
    (``config`` + the run's ``metadata``), written atomically with a ``SHA256SUMS``. ``config``: rank,
    alpha, target_modules, dropout and the base's identity (``base_identity``)."""
    from safetensors.torch import save_file

    from nemo_controlnet.io import atomic_dir

    config = {"format": FORMAT, **config, "controlnet_config": dict(controlnet.config)}
    header = json.dumps(config, sort_keys=True, default=str)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, checksums=True) as tmp:
        save_file(control_lora_state(controlnet), str(tmp / WEIGHTS), metadata={"format": "pt", HEADER_KEY: header})
        record = {**config, "run": metadata or {}}
        (tmp / CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return out_dir / WEIGHTS


def read_control_lora_config(path) -> tuple[Path, dict]:
    """(the weights file, its config) for a control_lora directory or file; checksums verified."""
    from safetensors import safe_open

    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS} there; Control-LoRA runs write run_dir/control_lora")
    verify_weights(path)
    with safe_open(str(file), framework="pt") as f:
        header = (f.metadata() or {}).get(HEADER_KEY)
    if not header:
        raise ValueError(f"{file}: not a Control-LoRA file (no {HEADER_KEY} entry in its safetensors header)")
    return file, json.loads(header)


def load_control_lora(unet: torch.nn.Module, path, allow_other_base: bool = False) -> ControlNetModel:
    """The merged ControlNet (plain, fp32) of a Control-LoRA file or directory over ``unet``, its base: the
    encoder copied from ``unet``, the file's LoRA merged in, its hint embedding and zero convs loaded.
    Another base is refused naming the file (``allow_other_base``: a warning instead, for a base fine-tuned
    from it). Weights are read through safetensors only."""
    from safetensors.torch import load_file

    file, config = read_control_lora_config(path)
    try:
        check_base(unet, config.get("base") or {}, file)
    except ValueError as e:
        if not allow_other_base:
            raise
        log.warning("%s (allow_other_base=true: loading it anyway)", e)
    cn = config["controlnet_config"]
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(cn["conditioning_embedding_out_channels"]),
        conditioning_channels=int(cn["conditioning_channels"]),
    ).float()  # fmt: skip
    add_control_lora(controlnet, config["rank"], config["alpha"], config["target_modules"], 0.0)
    state = {_model_key(k): v for k, v in load_file(str(file)).items()}
    expected = {n for n, _ in controlnet.named_parameters() if "lora_" in n or is_full_part(n)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{file}: {len(missing)} weight(s) missing (first: {missing[:1]}), {len(unexpected)} "
                         f"unexpected (first: {unexpected[:1]}) for rank {config['rank']} on "
                         f"{config['target_modules']}: a damaged file, or another ControlNet layout")  # fmt: skip
    controlnet.load_state_dict(state, strict=False)
    return merge_control_lora(controlnet)
