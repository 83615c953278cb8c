"""Generation: a trained ControlNet + its base -> images for hints (or images + a detector) and prompts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from nemo_controlnet.data.decode import read_file
from nemo_controlnet.data.transforms import hint_to_tensor, prepare_hint, prepare_image
from nemo_controlnet.inference.pipeline import grid, hint_to_uint8, sample
from nemo_controlnet.io import atomic_path
from nemo_controlnet.models.adapters import load_adapter
from nemo_controlnet.models.families import family_for
from nemo_controlnet.models.formats import read_metadata, verify_weights
from nemo_controlnet.models.stack import fingerprint, freeze

log = logging.getLogger(__name__)


def resolve_controlnet(path: str | Path) -> tuple[Path, Path | None]:
    """(ControlNet directory, trained UNet directory or None) from a run_dir or a ControlNet dir."""
    path = Path(path)
    if (path / "controlnet" / "config.json").is_file():  # a run_dir
        path = path / "controlnet"
    if (path / "config.json").is_file():
        unet = path.parent / "unet"  # written beside controlnet/ when the decoder was unlocked
        has_unet = path.name == "controlnet" and (unet / "config.json").is_file()
        return path, unet if has_unet else None
    raise FileNotFoundError(
        f"controlnet={path}: neither a run_dir with controlnet/ nor a diffusers ControlNet directory"
    )


def default_guidance(controlnet: str | Path) -> float:
    """The guidance scale sampling takes for this ControlNet when none is given (``guidance_scale: null``):
    the default of the family of the base recorded with it (SD 7.5, SD3 7.0, Flux its training guidance).
    Reads metadata only; nothing is built."""
    controlnet_dir, _ = resolve_controlnet(controlnet)
    meta = read_metadata(controlnet_dir)
    if "base_model" not in meta:
        raise ValueError(f"{controlnet_dir}: no base model recorded with this ControlNet (metadata.json)")
    return float(family_for(OmegaConf.create(meta["base_model"])).default_guidance_scale)


def load_hints(cfg: DictConfig, resolution: int, channels: int) -> torch.Tensor:
    """The hints to generate for: ``hints`` decoded and center-cropped as training's are, or the
    ``hint`` detector run on ``images`` after the same crop (as on-the-fly hints are in training)."""
    if cfg.hints and cfg.images:
        raise ValueError("give either hints=[...] or images=[...] with hint=<detector>, not both")
    if cfg.hints:
        return torch.stack([prepare_hint(read_file(p, "hints"), resolution, channels) for p in cfg.hints])
    if cfg.images:
        if not cfg.get("hint"):
            raise ValueError("images=[...] needs hint=<detector> (e.g. hint=canny) to compute the hints")
        detector = instantiate(cfg.hint)
        return torch.stack([detect_hint(read_file(p, "images"), detector, resolution, channels) for p in cfg.images])
    raise ValueError("nothing to generate: give hints=[...] or images=[...] with hint=canny")


def detect_hint(image: bytes | Image.Image, detector, resolution: int, channels: int) -> torch.Tensor:
    """The hint of one source image: center-cropped as the training loader does, then the detector
    (as on-the-fly hints are computed after augmentation); float [0, 1] CHW."""
    return hint_to_tensor(detector(prepare_image(image, resolution))[0], channels)


def broadcast_prompts(prompts: list[str], n: int) -> list[str]:
    prompts = list(prompts) or [""]
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise ValueError(f"prompts: {len(prompts)} given for {n} hints; give one, or one per hint")
    return prompts


@dataclass
class Sampler:
    """A trained ControlNet over its base, as a diffusers pipeline, and what sampling needs to know."""

    pipe: object
    meta: dict
    hint_channels: int
    resolution: int
    device: torch.device
    dtype: torch.dtype
    guidance_scale: float  # ``guidance_scale``, or the family's default when that is null


def load_sampler(cfg: DictConfig) -> Sampler:
    """The ControlNet of ``cfg.controlnet`` (run_dir or diffusers dir) over the base recorded with it
    (or ``cfg.model`` with ``use_recorded_base=false``), checked by fingerprint, on ``cfg.device``."""
    controlnet_dir, unet_dir = resolve_controlnet(cfg.controlnet)
    meta = read_metadata(controlnet_dir)
    recorded = cfg.get("use_recorded_base", True) and "base_model" in meta
    model_cfg = OmegaConf.create(meta["base_model"]) if recorded else cfg.model
    log.info(
        "base model: %s (%s)", model_cfg.get("name", "?"), "as recorded with the ControlNet" if recorded else "model="
    )
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    family = family_for(model_cfg)
    stack = family.build_stack(model_cfg)
    expected = meta.get("base_fingerprint")
    if expected and fingerprint(stack.unet, stack.vae, *stack.text_encoders()) != expected:
        raise RuntimeError(
            f"the base model built here differs from the one {controlnet_dir} was trained over "
            f"(fingerprint {expected}); set use_recorded_base=false and point model= at that base"
        )
    for weights in (controlnet_dir, unet_dir):
        if weights is not None:
            verify_weights(weights)
    if unet_dir:  # the base's unlocked decoder, trained with the ControlNet (model.sd_locked=false)
        stack = replace(stack, unet=type(stack.unet).from_pretrained(unet_dir, local_files_only=True))
    controlnet, hint_channels = family.load_controlnet(controlnet_dir, meta, stack)
    for module in (stack.unet, stack.vae, *stack.text_encoders(), controlnet):
        freeze(module, dtype).to(device)
    log.info("%s family: models on %s in %s", family.name, device, dtype)
    pipe = family.pipeline(stack, controlnet, cfg.sampler)
    if cfg.get("lora"):  # an adapter trained under this ControlNet (adapter mode: run_dir/lora)
        kind = load_adapter(pipe, cfg.lora)
        log.info("%s adapter loaded from %s", kind, cfg.lora)
    resolution = int(cfg.get("resolution") or meta.get("resolution") or 512)
    guidance = cfg.get("guidance_scale")
    guidance = float(family.default_guidance_scale if guidance is None else guidance)
    return Sampler(pipe, meta, hint_channels, resolution, device, dtype, guidance)


def sample_batches(
    loaded: Sampler,
    prompts: list[str],
    hints: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    control_scale: float,
    negative_prompt: str | None = None,
    guess_mode: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the batch's first hint, its images) for ``hints`` in batches of ``batch_size``, the
    batch at ``start`` seeded ``seed + start``: what controlnet-generate and the UI both sample."""
    for start in tqdm(range(0, len(hints), batch_size), desc="generate", unit="batch"):
        images = sample(
            loaded.pipe,
            prompts[start : start + batch_size],
            hints[start : start + batch_size],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            control_scale=control_scale,
            seed=seed + start,
            dtype=loaded.dtype,
            negative_prompt=negative_prompt,
            guess_mode=guess_mode,
        )
        yield start, images


def generate(cfg: DictConfig) -> list[Path]:
    loaded = load_sampler(cfg)
    hints = load_hints(cfg, loaded.resolution, loaded.hint_channels)
    prompts = broadcast_prompts(cfg.prompts, len(hints))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    batches = sample_batches(
        loaded, prompts, hints, batch_size=int(cfg.batch_size), seed=int(cfg.seed),
        num_inference_steps=cfg.num_inference_steps, guidance_scale=loaded.guidance_scale,
        control_scale=cfg.control_scale, negative_prompt=cfg.negative_prompt,
        guess_mode=bool(cfg.get("guess_mode", False)),
    )  # fmt: skip
    for start, images in batches:
        for i, image in enumerate(images):
            path = out_dir / f"{start + i:05d}.png"
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
            written.append(path)
            rows.append([hint_to_uint8(hints[start + i]), image])
    with atomic_path(out_dir / "grid.png") as tmp:
        Image.fromarray(grid(rows)).save(tmp, format="PNG")
    log.info("wrote %d image(s) and grid.png to %s", len(written), out_dir)
    return written
