"""``controlnet-eval``: a trained ControlNet on held-out samples, with and without control.

Every sample is generated with a fixed seed (``seed`` + its index) at each ``control_scales``
entry, the baseline being 0 (the same base and seeds, the ControlNet's residuals switched off).
Writes ``metrics.json`` (means per scale and per-sample scores), ``grid.png`` (hint | one column
per scale) and prints a table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from nemo_controlnet.data.datamodule import held_out
from nemo_controlnet.eval.metrics import mean_metrics, sample_metrics
from nemo_controlnet.inference.generate import load_sampler, resolve_controlnet
from nemo_controlnet.inference.pipeline import grid, hint_to_uint8, sample
from nemo_controlnet.io import atomic_path, write_json_atomic
from nemo_controlnet.models.formats import METADATA, model_card, read_metadata

log = logging.getLogger(__name__)

SETTINGS = ("num_inference_steps", "guidance_scale", "seed", "sampler", "control_scales")
HEADLINE = ("iou", "edge_f1", "edge_f1_tol1", "ssim", "circle_color_error", "background_color_error")


def label(scale: float) -> str:
    return "uncontrolled" if scale == 0 else ("controlled" if scale == 1 else f"control_scale_{scale:g}")


def table(results: dict[str, dict]) -> str:
    names = list(results)
    keys = [k for k in HEADLINE if any(k in r for r in results.values())]
    keys += sorted({k for r in results.values() for k in r} - set(keys))
    lines = [f"{'metric':<24}" + "".join(f"{n:>16}" for n in names)]
    for k in keys:
        lines.append(f"{k:<24}" + "".join(f"{results[n].get(k, float('nan')):>16.4f}" for n in names))
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict:
    if not cfg.get("shards"):
        raise ValueError("shards: required (held-out shards with hints: a directory, pattern or manifest.json)")
    scales = [float(s) for s in cfg.control_scales]
    if not scales:
        raise ValueError("control_scales: give at least one (e.g. [1.0, 0.0]: with control, and the baseline)")
    loaded = load_sampler(cfg)
    data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    prompts, hints, metas, keys = held_out(cfg.shards, data_cfg, loaded.hint_channels, int(cfg.num_samples),
                                           cfg.get("keys"), resolution=loaded.resolution)  # fmt: skip
    if not prompts:
        raise ValueError(f"shards={cfg.shards}: no usable samples")
    log.info("evaluating on %d samples of %s at %d px, control scales %s", len(keys), cfg.shards,
             loaded.resolution, scales)  # fmt: skip

    start, bs = time.time(), int(cfg.batch_size)
    images: dict[str, list[np.ndarray]] = {}
    for scale in scales:
        out = []
        for first in tqdm(range(0, len(keys), bs), desc=f"eval {label(scale)}", unit="batch"):
            idx = list(range(first, min(first + bs, len(keys))))
            out += list(sample(
                loaded.pipe, [prompts[i] for i in idx], hints[idx], num_inference_steps=cfg.num_inference_steps,
                guidance_scale=loaded.guidance_scale, control_scale=scale, seed=[int(cfg.seed) + i for i in idx],
                dtype=loaded.dtype,
            ))  # fmt: skip
        images[label(scale)] = out
    hint_images = [hint_to_uint8(h) for h in hints]
    per_sample = {
        name: [sample_metrics(img, h, m) for img, h, m in zip(imgs, hint_images, metas, strict=True)]
        for name, imgs in images.items()
    }
    results = {name: mean_metrics(rows) for name, rows in per_sample.items()}

    controlnet_dir, _ = resolve_controlnet(cfg.controlnet)
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else controlnet_dir.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "controlnet": str(controlnet_dir),
        "shards": str(cfg.shards),
        "num_samples": len(keys),
        "resolution": loaded.resolution,
        "settings": {**{k: OmegaConf.to_container(cfg, resolve=True)[k] for k in SETTINGS},
                     "guidance_scale": loaded.guidance_scale},
        "results": results,
        "per_sample": [
            {"key": k, "prompt": p, **{n: per_sample[n][i] for n in per_sample}}
            for i, (k, p) in enumerate(zip(keys, prompts, strict=True))
        ],  # fmt: skip
        "seconds": round(time.time() - start, 1),
    }
    write_json_atomic(out_dir / "metrics.json", report)
    rows = [[hint_images[i], *(images[n][i] for n in images)] for i in range(min(len(keys), int(cfg.grid_rows)))]
    with atomic_path(out_dir / "grid.png") as tmp:
        Image.fromarray(grid(rows)).save(tmp, format="PNG")
    print(table(results))
    log.info("wrote %s and grid.png (hint | %s) in %.1fs", out_dir / "metrics.json", " | ".join(images),
             report["seconds"])  # fmt: skip
    if cfg.get("update_model_card") and {"controlled", "uncontrolled"} <= set(results):
        update_model_card(controlnet_dir, report)
    return report


def update_model_card(controlnet_dir: Path, report: dict) -> None:
    """Record the evaluation in the ControlNet directory's metadata and README.md."""
    metadata = read_metadata(controlnet_dir)
    metadata["eval"] = {k: report[k] for k in ("shards", "num_samples", "resolution", "settings")}
    metadata["eval"].update(controlled=report["results"]["controlled"], uncontrolled=report["results"]["uncontrolled"])
    write_json_atomic(controlnet_dir / METADATA, metadata)
    grid_name = "validation.png" if (controlnet_dir / "validation.png").is_file() else None
    with atomic_path(controlnet_dir / "README.md") as tmp:
        tmp.write_text(model_card(metadata, grid_name))
    log.info("model card of %s updated with the evaluation", controlnet_dir)
