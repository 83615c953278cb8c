"""``controlnet-prep mode=encode``: shards -> shards with cached VAE latents and text embeddings.

At 512 px about half the FLOPs of a ControlNet step are the VAE encoder; the text encoder runs
every step too. Both are locked, so their outputs can be computed once. Each input shard becomes
one output shard whose samples carry, beside the center-cropped image (for eyes and evaluation),
the hint cropped the same way and the caption:

- ``latent.npy``: the VAE's posterior (mean and log-variance, float16, 2C x H/8 x W/8). Training
  draws a fresh sample from it every step, as online encoding does (a stored single draw would
  show the model the same latent every epoch).
- ``text.npy`` (and ``pooled.npy`` for SDXL, SD3, Flux): the text encoders' output for the caption, as
  the model family encodes it (SD3: CLIP-L, CLIP-G and T5 states; Flux: T5 states). Caption dropout
  swaps in the empty prompt's embedding at training time; training then releases the text encoders
  (``perf.release_text_encoders``).
- ``hint_latent.npy`` (SD3, Flux: their ControlNets take the hint VAE-encoded): the VAE's posterior of
  the hint as training reads it (``model.hint_channels``, one channel repeated to three), sampled every
  step like the image's. With it the step never runs the VAE encoder.
- ``json``: the input's metadata plus ``sdxl: {original_size, crop_top_left}`` (micro-conditioning).

T5 states are large (Flux at 512 tokens: 4 MiB per sample in float16), so an input shard may become
several output shards: ``encode.max_shard_mb`` bounds each (``<prefix>-<index>.tar``, then
``<prefix>-<index>.p01.tar``, ...; the unit's stats list its parts and the manifest every part).

The manifest's ``params.encoded`` records the encoders' fingerprint, the resolution and the crop.
Training refuses these shards over another base model, at another resolution, or with random
crops or flips (a cached latent is one fixed crop; the hint would move, the latent would not).
Flipped variants are not cached: train on the unencoded shards for augmentation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from nemo_controlnet import __version__
from nemo_controlnet.data.decode import BadSample, decode_caption, load_hint, load_hint_array, load_image, open_image
from nemo_controlnet.data.layout import (
    HINT_LATENT_MEMBER,
    LATENT_MEMBER,
    MANIFEST,
    POOLED_MEMBER,
    SDXL_META,
    TEXT_MEMBER,
)
from nemo_controlnet.data.tarshards import shard_samples
from nemo_controlnet.data.transforms import ResizeCrop, normalize_hint, normalize_image, to_uint8_chw
from nemo_controlnet.data.webdataset import SkipCounter, expand_shards
from nemo_controlnet.io import atomic_path
from nemo_controlnet.models.families import family_for
from nemo_controlnet.models.stack import compute_dtype, encoder_fingerprint, freeze
from nemo_controlnet.prep.progress import JobControl
from nemo_controlnet.prep.shards import check_params, plan_units, resolve_task, shard_name, stats_path
from nemo_controlnet.prep.shards import encode as encode_image
from nemo_controlnet.prep.shards import write_manifest, write_stats
from nemo_controlnet.prep.writer import Cancelled

log = logging.getLogger(__name__)


def crop_sample(sample: dict, cfg: DictConfig, hint_fn) -> dict:
    """One raw sample -> cropped image and hint (PIL), caption and micro-conditioning."""
    image = open_image(sample.get(cfg.image_key), "image")
    geometry = ResizeCrop.center(image.width, image.height, int(cfg.resolution))
    original_size = [image.height, image.width]
    image = Image.fromarray(geometry.apply(np.asarray(load_image(image, "image", draft_size=geometry.resized)[0])))
    stored = sample.get(cfg.hint_key)
    if stored is not None:
        hint = open_image(stored, "hint")
        if hint.size != (original_size[1], original_size[0]):
            raise BadSample("size_mismatch", f"image {original_size[::-1]} vs hint {hint.size}")
        hint = geometry.apply(load_hint(hint)[0], "hint")
    else:  # no hint in the input: the prep hint (Canny by default) of the cropped image
        hint = hint_fn(image, None, random.Random(f"{cfg.seed}-{sample['__key__']}"))[0]
    meta = json.loads(sample["json"]) if sample.get("json") else {}
    # As the online loader emits them for this shard image: (height, width) and (top, left).
    meta[SDXL_META] = {"original_size": original_size, "crop_top_left": [geometry.box[1], geometry.box[0]]}
    return {
        "key": sample["__key__"],
        "image": image,
        "hint": hint,
        # None when missing: the encoded shard then has no caption member either, and training
        # counts the sample under data.missing_caption as it would the unencoded one.
        "caption": decode_caption(raw) if (raw := sample.get(cfg.caption_key)) is not None else None,
        "json": meta,
    }


class Encoder:
    """The locked VAE and text encoders of a model config, on one device, in one dtype."""

    def __init__(self, model_cfg: DictConfig, device: str, precision: str | int):
        self.family = family_for(model_cfg)
        stack = self.family.build_stack(model_cfg)
        # Before any dtype change: the fingerprint training computes from the same config.
        self.fingerprint = encoder_fingerprint(stack.vae, *stack.text_encoders())
        self.dtype = compute_dtype(precision)
        self.device = torch.device(device)
        self.hint_channels = int(model_cfg.hint_channels)
        del stack.unet
        self.stack = stack
        for module in (stack.vae, *stack.text_encoders()):
            freeze(module, self.dtype).to(self.device)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], captions: list[str], hints: list[bytes] | None = None
                 ) -> dict[str, np.ndarray]:  # fmt: skip
        """The members for a batch: image posteriors, text embeddings, and for families that VAE-encode
        the hint, the hint's posterior (``hints``: the hint members as written, decoded as training
        decodes them, at the model's hint_channels)."""
        pixels = torch.stack([to_uint8_chw(np.asarray(im), 3) for im in images]).to(self.device)
        pixels = normalize_image(pixels).to(self.dtype)
        latent = self.stack.vae.encode(pixels).latent_dist.parameters
        states, pooled = self.family.encode_text(self.stack, captions)
        out = {LATENT_MEMBER: latent, TEXT_MEMBER: states}
        if self.family.encodes_hint and hints is not None:
            planes = [to_uint8_chw(load_hint_array(h)[0], self.hint_channels) for h in hints]
            out[HINT_LATENT_MEMBER] = self.family.hint_posterior(self.stack, normalize_hint(
                torch.stack(planes).to(self.device)))  # fmt: skip
        if pooled is not None:
            out[POOLED_MEMBER] = pooled
        return {k: v.float().cpu().numpy().astype(np.float16) for k, v in out.items()}


def part_name(prefix: str, index: int, part: int) -> str:
    """An encoded unit's output shards: the unit's own name, then ``.p01``, ``.p02``, ... when it is split."""
    name = shard_name(prefix, index)
    return name if part == 0 else f"{name[: -len('.tar')]}.p{part:02d}.tar"


def member_bytes(sample: dict) -> int:
    """An upper bound of a sample's bytes in a tar: each member's data, its 512-byte header, padding to
    512 bytes, and an .npy header."""
    total = 0
    for key, value in sample.items():
        if key == "__key__":
            continue
        if isinstance(value, np.ndarray):
            size = value.nbytes
        elif isinstance(value, bytes):
            size = len(value)
        else:  # text, and dicts written as JSON
            size = len((value if isinstance(value, str) else json.dumps(value)).encode())
        total += size + 1536
    return total


def encode_shard(index: int, url: str, cfg: DictConfig, encoder: Encoder, hint_fn, out_dir: Path,
                 should_stop=None) -> dict:  # fmt: skip
    """One input shard -> one output shard (or several, each under ``encode.max_shard_mb``): temp files,
    renames, then the unit's stats file. ``should_stop`` is asked before each batch: a cancelled unit
    gets no stats, so it is redone whole."""
    name = shard_name(cfg.prefix, index)
    stats_path(out_dir, name).unlink(missing_ok=True)
    start = time.time()
    counter, written = SkipCounter(), 0
    batch_size = int(cfg.encode.batch_size)
    limit = int(float(cfg.encode.get("max_shard_mb") or 0) * 2**20)  # 0: no limit
    parts: list[dict] = []
    with contextlib.ExitStack() as part_stack:
        sink, part_bytes = None, 0

        def open_part():
            nonlocal sink, part_bytes
            part_stack.close()  # the previous part: closed, then renamed into place
            tmp = part_stack.enter_context(atomic_path(out_dir / part_name(cfg.prefix, index, len(parts))))
            sink = part_stack.enter_context(wds.TarWriter(str(tmp)))
            parts.append({"name": part_name(cfg.prefix, index, len(parts)), "num_samples": 0})
            part_bytes = 0

        open_part()
        pending: list[dict] = []

        def flush() -> None:
            nonlocal written, part_bytes
            if not pending:
                return
            hints = [encode_image(s["hint"], cfg.hint_key, cfg.jpeg_quality) for s in pending]
            arrays = encoder([s["image"] for s in pending], [s["caption"] or "" for s in pending], hints)
            for i, s in enumerate(pending):
                sample = {
                    "__key__": s["key"],
                    cfg.image_key: encode_image(s["image"], cfg.image_key, cfg.jpeg_quality),
                    cfg.hint_key: hints[i],
                    **({cfg.caption_key: s["caption"]} if s["caption"] is not None else {}),
                    "json": s["json"],
                    **{member: array[i] for member, array in arrays.items()},
                }
                size = member_bytes(sample)
                if limit and size + tarfile.RECORDSIZE > limit:
                    raise ValueError(f"encode.max_shard_mb={cfg.encode.max_shard_mb}: one encoded sample takes "
                                     f"{size / 2**20:.1f} MiB; raise the limit")  # fmt: skip
                # + the archive's end: tarfile pads it to a whole record
                if limit and parts[-1]["num_samples"] and part_bytes + size + tarfile.RECORDSIZE > limit:
                    open_part()
                sink.write(sample)
                part_bytes += size
                parts[-1]["num_samples"] += 1
            written += len(pending)
            pending.clear()

        for sample in shard_samples([url], counter):
            try:
                pending.append(crop_sample(sample, cfg, hint_fn))
            except Exception as e:  # a bad sample costs one sample, counted by reason
                counter(e if isinstance(e, BadSample) else BadSample(f"error_{type(e).__name__}", str(e)))
                continue
            if len(pending) == batch_size:
                if should_stop is not None and should_stop():
                    raise Cancelled(name)
                flush()
        flush()
    stats = {"name": name, "input": url, "num_samples": written, "skipped": dict(counter.counts),
             "converted": {}, "seconds": round(time.time() - start, 3)}  # fmt: skip
    if len(parts) > 1:
        stats["parts"] = parts
    write_stats(out_dir, name, stats)
    return stats


def encode_params(cfg: DictConfig, urls: list[str], encoder: Encoder) -> dict:
    return {
        "mode": "encode",
        "inputs": urls,
        "prefix": cfg.prefix,
        "image_key": cfg.image_key,
        "hint_key": cfg.hint_key,
        "caption_key": cfg.caption_key,
        "hint": OmegaConf.to_container(cfg.hint, resolve=True),
        "seed": cfg.seed,
        "version": __version__,
        "encoded": {
            "fingerprint": encoder.fingerprint,
            "resolution": int(cfg.resolution),
            "crop": "center",
            "precision": str(cfg.encode.precision),
            "members": {"latent": LATENT_MEMBER, "text": TEXT_MEMBER, "pooled": POOLED_MEMBER,
                        **({"hint_latent": HINT_LATENT_MEMBER} if encoder.family.encodes_hint else {})},
            # the hint's posterior: of the hint read at these channels (one repeated to three for the VAE)
            **({"hint_latent_channels": encoder.hint_channels} if encoder.family.encodes_hint else {}),
            "max_shard_mb": cfg.encode.get("max_shard_mb"),
            "latent": "VAE posterior parameters (mean, logvar), unscaled",
            "model": OmegaConf.to_container(cfg.model, resolve=True),
        },
    }


def encode_shards(cfg: DictConfig, job: JobControl) -> dict:
    if not cfg.get("model"):
        raise ValueError("mode=encode needs model=<the base you will train over> (e.g. model=sd15)")
    if not cfg.encode.get("input"):
        raise ValueError("encode.input: required for mode=encode (the shards to encode: dir, pattern, manifest.json)")
    if not cfg.get("resolution"):
        raise ValueError("resolution: required for mode=encode (the training resolution; latents are of that crop)")
    out_dir = Path(cfg.out_dir)
    urls = expand_shards(cfg.encode.input)
    if any(Path(u).resolve().parent == out_dir.resolve() for u in urls if "://" not in u):
        raise ValueError(f"out_dir={out_dir} holds the input shards: encode into another directory")
    device = cfg.encode.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = Encoder(cfg.model, device, cfg.encode.precision)
    params = encode_params(cfg, urls, encoder)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_params(out_dir, params, cfg.overwrite)
    task_index, num_tasks = resolve_task(cfg.task_index, cfg.num_tasks)
    _, todo = plan_units(out_dir, len(urls), cfg.prefix, task_index, num_tasks, cfg.overwrite)
    log.info("encode: %d input shards, %d to encode on %s in %s, encoders %s",
             len(urls), len(todo), device, encoder.dtype, encoder.fingerprint)  # fmt: skip
    hint_fn = instantiate(cfg.hint)
    start, written, skipped = time.time(), 0, Counter()
    job.report("encode", 0, len(todo), 0, None, 0, 0)
    for done, i in enumerate(todo, start=1):
        try:
            stats = encode_shard(i, urls[i], cfg, encoder, hint_fn, out_dir, job.cancelled)
        except Cancelled as e:
            log.info("cancelled while encoding %s (not kept)", e)
            break
        written += stats["num_samples"]
        skipped.update(stats["skipped"])
        n_skipped = sum(skipped.values())
        job.report("encode", done, len(todo), written + n_skipped, None, written, n_skipped)
        if job.cancelled():  # between shards: each written whole or not at all
            break
    seconds = time.time() - start
    log.info("encode: %d written, %d skipped %s, %.1fs (%.1f samples/s)",
             written, sum(skipped.values()), dict(skipped), seconds, written / max(seconds, 1e-9))  # fmt: skip
    summary = {"written": written, "skipped": dict(skipped), "seconds": round(seconds, 3)}
    if num_tasks == 1:
        manifest = write_manifest(out_dir, params, len(urls), cfg.prefix)
        summary.update(manifest=str(out_dir / MANIFEST), complete=manifest["complete"])
    return summary
