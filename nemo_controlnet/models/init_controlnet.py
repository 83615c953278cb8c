"""A ControlNet initialised from a Stable Diffusion UNet, as the original repo's ``tool_add_control``
made one (``controlnet-init``): the encoder (conv_in, time embedding, down blocks, mid block) copied
from the UNet, the zero convolutions zero, the hint encoder as diffusers initialises it (its last
convolution zero). ``ControlNetModel.from_unet`` does exactly that (``build_controlnet``).

The base is a diffusers directory (``unet/`` inside, or a UNet directory) or one original-layout file
(``.safetensors``; ``.ckpt``/``.pt``/``.pth`` read with ``weights_only=True``) read through diffusers'
single-file converter with the architecture of a ``model=`` config. A file is checked against that
architecture's UNet keys and shapes first, so a file that holds no SD UNet (or another one) is refused
naming what is missing. Output: ``<out>/controlnet/`` (diffusers) and ``<out>/control_<name>.safetensors``
(the original ``control_model.*`` layout, the same writer as a training export).
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors import safe_open

from nemo_controlnet import __version__
from nemo_controlnet.config import ConfigError
from nemo_controlnet.io import UserError, atomic_dir
from nemo_controlnet.models.controlnet import build_controlnet
from nemo_controlnet.models.formats import (
    DTYPES,
    METADATA,
    export_original_controlnet,
    load_state_dict_file,
    verify_weights,
)
from nemo_controlnet.models.single_file import (
    UNET_PREFIX,
    component_from_node,
    original_unet_state,
    release_checkpoints,
)
from nemo_controlnet.models.stack import fingerprint

log = logging.getLogger(__name__)

UNET_CLASS = "UNet2DConditionModel"
# Which released model an original-layout UNet is, told by its first cross-attention key projection
# (its input width is the text width) and SDXL's add embedding: for the hint in a refusal.
_CROSS_ATTENTION = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_TEXT_WIDTHS = {768: "sd15", 1024: "sd21"}


def init_controlnet(
    base: str | Path,
    out: str | Path,
    model_cfg: DictConfig,
    hint_channels: int = 3,
    dtype: str = "fp32",
    original: bool = True,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``<out>/controlnet`` (and, with ``original``, ``<out>/control_<out name>.safetensors``)
    initialised from the UNet of ``base``; ``model_cfg`` gives a single file's architecture and the
    hint encoder's widths. Returns the paths written."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if isinstance(hint_channels, bool) or not isinstance(hint_channels, int) or hint_channels < 1:
        raise ConfigError(f"hint_channels={hint_channels!r}: expected a positive integer")
    widths = tuple(model_cfg.control_stage_config.conditioning_embedding_out_channels)
    if original and len(widths) != 4:  # the original layout numbers the hint encoder's convs 0, 2, ..., 14
        raise ConfigError(
            f"model.control_stage_config.conditioning_embedding_out_channels={list(widths)}: "
            "the original single-file layout needs 4 widths; original=false writes diffusers only"
        )
    out = Path(out)
    targets = {"controlnet": out / "controlnet"}
    if original:
        targets["original"] = out / f"control_{out.resolve().name}.safetensors"
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:  # out= may be a training run_dir: never replace a trained ControlNet unasked
        raise UserError(f"out: {', '.join(existing)} already exists: choose another out, or overwrite=true")

    unet, source = load_base_unet(base, model_cfg)
    controlnet = build_controlnet(unet, hint_channels, conditioning_embedding_out_channels=widths)
    metadata = {
        "nemo_controlnet_version": __version__,
        "global_step": 0,
        "initialized_from": {**source, "unet_fingerprint": fingerprint(unet)},
        "hint": {"channels": hint_channels, "range": "[0, 1]", "channel_order": "RGB"},
    }
    del unet
    # nn.Module's cast: diffusers' own .to() warns of fp32-only modules even when it has none.
    torch.nn.Module.to(controlnet, DTYPES[dtype])
    with atomic_dir(targets["controlnet"], checksums=True) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(metadata))
    log.info("wrote %s (diffusers, %s)", targets["controlnet"], dtype)
    if original:
        export_original_controlnet(controlnet, targets["original"], dtype)
    return targets


def load_base_unet(base: str | Path, model_cfg: DictConfig) -> tuple[UNet2DConditionModel, dict]:
    """The UNet of a diffusers directory or of an original single file, and a record of where from."""
    path = Path(base)
    if not path.exists():
        raise FileNotFoundError(f"base={str(base)!r}: no such file or directory")
    if path.is_dir():
        return diffusers_unet(path), {"base": str(path.resolve()), "format": "diffusers"}
    unet = single_file_unet(path, model_cfg)
    return unet, {"base": str(path.resolve()), "format": "single_file", "model": model_cfg.get("name")}


def diffusers_unet(path: Path) -> UNet2DConditionModel:
    """``path/unet`` of a diffusers pipeline directory, or ``path`` itself when it is a UNet directory."""
    folder = next((f for f in (path / "unet", path) if (f / "config.json").is_file()), None)
    if folder is None:
        raise UserError(f"base: {path} has no unet/config.json (nor config.json): not a diffusers Stable "
                        "Diffusion directory or UNet directory")  # fmt: skip
    cls = UNet2DConditionModel.load_config(folder).get("_class_name")
    if cls != UNET_CLASS:
        raise UserError(f"base: {folder / 'config.json'} is a {cls}, not a {UNET_CLASS} (a Stable Diffusion UNet)")
    verify_weights(folder)  # a directory we exported carries SHA256SUMS
    try:  # safetensors, or a .bin that diffusers reads with weights_only=True
        unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"base: cannot load the UNet in {folder}: {_first_line(e)}") from e
    log.info("base UNet from %s (diffusers)", folder)
    return unet


def single_file_unet(path: Path, model_cfg: DictConfig) -> UNet2DConditionModel:
    """The UNet (``model.diffusion_model.*``) of an original-layout file, with ``model_cfg``'s
    architecture, through diffusers' converter; refused first, naming the keys, when the file holds
    no such UNet."""
    node = model_cfg.unet_config
    name = model_cfg.get("name", "?")
    if str(node.get("_target_", "")).endswith("from_pretrained"):
        raise ConfigError(f"model={name} reads a diffusers directory, but base={str(path)!r} is one file: "
                          "choose its architecture (model=sd15, sd21, sdxl, ...)")  # fmt: skip
    shapes = file_shapes(path)
    with torch.device("meta"):  # the architecture's key names and shapes; no memory, no init
        expected = {k: tuple(v.shape) for k, v in original_unet_state(instantiate(node)).items()}
    missing = [k for k in expected if k not in shapes]
    differ = [f"{k} (file {shapes[k]}, model={name} {expected[k]})" for k in expected
              if k in shapes and shapes[k] != expected[k]]  # fmt: skip
    if missing or differ:
        raise UserError(not_a_unet_message(path, name, len(expected), missing, differ, shapes))
    try:
        unet = component_from_node(node, str(path), "unet")
    finally:
        release_checkpoints()
    log.info("base UNet from %s (single file, model=%s)", path, name)
    return unet


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a weights file: a ``.safetensors`` header, or a pickle read with
    ``weights_only=True`` (memory-mapped); a file that safe loading refuses is named."""
    try:
        if path.suffix == ".safetensors":
            verify_weights(path)
            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = load_state_dict_file(path)
    except UserError:
        raise
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # torch's weights-only unpickler met a non-tensor global
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "global" in ln.lower()), lines[0] if lines else "")
            raise UserError(f"base: {path} refused by weights-only loading (it holds objects that are not "
                            f"tensors: {detail})") from e  # fmt: skip
        raise UserError(f"base: cannot read {path} as weights: {_first_line(e)}") from e
    except Exception as e:  # not a safetensors file, not a torch pickle, truncated ...
        raise UserError(f"base: cannot read {path} as weights: {_first_line(e)}") from e
    if not isinstance(state, dict):
        raise UserError(f"base: {path} holds a {type(state).__name__}, not a dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def guess_model(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """``sd15``, ``sd21`` or ``sdxl`` when an original-layout UNet looks like one; None otherwise."""
    if UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        return "sdxl"
    width = shapes.get(_CROSS_ATTENTION)
    return _TEXT_WIDTHS.get(width[1]) if width and len(width) > 1 else None


def not_a_unet_message(path: Path, name: str, total: int, missing: list[str], differ: list[str], shapes: dict) -> str:
    parts = [f"base: no Stable Diffusion UNet of model={name} in {path}"]
    guess = guess_model(shapes)  # the fix first: the listings that follow can be long
    if guess and guess != name:
        parts.append(f"the file looks like model={guess}: add model={guess}")
    elif any(k.startswith(("conv_in.", "down_blocks.")) for k in shapes):
        parts.append("its keys are diffusers' (conv_in.*, down_blocks.*): pass the directory with its config.json")
    if missing:
        share = f"all {total}" if len(missing) == total else f"{len(missing)} of the {total}"
        parts.append(f"missing {share} UNet weights: {_listing(missing)}")
    if differ:
        parts.append(f"{len(differ)} with other shapes: {_listing(differ)}")
    return "; ".join(parts)


def _listing(keys: list[str], most: int = 5) -> str:
    more = f", and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def model_card(metadata: dict) -> str:
    source = metadata["initialized_from"]
    return "\n".join([
        "---", "library_name: diffusers", "tags: [controlnet, stable-diffusion, nemo_controlnet]", "---",
        f"# ControlNet initialised with nemo_controlnet {metadata['nemo_controlnet_version']} (untrained)", "",
        f"Made by `controlnet-init` from the UNet of `{source['base']}` ({source['format']}"
        + (f", model={source['model']}" if source.get("model") else "") + "): encoder and middle block copied, "
        "zero convolutions zero, so it adds nothing until trained.", "",
        f"Hint: {metadata['hint']['channels']} channels, float [0, 1], RGB. Train it with "
        "`controlnet-train model.control_stage_config.pretrained=<this directory>` over the same base.", "",
        "```python", "from diffusers import ControlNetModel",
        'controlnet = ControlNetModel.from_pretrained("path/to/this/directory")', "```", "",
    ])  # fmt: skip
