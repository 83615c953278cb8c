"""Precomputed ControlNet residuals (``controlnet-prep mode=residuals``): the file format, the manifest's
checks, and the loader stage that attaches a sample's residuals by its key.

A frozen ControlNet's residuals depend on the noisy latents, the timestep, the text and the hint, so the
precompute fixes them per sample: ``<dir>/<key>_residuals.safetensors`` holds

- ``latents`` (C, h, w): the clean latents, scaled (a posterior draw seeded by the key), of the center crop;
- ``timesteps`` (K,) int64, and per draw ``k``: ``noise.<k>`` (C, h, w);
- ``cond.<k>.down_<i>`` / ``cond.<k>.mid`` (C_i, H_i, W_i): the residuals for the sample's caption, and
  ``uncond.<k>.down_<i>`` / ``uncond.<k>.mid`` for the empty caption;
- string metadata ``nemo_controlnet``: JSON with the key, K, the scale count and both fingerprints.

``<dir>/empty_prompt.safetensors`` holds the empty caption's embeddings (for shards with cached text
embeddings), ``<dir>/manifest.json`` the run's description (``manifest_params``).

Training (``controlnet_reroute=precompute``) wraps the sample decoder: per sample and epoch, a draw
seeded by (seed, epoch, key) chooses ``k`` and whether the caption is dropped; a dropped caption is
replaced by the empty one (its embeddings for cached text) and goes with the ``uncond`` residuals, so text
and residuals always agree. Only the chosen ``k`` and branch are read from the file.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from nemo_controlnet.data.layout import MANIFEST

log = logging.getLogger(__name__)

FORMAT, VERSION = "nemo_controlnet.residuals", 1
SUFFIX = "_residuals.safetensors"
EMPTY_PROMPT = "empty_prompt.safetensors"
META_KEY = "nemo_controlnet"
ON_MISMATCH = ("error", "on_the_fly")
RESIDUAL_STATE = "residual_state"  # per sample "hit" or "miss": a list on the host after collate


class ResidualMismatch(ValueError):
    """A residual file that does not fit the manifest (scale count or shape), or is missing."""


def residual_path(root: str | Path, key: str) -> Path:
    if Path(key).is_absolute() or ".." in Path(key).parts:
        raise ValueError(f"sample key {key!r}: not a relative name; cannot place its residual file")
    return Path(root) / f"{key}{SUFFIX}"


def scale_names(num_down: int) -> list[str]:
    return [f"down_{i}" for i in range(num_down)] + ["mid"]


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"residuals.dir={root}: no {MANIFEST} (write it with controlnet-prep mode=residuals)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a residual manifest (format {manifest.get('format')!r}, expected {FORMAT!r})")
    manifest["path"] = str(path)
    return manifest


def check_manifest(manifest: dict, data_cfg, controlnet_fingerprint: str | None, base_fingerprint: str,
                   control_scale: float, num_train_timesteps: int) -> None:  # fmt: skip
    """Refuse residuals that this run cannot use, naming the manifest: another ControlNet or base,
    another resolution or conditioning scale, or geometric augmentation the residuals did not see."""
    path = manifest["path"]
    if controlnet_fingerprint is not None and manifest["controlnet_fingerprint"] != controlnet_fingerprint:
        raise ValueError(
            f"{path}: residuals of ControlNet {manifest['controlnet_fingerprint']}, but this run's ControlNet is "
            f"{controlnet_fingerprint}: precompute them again with this controlnet.name_or_path"
        )
    if manifest["base_fingerprint"] != base_fingerprint:
        raise ValueError(f"{path}: residuals made over base model {manifest['base_fingerprint']}, but this config "
                         f"builds {base_fingerprint}: precompute them with the training model config")  # fmt: skip
    if int(data_cfg.resolution) != int(manifest["resolution"]):
        raise ValueError(f"data.resolution={data_cfg.resolution}, but {path} holds residuals made at "
                         f"{manifest['resolution']} px: set data.resolution={manifest['resolution']}")  # fmt: skip
    if float(manifest["control_scale"]) != float(control_scale):
        raise ValueError(f"model.control_scale={control_scale}, but {path} was made at control_scale="
                         f"{manifest['control_scale']}: use that scale or precompute again")  # fmt: skip
    if int(manifest["num_train_timesteps"]) != int(num_train_timesteps):
        raise ValueError(f"{path}: timesteps drawn from {manifest['num_train_timesteps']} training steps, this "
                         f"scheduler has {num_train_timesteps}")  # fmt: skip
    aug = data_cfg.get("augment") or {}
    if (aug.get("crop", "center") != "center" or float(aug.get("hflip", 0.0)) > 0) and not manifest.get(
        "after_augmentation"
    ):
        raise ValueError(
            f"data.augment.crop={aug.get('crop')}, data.augment.hflip={aug.get('hflip')}: {path} holds residuals of "
            "one center crop (after_augmentation=false); a random crop or flip would move the hint and latents but "
            "not the residuals. Use crop=center hflip=0 with controlnet_reroute=precompute, or "
            "controlnet_reroute=always"
        )
    if bool((data_cfg.get("buckets") or {}).get("enabled")):
        raise ValueError(f"data.buckets.enabled=true: {path} holds square center crops; disable buckets")


class ResidualStage:
    """The sample decoder, then the sample's residuals by key (picklable: runs in loader workers).

    Attributes the streams set on a decoder (``epoch``, ``notes``, ``keep_meta``) reach the wrapped one."""

    _DELEGATED = ("epoch", "notes", "keep_meta")

    def __init__(self, decoder, root: str | Path, manifest: dict, on_mismatch: str = "error",
                 drop_probability: float = 0.0, seed: int = 0):  # fmt: skip
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"residuals.on_mismatch={on_mismatch!r}: use one of {list(ON_MISMATCH)}")
        object.__setattr__(self, "inner", decoder)
        self.root, self.on_mismatch = Path(root), on_mismatch
        self.drop_probability, self.seed = float(drop_probability), int(seed)
        self.num_timesteps = int(manifest["num_timesteps"])
        self.shapes = {name: tuple(shape) for name, shape in manifest["shapes"].items()}
        self.latent_shape = tuple(manifest["latent_shape"])
        self.dtype = getattr(torch, manifest.get("dtype", "float16"))
        self.empty = None  # the empty caption's embeddings, read on the first cached-text sample

    def __getattr__(self, name):
        if name == "inner":  # (unpickling: before __dict__ is back)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in self._DELEGATED:
            setattr(self.inner, name, value)
        else:
            object.__setattr__(self, name, value)

    def draw(self, key: str) -> tuple[int, bool]:
        """(k, caption dropped) for this sample in this epoch."""
        rng = random.Random(f"{self.seed}-{self.inner.epoch}-{key}-residuals")
        return rng.randrange(self.num_timesteps), rng.random() < self.drop_probability

    def __call__(self, raw: dict) -> dict:
        out = self.inner(raw)
        key = out["key"]
        k, dropped = self.draw(key)
        if dropped:
            out["caption"] = ""
            if "text_embeds" in out:
                self.drop_cached_text(out)
        path = residual_path(self.root, key)
        try:
            found = read_residuals(path, k, "uncond" if dropped else "cond", self.shapes)
        except ResidualMismatch as e:
            if self.on_mismatch == "error":
                raise
            log.warning("%s; computing this sample's residuals on the fly (residuals.on_mismatch=on_the_fly)", e)
            found = None
        out["residual_uncond"] = torch.tensor(dropped)
        if found is None:  # zeros of the expected shapes: the batch collates; the mode computes these rows
            out[RESIDUAL_STATE] = "miss"
            out["residual_latents"] = torch.zeros(self.latent_shape, dtype=self.dtype)
            out["residual_noise"] = torch.zeros(self.latent_shape, dtype=self.dtype)
            out["residual_timestep"] = torch.tensor(0)
            for name, shape in self.shapes.items():
                out[f"residual_{name}"] = torch.zeros(shape, dtype=self.dtype)
            return out
        out[RESIDUAL_STATE] = "hit"
        out.update(found)
        return out

    def drop_cached_text(self, out: dict) -> None:
        if self.empty is None:
            from safetensors.torch import load_file

            self.empty = load_file(self.root / EMPTY_PROMPT)
        out["text_embeds"] = self.empty["text_embeds"].to(out["text_embeds"].dtype)
        if "pooled_text_embeds" in out:
            out["pooled_text_embeds"] = self.empty["pooled_text_embeds"].to(out["pooled_text_embeds"].dtype)


def read_residuals(path: Path, k: int, branch: str, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Draw ``k``'s latents, timestep, noise and ``branch`` residuals; [C,H,W] or [1,C,H,W] per scale.
    A missing file, a wrong scale count or shape raises ``ResidualMismatch`` naming the file and scale."""
    from safetensors import safe_open

    if not path.is_file():
        raise ResidualMismatch(f"{path}: no residual file for this sample")
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        prefix = f"{branch}.{k}."
        found = sorted(n[len(prefix) :] for n in names if n.startswith(prefix))
        if found != sorted(shapes):
            raise ResidualMismatch(
                f"{path}: {len(found)} scales for {branch} draw {k} ({', '.join(found) or 'none'}), expected "
                f"{len(shapes)} ({', '.join(shapes)})"
            )
        out = {"residual_latents": f.get_tensor("latents"), "residual_noise": _chw(f.get_tensor(f"noise.{k}")),
               "residual_timestep": f.get_tensor("timesteps")[k]}  # fmt: skip
        for name, shape in shapes.items():
            tensor = _chw(f.get_tensor(prefix + name))
            if tuple(tensor.shape) != tuple(shape):
                raise ResidualMismatch(f"{path}: scale {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            out[f"residual_{name}"] = tensor
    out["residual_latents"] = _chw(out["residual_latents"])
    return out


def residual_shapes(residuals, family, latent: list[int], resolution: int, text: tuple, hint_channels: int,
                    device) -> dict[str, list[int]]:  # fmt: skip
    """A ControlNet's per-scale residual shapes (C, H, W) for one sample, from one call on zeros.
    ``residuals``: a ``models.adapters.ControlResiduals`` (wherever it keeps the ControlNet)."""
    states, pooled = text
    added = None
    if pooled is not None:  # SDXL: any micro-conditioning will do for shapes
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[resolution] * 6], device=device, dtype=pooled.dtype)}
    with torch.no_grad():
        cond = {"encoder_hidden_states": states, "added_cond_kwargs": added}
        down, mid = residuals(family, torch.zeros(1, *latent, device=device),
                              torch.zeros(1, dtype=torch.long, device=device), cond,
                              torch.zeros(1, hint_channels, resolution, resolution, device=device), 1.0)  # fmt: skip
    return {name: list(r.shape[1:]) for name, r in zip(scale_names(len(down)), (*down, mid), strict=True)}


def _chw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[0] if tensor.dim() == 4 and tensor.shape[0] == 1 else tensor


def batch_residuals(batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The batch's stored (down, mid) residuals, as a family's ``denoise`` takes them."""
    down, i = [], 0
    while f"residual_down_{i}" in batch:
        down.append(batch[f"residual_down_{i}"])
        i += 1
    return down, batch["residual_mid"]
