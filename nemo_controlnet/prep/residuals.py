"""``controlnet-prep mode=residuals``: a frozen ControlNet's residuals, precomputed per sample, for adapter
mode's ``controlnet_reroute=precompute`` (format: ``data/residuals.py``).

    controlnet-prep mode=residuals model=sd15 residuals.controlnet=/models/control_sd15_canny \\
        residuals.input=/data/shards resolution=512 out_dir=/data/residuals-canny

Input shards are plain ones (the center crop of each image at ``resolution``, as ``mode=encode`` crops it;
the stored hint, or the prep ``hint`` for a sample without one) or cached-latent shards of ``mode=encode``
(their posterior, text embeddings and cropped hint). Per sample, a generator seeded by (seed, key) draws
the posterior sample, then K timesteps and noises; latents and noise are rounded to the stored dtype
*before* the ControlNet runs, so training rebuilds exactly the noisy input the residuals belong to. One
ControlNet call per sample (2K rows: the caption's K, then the empty caption's K) keeps each file
independent of what else ran: a rerun, a resume or another batch gives the same bytes.

Resumable: a sample whose file exists and verifies (its metadata and scale shapes) is skipped; files are
written atomically. The manifest lists every sample present and is rewritten at the end of each run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet import __version__
from nemo_controlnet.data.decode import BadSample, decode_caption, load_hint_array, read_npy
from nemo_controlnet.data.layout import LATENT_MEMBER, MANIFEST, POOLED_MEMBER, SDXL_META, TEXT_MEMBER
from nemo_controlnet.data.residuals import (
    EMPTY_PROMPT,
    FORMAT,
    META_KEY,
    VERSION,
    residual_path,
    residual_shapes,
    scale_names,
)
from nemo_controlnet.data.tarshards import shard_samples
from nemo_controlnet.data.transforms import normalize_hint, normalize_image, to_uint8_chw
from nemo_controlnet.data.webdataset import SkipCounter, expand_shards
from nemo_controlnet.io import atomic_path, write_json_atomic
from nemo_controlnet.models.adapters import ControlResiduals
from nemo_controlnet.models.families import family_for
from nemo_controlnet.models.stack import compute_dtype, encoder_fingerprint, fingerprint, freeze
from nemo_controlnet.prep.encode import crop_sample
from nemo_controlnet.prep.progress import JobControl

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}  # fmt: skip


def sample_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}-{key}-residuals".encode()).digest()[:8], "little")


class ResidualMaker:
    """The locked stack and the frozen ControlNet of a model config, and one sample -> its residual tensors."""

    def __init__(self, cfg: DictConfig, device: str):
        model_cfg = OmegaConf.merge(cfg.model, {"control_stage_config": {"pretrained": str(cfg.residuals.controlnet)}})
        self.family = family_for(model_cfg)
        if not self.family.residual_precompute:
            raise ValueError(f"mode=residuals: the residual store holds SD UNet residuals, not the "
                             f"{self.family.name} family's; its adapter runs compute them on the fly")  # fmt: skip
        stack = self.family.build_stack(model_cfg)
        # Before any dtype change: the fingerprints training computes from the same configs.
        self.base_fingerprint = fingerprint(stack.unet, stack.vae, *stack.text_encoders())
        self.encoder_fingerprint = encoder_fingerprint(stack.vae, *stack.text_encoders())
        controlnet = self.family.make_controlnet(model_cfg, stack)
        self.controlnet_fingerprint = fingerprint(controlnet)
        self.dtype, self.device = compute_dtype(cfg.residuals.precision), torch.device(device)
        self.store = DTYPES[str(cfg.residuals.dtype)]
        stack.unet = None  # not needed: the ControlNet and the encoders are
        for module in (stack.vae, *stack.text_encoders(), controlnet):
            freeze(module, self.dtype).to(self.device)
        self.stack, self.controlnet = stack, ControlResiduals(controlnet)
        self.controlnet.place(self.device)
        self.scale = float(model_cfg.control_scale)
        self.hint_channels = int(model_cfg.hint_channels)
        self.scheduler = stack.noise_scheduler
        self.K, self.seed = int(cfg.residuals.num_timesteps), int(cfg.seed)
        with torch.no_grad():
            self.empty = self.family.encode_text(stack, [""])
        self.empty_stored = tuple(None if t is None else t.to(self.store) for t in self.empty)

    def tensors(self, s: dict) -> dict[str, torch.Tensor]:
        """One sample (``read_sample``) -> the file's tensors."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, s["key"]))
        scaling = self.stack.vae.config.scaling_factor
        with torch.no_grad():
            if "latent_dist" in s:
                params = s["latent_dist"][None].float()
            else:
                pixels = normalize_image(s["image"][None]).to(self.device, self.dtype)
                params = self.stack.vae.encode(pixels).latent_dist.parameters.float().cpu()
            latents = (DiagonalGaussianDistribution(params).sample(generator=g) * scaling).to(self.store)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.K,), generator=g)
            noise = torch.randn((self.K, *latents.shape[1:]), generator=g).to(self.store)
            clean = latents.float().to(self.device).expand(self.K, -1, -1, -1)
            noisy = self.scheduler.add_noise(clean, noise.float().to(self.device), timesteps.to(self.device))
            if "text_embeds" in s:  # cached text: as training reads it (stored fp16), and the stored empty prompt
                pooled = s.get("pooled_text_embeds")
                text = (s["text_embeds"][None].to(self.device, self.dtype),
                        None if pooled is None else pooled[None].to(self.device, self.dtype))  # fmt: skip
                empty = tuple(None if t is None else t.to(self.device, self.dtype) for t in self.empty_stored)
            else:
                text, empty = self.family.encode_text(self.stack, [s["caption"]]), self.empty
            view = {k: s[k][None].to(self.device) for k in ("original_size", "crop_top_left")}
            if "image" in s:
                view["image"] = s["image"][None]
            rows = [self.family.conditioning(self.stack, view, t, clean[:1]) for t in (text, empty)]
            states = torch.cat([c["encoder_hidden_states"].expand(self.K, -1, -1) for c in rows])
            added = rows[0]["added_cond_kwargs"]
            if added is not None:
                added = {k: torch.cat([c["added_cond_kwargs"][k].expand(self.K, *v.shape[1:]) for c in rows])
                         for k, v in added.items()}  # fmt: skip
            hint = normalize_hint(s["hint"][None]).to(self.device).expand(2 * self.K, -1, -1, -1)
            cond = {"encoder_hidden_states": states, "added_cond_kwargs": added}
            both = torch.cat([timesteps, timesteps]).to(self.device)
            down, mid = self.controlnet(self.family, torch.cat([noisy, noisy]), both, cond, hint, self.scale)
        out = {"latents": latents[0].contiguous(), "timesteps": timesteps.to(torch.int64)}
        names = scale_names(len(down))
        for k in range(self.K):
            out[f"noise.{k}"] = noise[k].contiguous()
            for name, r in zip(names, (*down, mid), strict=True):
                out[f"cond.{k}.{name}"] = r[k].to(self.store).cpu().contiguous()
                out[f"uncond.{k}.{name}"] = r[self.K + k].to(self.store).cpu().contiguous()
        return out

    def expected_shapes(self, resolution: int) -> tuple[dict[str, list[int]], list[int]]:
        """Per-scale (C, H, W) of one sample's residuals at ``resolution``, and the latents' (C, h, w)."""
        factor = 2 ** (len(self.stack.vae.config.block_out_channels) - 1)
        latent = [int(self.stack.vae.config.latent_channels), resolution // factor, resolution // factor]
        return residual_shapes(self.controlnet, self.family, latent, resolution, self.empty, self.hint_channels,
                               self.device), latent  # fmt: skip


def read_sample(sample: dict, cfg: DictConfig, hint_fn, hint_channels: int) -> dict:
    """A raw shard sample -> uint8 image or cached posterior/text, uint8 hint, caption, micro-conditioning."""
    key = sample["__key__"]
    if LATENT_MEMBER in sample:  # a mode=encode shard: already the center crop at its resolution
        hint = load_hint_array(sample.get(cfg.hint_key))[0]
        meta = json.loads(sample["json"]) if sample.get("json") else {}
        sdxl = meta.get(SDXL_META) or {}
        size = (hint.shape[0], hint.shape[1])
        out = {"key": key, "latent_dist": torch.from_numpy(read_npy(sample[LATENT_MEMBER], "latent")),
               "text_embeds": torch.from_numpy(read_npy(sample.get(TEXT_MEMBER), "text_embeds")),
               "hint": to_uint8_chw(hint, hint_channels),
               "original_size": torch.tensor(sdxl.get("original_size", size)),
               "crop_top_left": torch.tensor(sdxl.get("crop_top_left", (0, 0)))}  # fmt: skip
        if POOLED_MEMBER in sample:
            out["pooled_text_embeds"] = torch.from_numpy(read_npy(sample[POOLED_MEMBER], "pooled"))
        raw = sample.get(cfg.caption_key)
        out["caption"] = decode_caption(raw) if raw is not None else ""
        return out
    s = crop_sample(sample, cfg, hint_fn)
    sdxl = s["json"][SDXL_META]
    return {"key": key, "image": to_uint8_chw(np.asarray(s["image"]), 3),
            "hint": to_uint8_chw(np.asarray(s["hint"]), hint_channels), "caption": s["caption"] or "",
            "original_size": torch.tensor(sdxl["original_size"]),
            "crop_top_left": torch.tensor(sdxl["crop_top_left"])}  # fmt: skip


def file_metadata(maker: ResidualMaker, key: str, names: list[str]) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "key": key, "num_timesteps": maker.K,
                       "scales": names, "controlnet_fingerprint": maker.controlnet_fingerprint,
                       "base_fingerprint": maker.base_fingerprint, "dtype": str(maker.store).split(".")[-1]},
                      sort_keys=True)  # fmt: skip


def verifies(path: Path, metadata: str, shapes: dict[str, list[int]], latent: list[int], K: int) -> bool:
    """An existing file is this run's: the same metadata, every draw's every scale at its shape."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get(META_KEY) != metadata:
                return False
            keys = set(f.keys())
            want = {"latents", "timesteps", *(f"noise.{k}" for k in range(K))}
            want |= {f"{b}.{k}.{n}" for b in ("cond", "uncond") for k in range(K) for n in shapes}
            if keys != want or list(f.get_slice("latents").get_shape()) != latent:
                return False
            return all(list(f.get_slice(f"{b}.{k}.{n}").get_shape()) == shapes[n]
                       for b in ("cond", "uncond") for k in range(K) for n in shapes)  # fmt: skip
    except Exception:  # unreadable, truncated: made again
        return False


def manifest_params(cfg: DictConfig, maker: ResidualMaker, urls: list[str], shapes: dict, latent: list[int]) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "package_version": __version__,
        "controlnet": str(cfg.residuals.controlnet),
        "controlnet_fingerprint": maker.controlnet_fingerprint,
        "base_fingerprint": maker.base_fingerprint,
        "encoder_fingerprint": maker.encoder_fingerprint,
        "num_timesteps": maker.K,
        "num_scales": len(shapes),
        "shapes": shapes,
        "latent_shape": latent,
        "resolution": int(cfg.resolution),
        "after_augmentation": False,  # the stored center crop: training refuses random crops and flips
        "crop": "center",
        "dtype": str(maker.store).split(".")[-1],
        "precision": str(cfg.residuals.precision),
        "control_scale": maker.scale,
        "num_train_timesteps": int(maker.scheduler.config.num_train_timesteps),
        "prediction_type": maker.scheduler.config.prediction_type,
        "seed": int(cfg.seed),
        "hint": OmegaConf.to_container(cfg.hint, resolve=True),
        "inputs": urls,
        "file": "<key>_residuals.safetensors",
    }


def residual_files(cfg: DictConfig, job: JobControl) -> dict:
    r = cfg.residuals
    required = {"model": cfg.get("model"), "residuals.input": r.get("input"),
                "residuals.controlnet": r.get("controlnet"), "resolution": cfg.get("resolution")}  # fmt: skip
    for name, value in required.items():
        if not value:
            raise ValueError(f"{name}: required for mode=residuals (controlnet-prep mode=residuals model=<base> "
                             "residuals.controlnet=<ControlNet> residuals.input=<shards> resolution=<px>)")  # fmt: skip
    if int(r.num_timesteps) < 1:
        raise ValueError(f"residuals.num_timesteps={r.num_timesteps}: at least 1")
    if str(r.dtype) not in DTYPES:
        raise ValueError(f"residuals.dtype={r.dtype}: use one of {sorted(DTYPES)}")
    out_dir = Path(cfg.out_dir)
    urls = expand_shards(r.input)
    device = r.device if r.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    maker = ResidualMaker(cfg, device)
    shapes, latent = maker.expected_shapes(int(cfg.resolution))
    params = manifest_params(cfg, maker, urls, shapes, latent)
    log.info("residuals: %d shard(s), K=%d, %d scales %s, ControlNet %s over base %s, on %s in %s, stored as %s",
             len(urls), maker.K, len(shapes), list(shapes.values()), maker.controlnet_fingerprint,
             maker.base_fingerprint, device, maker.dtype, params["dtype"])  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    empty = {"text_embeds": maker.empty_stored[0][0].cpu().contiguous()}
    if maker.empty_stored[1] is not None:
        empty["pooled_text_embeds"] = maker.empty_stored[1][0].cpu().contiguous()
    with atomic_path(out_dir / EMPTY_PROMPT) as tmp:
        save_file(empty, str(tmp))
    hint_fn = instantiate(cfg.hint)
    counter, keys, written, kept = SkipCounter(), [], 0, 0
    start = time.time()
    job.report("residuals", 0, len(urls), 0, None, 0, 0)
    for done, url in enumerate(urls, start=1):
        for raw in shard_samples([url], counter):
            if job.cancelled():
                break
            key = raw["__key__"]
            try:
                path = residual_path(out_dir, key)
                s = read_sample(raw, cfg, hint_fn, maker.hint_channels)
                if s["hint"].shape[-1] != int(cfg.resolution) or s["hint"].shape[-2] != int(cfg.resolution):
                    raise BadSample("size_mismatch", f"hint {tuple(s['hint'].shape[-2:])} is not {cfg.resolution}px")
            except Exception as e:  # a bad sample costs one sample, counted by reason
                counter(e if isinstance(e, BadSample) else BadSample(f"error_{type(e).__name__}", f"{key}: {e}"))
                continue
            names = list(shapes)
            metadata = file_metadata(maker, key, names)
            if path.is_file() and verifies(path, metadata, shapes, latent, maker.K):
                kept += 1
            else:
                with atomic_path(path) as tmp:
                    save_file(maker.tensors(s), str(tmp), metadata={META_KEY: metadata})
                written += 1
            keys.append(key)
        job.report("residuals", done, len(urls), written + kept, None, written, sum(counter.counts.values()))
        if job.cancelled():
            break
    complete = not job.cancelled()
    manifest = {**params, "samples": sorted(set(keys)), "skipped": dict(sorted(counter.counts.items())),
                "complete": complete}  # fmt: skip
    write_json_atomic(out_dir / MANIFEST, manifest)
    seconds = time.time() - start
    log.info("residuals: %d written, %d kept (already there), %d skipped %s, %.1fs", written, kept,
             sum(counter.counts.values()), dict(counter.counts), seconds)  # fmt: skip
    return {"written": written, "kept": kept, "skipped": dict(Counter(counter.counts)), "seconds": round(seconds, 3),
            "manifest": str(out_dir / MANIFEST), "complete": complete}  # fmt: skip
