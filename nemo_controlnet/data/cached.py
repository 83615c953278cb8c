"""Training shards with cached latents and text embeddings (written by ``controlnet-prep
mode=encode``): find their manifest, check that the data config can use them and that they came
from the base being trained."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.data.layout import MANIFEST
from nemo_controlnet.data.webdataset import expand_shards

log = logging.getLogger(__name__)


def manifest_of(spec) -> Path | None:
    """The manifest.json that describes a shard spec (a manifest, a directory, or shards in one)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    path = Path(str(specs[0]))
    if path.name == MANIFEST:
        return path if path.is_file() else None
    folder = path if path.is_dir() else Path(expand_shards(str(specs[0]))[0]).parent
    return folder / MANIFEST if (folder / MANIFEST).is_file() else None


def cached_encoding(data_cfg: DictConfig) -> dict | None:
    """``params.encoded`` of the training shards' manifests, after checking that the data config can
    use them: every source cached (or none), the same encoders, the same resolution, no random
    geometry and no hint regeneration. None when the shards carry no cached encodings."""
    if data_cfg.get("folder") or data_cfg.get("hf"):  # images, never cached encodings
        return None
    specs = [d.shards for d in data_cfg.datasets] if data_cfg.get("datasets") else [data_cfg.shards]
    found = []
    for spec in specs:
        spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
        path = manifest_of(spec)
        encoded = json.loads(path.read_text())["params"].get("encoded") if path else None
        found.append((path, encoded))
    cached = [(p, e) for p, e in found if e]
    if not cached:
        return None
    if len(cached) != len(found):
        raise ValueError("data.datasets: some sources carry cached latents (controlnet-prep mode=encode) and some "
                         "do not; encode them all with the same model, or none")  # fmt: skip
    (first_path, encoded), *rest = cached
    for path, other in rest:
        if other["fingerprint"] != encoded["fingerprint"] or other["resolution"] != encoded["resolution"]:
            raise ValueError(f"{path} and {first_path} were encoded by different models or at different "
                             "resolutions; encode every source with the same model and resolution")  # fmt: skip
    aug = data_cfg.get("augment") or {}
    if aug.get("crop", "center") != "center" or float(aug.get("hflip", 0.0)) > 0:
        raise ValueError(
            f"data.augment.crop={aug.get('crop')}, data.augment.hflip={aug.get('hflip')}: {first_path} holds cached "
            "latents of one center crop; a random crop or flip would move the hint but not the latent. Use "
            "crop=center hflip=0 with these shards, or train on the unencoded shards to augment"
        )
    if (data_cfg.get("hint") or {}).get("on_the_fly"):
        raise ValueError(f"data.hint.on_the_fly=true: {first_path} carries hints cropped with its latents; "
                         "set data.hint.on_the_fly=false")  # fmt: skip
    if int(data_cfg.resolution) != int(encoded["resolution"]):
        raise ValueError(
            f"data.resolution={data_cfg.resolution}, but {first_path} holds latents encoded at "
            f"{encoded['resolution']} px: set data.resolution={encoded['resolution']} or re-encode"
        )
    return {**encoded, "manifest": str(first_path)}


def check_encoder(encoded: dict, fingerprint: str) -> None:
    """Cached latents and text embeddings must come from the base the ControlNet trains over."""
    if encoded["fingerprint"] != fingerprint:
        raise ValueError(
            f"{encoded['manifest']}: latents and text embeddings were encoded by a base with encoder fingerprint "
            f"{encoded['fingerprint']}, but this model config builds {fingerprint}; re-encode with "
            "controlnet-prep mode=encode and the training model config, or train on the unencoded shards"
        )


def check_hint_latents(encoded: dict, encodes_hint: bool, family: str, hint_channels: int) -> None:
    """A family that VAE-encodes the hint (SD3, Flux) draws it from the cached posterior, which was encoded
    from the hint read at ``model.hint_channels``: another value would change what the ControlNet sees.
    Shards encoded without hint latents still train; the VAE encodes the hint in every step."""
    if not encodes_hint:
        return
    channels = encoded.get("hint_latent_channels")
    if channels is None:
        log.warning("%s: no cached hint latents (encoded by an earlier version): the %s family's VAE encodes the "
                    "hint in every step; re-encode with controlnet-prep mode=encode to cache them",
                    encoded["manifest"], family)  # fmt: skip
    elif int(channels) != hint_channels:
        raise ValueError(f"model.hint_channels={hint_channels}, but {encoded['manifest']} cached the hint's "
                         f"latents as read at {channels} channel(s): set model.hint_channels={channels} or "
                         "re-encode")  # fmt: skip
