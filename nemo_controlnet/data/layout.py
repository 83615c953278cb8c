"""What prep writes and loading reads, named once: manifest and cached-member names, the image
extensions of a folder, the mask member, where a precomputed hint sits beside its image."""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.json"

# Members of shards written by ``controlnet-prep mode=encode``.
LATENT_MEMBER, TEXT_MEMBER, POOLED_MEMBER = "latent.npy", "text.npy", "pooled.npy"
HINT_LATENT_MEMBER = "hint_latent.npy"  # families that VAE-encode the hint (SD3, Flux): its posterior
SDXL_META = "sdxl"  # the ``json`` member's key for SDXL micro-conditioning: original_size, crop_top_left

# An optional per-sample mask (controlnet.aux_loss=masked_recon): the member ``<mask_key>.png`` (single
# channel, white = inside), the batch's ``mask`` (uint8 1xHxW, 0 or 255) with ``mask_present`` (bool per
# sample) when only some samples of a batch have one.
MASK, MASK_PRESENT = "mask", "mask_present"


def mask_member(mask_key: str) -> str:
    """The tar member (the sample dict's key) holding a sample's mask."""
    return f"{mask_key}.png"


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def find_images(root: Path, exclude_dirs: set[str] | tuple[str, ...] = ()) -> list[Path]:
    """Images found recursively under ``root``, sorted; hidden and excluded directories skipped."""
    exclude, found = set(exclude_dirs or ()), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude and not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def precomputed_hint_path(hints_dir: Path, relpath: str | Path, suffix: str) -> Path:
    """``<hints_dir>/<subdirs>/<stem>_<suffix>.png`` for the image at ``relpath`` under the root."""
    relpath = Path(relpath)
    return hints_dir / relpath.parent / f"{relpath.stem}_{suffix}.png"
