"""Weights in other tools' formats: diffusers directories with our run metadata, the original
ControlNet single file, and safe loading of pickled checkpoints."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from diffusers import ControlNetModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nemo_controlnet.io import atomic_dir, atomic_path

log = logging.getLogger(__name__)

METADATA = "nemo_controlnet.json"


def export_controlnet(
    controlnet: ControlNetModel, out_dir: str | Path, metadata: dict, unet=None, grid: str | Path | None = None
) -> Path:
    """``out_dir`` becomes a diffusers ControlNet directory (safetensors) that
    ``ControlNetModel.from_pretrained`` loads; ``nemo_controlnet.json`` records how it was trained
    (base model config and fingerprint, only_mid_control, hint format, steps). With an unlocked
    UNet decoder (sd_locked=false) the trained UNet goes beside it in ``<out_dir>/../unet``.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
        if grid is not None and Path(grid).is_file():
            (tmp / "validation.png").write_bytes(Path(grid).read_bytes())
        (tmp / "README.md").write_text(
            model_card(metadata, "validation.png" if (tmp / "validation.png").exists() else None)
        )
    if unet is not None:
        with atomic_dir(out_dir.parent / "unet") as tmp:
            unet.save_pretrained(tmp, safe_serialization=True)
    log.info("exported ControlNet to %s%s", out_dir, " (+ unet)" if unet is not None else "")
    return out_dir


def export_base(pipe, out_dir: str | Path, metadata: dict) -> Path:
    """A base trained from scratch (no ControlNet in the config) as a diffusers pipeline directory
    (unet/ vae/ text_encoder/ tokenizer/ scheduler/), which ``model=local_diffusers model.path=``
    loads to train a ControlNet over it."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    log.info("exported the trained base to %s", out_dir)
    return out_dir


def read_metadata(controlnet_dir: str | Path) -> dict:
    path = Path(controlnet_dir) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


# -- the original ControlNet single-file format (control_model.* keys; A1111, ComfyUI) -----------

ORIGINAL_PREFIX = "control_model."
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_DIRECT = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "controlnet_mid_block": "middle_block_out.0",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def original_controlnet_key(key: str, layers_per_block: int, hint_blocks: int) -> str:
    """One diffusers ControlNet key -> its name in the original (ldm) layout, without prefix."""
    parts = key.split(".")
    stem, leaf = ".".join(parts[:-1]), parts[-1]
    if stem in _DIRECT:
        return f"{_DIRECT[stem]}.{leaf}"
    if key.startswith("controlnet_cond_embedding.conv_out."):
        return f"input_hint_block.{2 * hint_blocks + 2}.{leaf}"
    if parts[0] == "controlnet_cond_embedding" and parts[1] == "blocks":
        return f"input_hint_block.{2 * int(parts[2]) + 2}.{leaf}"
    if parts[0] == "controlnet_down_blocks":
        return f"zero_convs.{parts[1]}.0.{leaf}"
    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.<leaf>
            return f"input_blocks.{(i + 1) * (layers_per_block + 1)}.0.op.{leaf}"
        j, rest = int(parts[3]), ".".join(parts[4:])
        block = i * (layers_per_block + 1) + j + 1
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    raise KeyError(f"no original-format name for ControlNet weight {key!r}")


def export_original_controlnet(controlnet: ControlNetModel, path: str | Path, dtype: str = "fp16") -> Path:
    """The ControlNet as one ``.safetensors`` file with ``control_model.*`` keys, the layout A1111 and
    ComfyUI load (and diffusers' ``ControlNetModel.from_single_file``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    hint_blocks = len(controlnet.controlnet_cond_embedding.blocks)
    if hint_blocks != 6:  # the original layout numbers the hint encoder's convs 0, 2, ..., 14
        raise ValueError(
            f"the original ControlNet format needs 4 conditioning_embedding_out_channels (6 hint blocks); "
            f"this ControlNet has {hint_blocks} blocks: export it in diffusers format instead"
        )
    lpb = controlnet.config.layers_per_block
    state = {
        ORIGINAL_PREFIX + original_controlnet_key(k, lpb, hint_blocks): v.detach().to("cpu", DTYPES[dtype]).contiguous()
        for k, v in controlnet.state_dict().items()
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "exported_by": "nemo_controlnet"})
    log.info("exported original-format ControlNet to %s (%s, %d tensors)", path, dtype, len(state))
    return path


def _original_prefix(keys) -> str:
    """``control_model.`` when the file uses it (A1111 exports), else "" (bare ldm keys)."""
    return ORIGINAL_PREFIX if any(k.startswith(ORIGINAL_PREFIX) for k in keys) else ""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors``, or from a pickled ``.ckpt``/``.pth`` with ``weights_only=True``:
    a pickle that would run code is refused."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:  # a legacy (non-zip) pickle cannot be memory-mapped
        if "mmap" not in str(e):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_original_controlnet(path: str | Path, config: dict) -> ControlNetModel:
    """An original-format ControlNet file (``control_model.*`` keys, or bare ldm keys) loaded into a
    diffusers ControlNet of ``config``, through diffusers' own converter."""
    state = load_state_dict_file(path)
    if not _original_prefix(state):
        state = {ORIGINAL_PREFIX + k: v for k, v in state.items()}
    with tempfile.TemporaryDirectory() as tmp:  # from_single_file reads the config from a directory
        (Path(tmp) / "config.json").write_text(json.dumps(config, default=str))
        return ControlNetModel.from_single_file(state, config=tmp, local_files_only=True)


def original_controlnet_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The facts a compatibility check needs, from an original-format file, without loading it all."""
    wanted = {
        "hint_channels": ("input_hint_block.0.weight", 1),
        "in_channels": ("input_blocks.0.0.weight", 1),
        "model_channels": ("input_blocks.0.0.weight", 0),
        "cross_attention_dim": ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 1),
        # the hint encoder's widths: conv_in, then the stride-2 convs
        **{f"hint_width_{i}": (f"input_hint_block.{n}.weight", 0) for i, n in enumerate((0, 4, 8, 12))},
    }
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            prefix = _original_prefix(keys)
            shape = {k: tuple(f.get_slice(prefix + k).get_shape()) for k, _ in wanted.values() if prefix + k in keys}
    else:
        state = load_state_dict_file(path)  # memory-mapped: shapes without reading the tensors
        prefix = _original_prefix(state)
        shape = {k: tuple(state[prefix + k].shape) for k, _ in wanted.values() if prefix + k in state}
    return {name: shape[k][dim] for name, (k, dim) in wanted.items() if k in shape}


def model_card(metadata: dict, grid: str | None = None) -> str:
    """README.md for an exported ControlNet: what it was trained over, on what, how long."""
    base = metadata.get("base_model", {})
    weights = base.get("path") or base.get("weights") or "random init (architecture only)"
    rows = [
        ("base model", f"`{base.get('name', '?')}` ({weights})"),
        ("base fingerprint", f"`{metadata.get('base_fingerprint', '?')}`"),
        ("hint", f"{metadata.get('hint', {}).get('channels', 3)} channels, float [0, 1], RGB"),
        ("training data", f"`{metadata.get('data')}`"),
        ("steps", metadata.get("global_step")),
        ("batch size per device", metadata.get("batch_size")),
        ("resolution", metadata.get("resolution")),
        ("sd_locked / only_mid_control", f"{metadata.get('sd_locked')} / {metadata.get('only_mid_control')}"),
    ]
    val = metadata.get("validation_metrics") or {}
    rows += [(f"validation {k} (step {val.get('step')})", _fmt(v)) for k, v in sorted(val.items()) if k != "step"]
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [controlnet, stable-diffusion, nemo_controlnet]",
        "---",
        f"# ControlNet trained with nemo_controlnet {metadata.get('nemo_controlnet_version', '')}",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "```python",
        "from diffusers import ControlNetModel",
        'controlnet = ControlNetModel.from_pretrained("path/to/this/directory")',
        "```",
        "",
        "Hints are given to the pipeline as images; the ControlNet was trained on them as float [0, 1] RGB.",
    ]
    evaluation = metadata.get("eval")
    if evaluation:
        on, off = evaluation["controlled"], evaluation["uncontrolled"]
        lines += ["", f"Evaluation (`controlnet-eval`, {evaluation['num_samples']} held-out samples of "
                  f"`{evaluation['shards']}`, fixed seeds; the baseline is the same base with control_scale 0):",
                  "", "| metric | with control | control off |", "| --- | --- | --- |"]  # fmt: skip
        lines += [f"| {k} | {_fmt(on[k])} | {_fmt(off.get(k))} |" for k in sorted(on)]
    if grid:
        lines += ["", "Validation samples (each row: hint | generated image):", "", f"![validation]({grid})"]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
