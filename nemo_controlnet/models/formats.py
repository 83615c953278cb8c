"""What a run writes for other tools: a diffusers ControlNet directory plus our run metadata."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from diffusers import ControlNetModel

from nemo_controlnet.io import atomic_dir

log = logging.getLogger(__name__)

METADATA = "nemo_controlnet.json"


def export_controlnet(controlnet: ControlNetModel, out_dir: str | Path, metadata: dict, unet=None) -> Path:
    """``out_dir`` becomes a diffusers ControlNet directory (safetensors) that
    ``ControlNetModel.from_pretrained`` loads; ``nemo_controlnet.json`` records how it was trained
    (base model config and fingerprint, only_mid_control, hint format, steps). With an unlocked
    UNet decoder (sd_locked=false) the trained UNet goes beside it in ``<out_dir>/../unet``.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    if unet is not None:
        with atomic_dir(out_dir.parent / "unet") as tmp:
            unet.save_pretrained(tmp, safe_serialization=True)
    log.info("exported ControlNet to %s%s", out_dir, " (+ unet)" if unet is not None else "")
    return out_dir


def read_metadata(controlnet_dir: str | Path) -> dict:
    path = Path(controlnet_dir) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}
