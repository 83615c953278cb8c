"""Generation for controlnet-ui's Generate tab: ``controlnet-generate``'s own code path (inference/generate.py)
for one hint, or one image and Canny settings, held in memory; loaded pipelines are kept for the next call.

The same inputs and seed give the images ``controlnet-generate`` writes: the config is composed from
conf/generate.yaml as the command composes it, the hint goes through the same crop, detector and range
(``prepare_hint``, ``detect_hint``), and ``num_images`` copies of it are sampled in the command's batches
and seeds (``sample_batches``), as ``controlnet-generate images=[x, x, ...]`` samples them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from nemo_controlnet.config import canny_problems
from nemo_controlnet.data.transforms import prepare_hint
from nemo_controlnet.inference.generate import (
    Sampler,
    broadcast_prompts,
    detect_hint,
    load_sampler,
    resolve_controlnet,
    sample_batches,
)
from nemo_controlnet.inference.pipeline import SAMPLERS, hint_to_uint8
from nemo_controlnet.ui.overrides import ProblemsError, compose, format_override

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CANNY_CONFIG = "hint/canny.yaml"  # hint=canny's settings, under conf/


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # num_images of (H, W, 3) uint8 RGB
    hint: np.ndarray  # (H, W, 3) uint8 RGB: the hint as the ControlNet saw it (cropped, resized, detected)


def _picture(array: Any, what: str) -> Image.Image:
    """A UI image (H, W), (H, W, 3) or (H, W, 4) uint8, or a PIL image, as the PIL image a PNG of it decodes to."""
    if isinstance(array, Image.Image):
        return array
    array = np.asarray(array)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or 0 in array.shape:
        raise ProblemsError({what: f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {array.shape}"})
    if array.dtype != np.uint8:
        if not (np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255):
            raise ProblemsError({what: f"expected 8-bit pixels (uint8), got {array.dtype}"})
        array = array.astype(np.uint8)
    return Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def canny_detector(settings: dict | None = None):
    """``hint=canny`` (conf/hint/canny.yaml) with ``settings`` over it, as ``hint.low_threshold=...``
    overrides it for the command; field-keyed ``ProblemsError`` for bad thresholds or blur."""
    cfg = OmegaConf.load(resources.files("nemo_controlnet.conf") / CANNY_CONFIG)
    settings = dict(settings or {})
    unknown = sorted(k for k in settings if k not in cfg or k.startswith("_"))
    if unknown:
        raise ProblemsError({k: f"not a Canny setting (known: {', '.join(k for k in cfg if k[0] != '_')})"
                             for k in unknown})  # fmt: skip
    cfg = OmegaConf.merge(cfg, settings)
    problems = canny_problems(cfg.low_threshold, cfg.high_threshold, cfg.blur)
    if problems:
        raise ProblemsError(problems)
    return instantiate(cfg)


def _stamp(*paths: Path | None) -> tuple:
    """What changes when a ControlNet (or adapter) directory is written again: its files' sizes and times."""
    stamp = []
    for path in paths:
        if path is not None and path.is_dir():
            for f in sorted(path.iterdir()):
                if f.is_file():
                    st = f.stat()
                    stamp.append((f.name, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


class Generator:
    """Images from a trained ControlNet for the UI. Samplers are kept loaded (the ``max_loaded`` most
    recently used), keyed by ControlNet directory, adapter, device and sampler; one reloads when its
    directory is written again (a run exported anew). One generation at a time (a lock): the UI's
    threads share the models."""

    def __init__(self, device: str = "auto", sampler: str = "unipc", batch_size: int = 4, max_loaded: int = 2):
        if device not in DEVICES:
            raise ValueError(f"device={device!r}: expected one of {', '.join(DEVICES)}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
        self.device, self.sampler, self.batch_size, self.max_loaded = device, sampler, int(batch_size), int(max_loaded)
        self._loaded: OrderedDict[tuple, tuple[tuple, Sampler]] = OrderedDict()
        self._lock = threading.RLock()

    def load(self, controlnet: str | os.PathLike, lora: str | os.PathLike | None = None) -> Sampler:
        """The sampler for ``controlnet`` (a training run_dir or a diffusers ControlNet directory) over the
        base recorded with it, as ``controlnet-generate`` loads it; from the cache when unchanged."""
        controlnet_dir, unet_dir = resolve_controlnet(controlnet)
        lora_dir = Path(lora).expanduser().resolve() if lora else None
        key = (str(controlnet_dir.resolve()), str(lora_dir) if lora_dir else None, self.device, self.sampler)
        stamp = _stamp(controlnet_dir, unet_dir, lora_dir)
        with self._lock:
            cached = self._loaded.get(key)
            if cached is not None and cached[0] == stamp:
                self._loaded.move_to_end(key)
                return cached[1]
            self._loaded.pop(key, None)  # written again since: reload
            overrides = [format_override("controlnet", key[0]), f"device={self.device}", f"sampler={self.sampler}"]
            if lora_dir:
                overrides.append(format_override("lora", str(lora_dir)))
            log.info("loading the ControlNet %s for generation", key[0])
            sampler = load_sampler(compose("generate", overrides))
            self._loaded[key] = (stamp, sampler)
            while len(self._loaded) > max(1, self.max_loaded):
                self._loaded.popitem(last=False)
            return sampler

    def clear(self) -> None:
        """Drop the loaded samplers (their memory goes back once nothing else holds them)."""
        with self._lock:
            self._loaded.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(
        self,
        controlnet: str | os.PathLike,
        prompt: str,
        hint: np.ndarray | Image.Image | None = None,
        image: np.ndarray | Image.Image | None = None,
        canny: dict | None = None,
        negative_prompt: str | None = None,
        control_scale: float = 1.0,
        guidance_scale: float | None = None,
        steps: int = 20,
        seed: int = 0,
        num_images: int = 1,
        *,
        lora: str | os.PathLike | None = None,
        resolution: int | None = None,
        guess_mode: bool = False,
    ) -> GenerationResult:
        """``num_images`` images for ``prompt`` and a ``hint`` (as the ControlNet was trained on), or an
        ``image`` whose hint Canny computes with ``canny`` settings over conf/hint/canny.yaml (those
        defaults when None). ``resolution``: the side the hint is cropped and resized to (None: the
        training resolution recorded with the ControlNet). ``guidance_scale`` None: the base family's default.
        Bad input: ``ProblemsError`` keyed by argument."""
        problems = {}
        if (hint is None) == (image is None):
            problems["hint"] = "give either a hint or an image (with Canny settings), not both" if hint is not None \
                else "give a hint, or an image to compute the hint from"  # fmt: skip
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            problems["num_images"] = f"expected an integer >= 1 (got {num_images!r})"
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            problems["steps"] = f"expected an integer >= 1 (got {steps!r})"
        if resolution is not None and (not isinstance(resolution, int) or resolution < 8 or resolution % 8):
            problems["resolution"] = f"expected a positive multiple of 8, or None (got {resolution!r})"
        if problems:
            raise ProblemsError(problems)
        detector = canny_detector(canny) if image is not None else None
        picture = _picture(hint if hint is not None else image, "hint" if hint is not None else "image")

        with self._lock:
            loaded = self.load(controlnet, lora)
            size = int(resolution or loaded.resolution)
            if detector is None:
                one = prepare_hint(picture, size, loaded.hint_channels)
            else:
                one = detect_hint(picture, detector, size, loaded.hint_channels)
            hints = torch.stack([one] * num_images)  # as controlnet-generate stacks one hint per image
            prompts = broadcast_prompts([prompt or ""], num_images)
            images: list[np.ndarray] = []
            batches = sample_batches(
                loaded, prompts, hints, batch_size=self.batch_size, seed=int(seed), num_inference_steps=steps,
                guidance_scale=loaded.guidance_scale if guidance_scale is None else float(guidance_scale),
                control_scale=float(control_scale),
                negative_prompt=negative_prompt or None, guess_mode=guess_mode,
            )  # fmt: skip
            for _, batch in batches:
                images.extend(batch)
        return GenerationResult(images=images, hint=hint_to_uint8(one))
