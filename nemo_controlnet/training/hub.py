"""``export.push_to_hub`` (diffusers' ``--push_to_hub``/``--hub_model_id``): the exported folder (a diffusers
ControlNet directory with its model card) goes to the Hugging Face Hub through ``huggingface_hub``. Offline
(``HF_HUB_OFFLINE=1``, or no network) the run does not fail: it says the folder is ready and how to upload it."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# What never goes up: a checkpoint's or a writer's leftovers (the export itself holds none; a guard)
IGNORE = ["*.tmp*", "*.ckpt", ".lock*"]


def hub_model_id(export_cfg: DictConfig, run_dir: Path) -> str:
    """``export.hub_model_id``, or the run directory's name (diffusers: the output_dir's), which the Hub
    puts under the token's user."""
    return str(export_cfg.get("hub_model_id") or run_dir.resolve().name)


def upload_command(repo_id: str, folder: Path) -> str:
    return f"hf upload {repo_id} {folder} ."  # "." : the folder's files at the repo's root


def push_to_hub(folder: Path, repo_id: str, step: int) -> str | None:
    """Upload ``folder`` to the model repo ``repo_id`` (created when missing); the commit URL, or None when
    it could not be uploaded (offline, no token, no network): then the folder stays ready, and the log
    says the command that uploads it later."""
    later = (f"the upload-ready folder is {folder}; upload it later with: {upload_command(repo_id, folder)} "
             "(huggingface_hub < 1.0: huggingface-cli upload ...)")  # fmt: skip
    import huggingface_hub
    from huggingface_hub.constants import is_offline_mode

    if is_offline_mode():
        log.warning("export.push_to_hub: HF_HUB_OFFLINE is set, nothing uploaded; %s", later)
        return None
    try:
        huggingface_hub.create_repo(repo_id, exist_ok=True)
        info = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=IGNORE,
                                             commit_message=f"nemo_controlnet: step {step}")  # fmt: skip
    except Exception as e:  # no network, no token, no permission: the run's result is on disk either way
        log.error("export.push_to_hub: upload to %s failed (%s: %s); %s", repo_id, type(e).__name__, e, later)
        return None
    url = str(getattr(info, "commit_url", info))
    log.info("export.push_to_hub: %s uploaded to %s (%s)", folder, repo_id, url)
    return url
