"""The run's Lightning loggers from ``report_to`` (diffusers' argument; ``logger`` is its older name here):
TensorBoard, CSV and Weights & Biases, named by ``tracker_project_name``. W&B runs offline unless
``wandb.mode=online``: a run never waits on a network, and ``wandb sync`` uploads it later."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.config import report_to

log = logging.getLogger(__name__)

WANDB_PROJECT = "nemo_controlnet"  # the W&B project when tracker_project_name is null


def log_location(cfg: DictConfig, run_dir: Path) -> tuple[Path, str]:
    """(save_dir, name) of the TensorBoard and CSV loggers: ``run_dir/logs`` as always, or
    ``run_dir/logs/<tracker_project_name>`` when that is set (the UI reads everything under logs/)."""
    project = cfg.get("tracker_project_name")
    return (run_dir / "logs", str(project)) if project else (run_dir, "logs")


def wandb_logger(cfg: DictConfig, run_dir: Path) -> Logger:
    from lightning.pytorch.loggers import WandbLogger

    wandb_cfg = cfg.get("wandb") or {}
    online = wandb_cfg.get("mode", "offline") == "online"
    extra = {"entity": wandb_cfg.entity} if wandb_cfg.get("entity") else {}
    save_dir = run_dir / "logs"
    save_dir.mkdir(parents=True, exist_ok=True)  # wandb writes its wandb/ folder here
    logger = WandbLogger(
        project=cfg.get("tracker_project_name") or WANDB_PROJECT,
        name=run_dir.resolve().name,
        save_dir=str(save_dir),
        offline=not online,
        mode="online" if online else "offline",  # the config decides, not a WANDB_MODE left in the environment
        config=OmegaConf.to_container(cfg, resolve=True),  # what accelerate's init_trackers(config=) records
        **extra,
    )
    if not online:
        log.info("W&B offline in %s/wandb (wandb.mode=offline); upload later with: wandb sync %s/wandb/offline-run-*",
                 save_dir, save_dir)  # fmt: skip
    return logger


def make_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """One Lightning logger per name ``report_to`` resolves to (``config.report_to``); none: ``[]``."""
    names = report_to(cfg)
    save_dir, name = log_location(cfg, run_dir)
    loggers: list[Logger] = []
    for kind in names:
        if kind == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=str(save_dir), name=name, version=""))
        elif kind == "csv":
            # A new version folder per (resumed) segment: the CSV logger rewrites its directory's file.
            loggers.append(CSVLogger(save_dir=str(save_dir), name=name))
        elif kind == "wandb":
            loggers.append(wandb_logger(cfg, run_dir))
    log.info("loggers: %s", ", ".join(names) or "none")
    return loggers
