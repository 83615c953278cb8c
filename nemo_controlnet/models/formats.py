"""Weights in other tools' formats: diffusers directories with our run metadata, the original
ControlNet single file, and safe loading of pickled checkpoints."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nemo_controlnet.io import (
    atomic_dir,
    atomic_path,
    checksum_path,
    verify_checksum,
    verify_dir_checksums,
    write_checksum,
)

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
    metadata = {**metadata, "controlnet_class": type(controlnet).__name__}  # the model card's loading snippet
    with atomic_dir(out_dir, checksums=True) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
        if grid is not None and Path(grid).is_file():
            (tmp / "validation.png").write_bytes(Path(grid).read_bytes())
        (tmp / "README.md").write_text(
            model_card(metadata, "validation.png" if (tmp / "validation.png").exists() else None)
        )
    if unet is not None:
        with atomic_dir(out_dir.parent / "unet", checksums=True) as tmp:
            unet.save_pretrained(tmp, safe_serialization=True)
    log.info("exported ControlNet to %s%s", out_dir, " (+ unet)" if unet is not None else "")
    return out_dir


def export_base(pipe, out_dir: str | Path, metadata: dict) -> Path:
    """A base trained from scratch (no ControlNet in the config) as a diffusers pipeline directory
    (unet/ vae/ text_encoder/ tokenizer/ scheduler/), which ``model=local_diffusers model.path=``
    loads to train a ControlNet over it."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, checksums=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    log.info("exported the trained base to %s", out_dir)
    return out_dir


def read_metadata(controlnet_dir: str | Path) -> dict:
    path = Path(controlnet_dir) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


# -- the original ControlNet single-file format (control_model.* keys; A1111, ComfyUI) -----------

ORIGINAL_PREFIX = "control_model."
LDM_MAPPING = DIFFUSERS_TO_LDM_MAPPING["controlnet"]  # diffusers' own key table (diffusers key -> ldm key)
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
    ComfyUI load: SD 1.x/2.x, and SDXL, whose add embedding (pooled text + time ids) is written as
    ``label_emb.0.0`` / ``label_emb.0.2`` as in the original SDXL UNet. ``load_original_controlnet``
    reads either back. diffusers' ``ControlNetModel.from_single_file`` (0.42) reads SD 1.x/2.x files
    but not SDXL ones: its converter never maps ``label_emb``."""
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
    checksum_path(path).unlink(missing_ok=True)  # never a checksum of the previous export beside the new file
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "exported_by": "nemo_controlnet"})
    write_checksum(path)  # <file>.sha256, checked when we load the file (and by sha256sum -c)
    log.info("exported original-format ControlNet to %s (%s, %d tensors)", path, dtype, len(state))
    return path


def _original_prefix(keys) -> str:
    """``control_model.`` when the file uses it (A1111 exports), else "" (bare ldm keys)."""
    return ORIGINAL_PREFIX if any(k.startswith(ORIGINAL_PREFIX) for k in keys) else ""


def verify_weights(path: str | Path) -> None:
    """Check weights we wrote against the checksums written with them (``SHA256SUMS`` in an export
    directory, ``<file>.sha256`` beside a single file): a file changed since (bit rot, a bad copy)
    raises ``io.ChecksumMismatch`` naming it. Weights from elsewhere carry none and pass."""
    path = Path(path)
    checked = verify_dir_checksums(path) if path.is_dir() else verify_checksum(path)
    if checked:
        log.info("checksums of %s verified", path)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors``, or from a pickled ``.ckpt``/``.pth`` with ``weights_only=True``:
    a pickle that would run code is refused. A recorded ``<file>.sha256`` is checked first."""
    path = Path(path)
    verify_weights(path)
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
    diffusers ControlNet of ``config``: SD 1.x/2.x, and SDXL (``label_emb.0.0`` / ``label_emb.0.2``,
    the add embedding: ours and other tools' files alike).

    diffusers' own converter (``convert_controlnet_checkpoint``, what ``from_single_file`` calls) maps
    the keys; it leaves out the class/add embedding, which is mapped here with diffusers' own table,
    as its UNet converter does (``from_single_file`` itself cannot load an SDXL ControlNet: the add
    embedding stays on the meta device). Loading is strict: every tensor of the model must come from
    the file and every ControlNet tensor of the file must land in the model, or a ``ValueError``
    names the keys. Keys outside ``control_model.`` in a prefixed file (the base model, in the full
    checkpoints ControlNet 1.0 shipped) are not the ControlNet's and are left out. The weights come
    out in the default dtype (float32), whatever the file's."""
    state = load_state_dict_file(path)
    prefix = _original_prefix(state)
    ldm = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if len(ldm) < len(state):
        log.info("%s: %d tensors outside %s left out", path, len(state) - len(ldm), prefix)
    del state
    with torch.device("meta"):  # no memory, no random init: every tensor is read from the file below
        model = ControlNetModel.from_config(config)
    converted = convert_controlnet_checkpoint({ORIGINAL_PREFIX + k: v for k, v in ldm.items()}, config=model.config)
    converted = {k: v for k, v in converted.items() if v is not None}  # (its .get() of a key the file lacks)
    for kind, on in (("class_embed_type", model.config.class_embed_type in ("timestep", "projection")),
                     ("addition_embed_type", model.config.addition_embed_type == "text_time")):  # fmt: skip
        if on:
            converted.update({new: ldm[old] for new, old in LDM_MAPPING[kind].items() if old in ldm})

    # What the converter does not carry over it drops silently (as it did label_emb): find it by
    # identity (it moves the file's tensors, it does not copy them; were that to change, every key
    # would be refused, loudly), and name every key as the file spells it.
    source = {id(v): prefix + k for k, v in ldm.items()}
    expected = model.state_dict()
    unexpected = sorted(set(source.values()) - {source[id(v)] for v in converted.values()})
    unexpected += sorted(f"{source[id(v)]} (as {k})" for k, v in converted.items() if k not in expected)
    missing = sorted(_file_name(k, model, prefix) for k in expected if k not in converted)
    if missing or unexpected:
        raise ValueError(f"{path} does not hold a ControlNet of this config: {_listing('missing', missing)}"
                         f"{'; ' if missing and unexpected else ''}{_listing('unexpected', unexpected)}")  # fmt: skip
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(converted, strict=True)  # copies, in the model's dtype
    except RuntimeError as e:  # a size mismatch, named by torch
        raise ValueError(f"{path} does not hold a ControlNet of this config: {e}") from None
    unset = [n for n, _ in model.named_buffers() if n not in expected]  # non-persistent: not in any file
    if unset:
        raise RuntimeError(f"ControlNetModel has buffers no file sets, left uninitialized: {unset}")
    return model.eval()


def _file_name(key: str, model: ControlNetModel, prefix: str) -> str:
    """A diffusers ControlNet key as an original-format file spells it (the key itself if it has none)."""
    try:
        name = original_controlnet_key(key, model.config.layers_per_block, len(model.controlnet_cond_embedding.blocks))
    except KeyError:
        return key
    return f"{prefix}{name} ({key})"


def _listing(what: str, keys: list[str], most: int = 12) -> str:
    if not keys:
        return ""
    more = f", and {len(keys) - most} more" if len(keys) > most else ""
    return f"{len(keys)} {what}: {', '.join(keys[:most])}{more}"


_CROSS_ATTENTION_K = re.compile(r"(input_blocks\.\d+\.1|middle_block\.1)\.transformer_blocks\.0\.attn2\.to_k\.weight")


def _cross_attention_key(keys, prefix: str) -> str:
    """The first cross-attention key projection of a file (unprefixed): its input width is the
    text width. SD 1.x/2.x have one in ``input_blocks.1.1``; SDXL's first down block has none."""
    found = (k[len(prefix) :] for k in keys if k.startswith(prefix))
    return min(
        (k for k in found if _CROSS_ATTENTION_K.fullmatch(k)),
        default="input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        key=_natural,
    )


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def original_controlnet_shapes(path: str | Path) -> dict[str, int]:
    """The facts a compatibility check needs, from an original-format file, without loading it all
    (SD 1.x/2.x and SDXL files alike)."""
    wanted = {
        "hint_channels": ("input_hint_block.0.weight", 1),
        "in_channels": ("input_blocks.0.0.weight", 1),
        "model_channels": ("input_blocks.0.0.weight", 0),
        # the class/add embedding's input (SDXL: the pooled text and the 6 time ids, embedded)
        "projection_class_embeddings_input_dim": ("label_emb.0.0.weight", 1),
        # the hint encoder's widths: conv_in, then the stride-2 convs
        **{f"hint_width_{i}": (f"input_hint_block.{n}.weight", 0) for i, n in enumerate((0, 4, 8, 12))},
    }

    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            prefix = _original_prefix(keys)
            wanted["cross_attention_dim"] = (_cross_attention_key(keys, prefix), 1)
            shape = {k: tuple(f.get_slice(prefix + k).get_shape()) for k, _ in wanted.values() if prefix + k in keys}
    else:
        state = load_state_dict_file(path)  # memory-mapped: shapes without reading the tensors
        prefix = _original_prefix(state)
        wanted["cross_attention_dim"] = (_cross_attention_key(state, prefix), 1)
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
    hub_id, base_id = metadata.get("hub_model_id"), metadata.get("base_model_id")  # export.push_to_hub's
    cls = metadata.get("controlnet_class", "ControlNetModel")
    lines = [
        "---",
        "library_name: diffusers",
        *([f"base_model: {base_id}"] if base_id else []),  # the Hub checks it names a model repo
        "tags: [controlnet, stable-diffusion, nemo_controlnet"
        + (", text-to-image, diffusers, diffusers-training]" if hub_id else "]"),
        "---",
        f"# ControlNet trained with nemo_controlnet {metadata.get('nemo_controlnet_version', '')}",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "```python",
        f"from diffusers import {cls}",
        f'controlnet = {cls}.from_pretrained("path/to/this/directory", local_files_only=True)',
        "```",
        "",
        # A local directory loads behind a firewall too; the Hub copy is fetched once, where the Hub is reachable.
        *([f"On the Hub as `{hub_id}`: `hf download {hub_id} --local-dir DIR` fetches this directory.", ""]
          if hub_id else []),  # fmt: skip
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
        lines += ["", "Validation samples (each row: hint | generated images):", "", f"![validation]({grid})"]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
