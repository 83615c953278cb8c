"""Notices that dependencies print on every start-up and that tell a user nothing about their run.

Each is silenced alone, by its exact message and the module (warnings) or logger (logging) that emits
it, so every other warning still shows, another one from the same place included. ``install`` runs at
the start of every command (cli/__init__.py: entry_point) and again in a job that a Hydra launcher
starts in a process of its own (conf/train.yaml: hydra.callbacks.notices). When a dependency changes
its wording, its notice shows again: the filter never widens to hide something it was not written for.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Any, Callable, Mapping, NamedTuple

from hydra.experimental.callback import Callback


class KnownWarning(NamedTuple):
    message: str  # a regex matched at the start of the message (warnings.filterwarnings)
    category: type[Warning]
    module: str  # a regex for the module that the warning names as its source
    applies: Callable[[Mapping[str, str]], bool] = lambda environ: True


def outside_slurm_job(environ: Mapping[str, str]) -> bool:
    return "SLURM_JOB_ID" not in environ and "SLURM_JOBID" not in environ


WARNINGS = (
    # Lightning looks only for an `srun` on PATH and SLURM_NTASKS in the environment. On a login node or
    # a workstation with SLURM's client tools installed, a command run there on its own is right, and
    # the hint is wrong. Inside an allocation (SLURM_JOB_ID set) it may be the mistake the hint is for
    # (a multi-task job started without srun hangs), so there it stays.
    KnownWarning(
        r"The `srun` command is available on your system but is not used\. HINT: ",
        UserWarning,  # lightning's PossibleUserWarning, a subclass (named here without importing lightning)
        r"lightning\.fabric\.plugins\.environments\.slurm\Z",
        outside_slurm_job,
    ),
    # Lightning's own helper builds a torch LeafSpec, which torch deprecated; only Lightning can change
    # that line, and nothing here builds one.
    KnownWarning(
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree\Z",
    ),
    # The LightningModule normalizes the batch on the device in on_after_batch_transfer, for every
    # loader (training/module.py); the datamodule has no such hook, so Lightning uses the module's,
    # as intended. The warning for a hook defined on both ("in both") is a real conflict and stays.
    KnownWarning(
        r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a "
        r"`LightningDataModule`\. It will use the implementation from `LightningModule` instance\.",
        UserWarning,
        r"lightning\.pytorch\.trainer\.connectors\.data_connector\Z",
    ),
)

LOG_MESSAGES = {
    # diffusers imports CLIPImageProcessor (pipeline_controlnet.py: the safety checker's feature
    # extractor) and SiglipImageProcessor (loaders/ip_adapter.py) when it loads, and transformers,
    # without torchvision (never installed here: DESIGN.md), hands out the PIL version instead. No
    # image processor runs here: images and hints are decoded by data/decode.py.
    "transformers.utils.import_utils": (
        r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil` ",
    ),
    # Advertisements for Lightning's cloud services; runs log and checkpoint into run_dir (logger=,
    # checkpoint.* in conf/train.yaml).
    "lightning.pytorch.utilities.rank_zero": (
        r"💡 Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]",
        r"💡 Tip: For seamless cloud uploads and versioning, try installing \[litmodels\]",
    ),
}


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


# One filter object per logger, so that installing twice adds nothing (Logger.addFilter skips a present one).
LOG_FILTERS = {name: DropMessages(patterns) for name, patterns in LOG_MESSAGES.items()}


def install(environ: Mapping[str, str] = os.environ) -> None:
    """Silence the known notices in this process. A logger's filter is in place before its library is
    imported (getLogger hands the library the same logger), and warnings.filterwarnings puts each
    filter first, replacing an equal one, so calling this again changes nothing."""
    for known in WARNINGS:
        if known.applies(environ):
            warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)
    for name, log_filter in LOG_FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)


class InstallInJob(Callback):
    """A Hydra callback: ``install`` in the job's own process, which a launcher such as submitit
    (hydra/launcher=slurm) starts without going through entry_point."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        install()


def drop_duplicate_lightning_console() -> None:
    """``import lightning`` gives the ``lightning`` logger a console handler of its own and lets its
    records propagate too: under Hydra, whose root handlers print (and write train.log), every
    Lightning line ("Seed set to 42", "GPU available") printed twice. Only that extra handler goes;
    the records still reach the root's handlers."""
    if not logging.getLogger().handlers:
        return  # no root handler: Lightning's own console is the only one; keep it
    lightning_log = logging.getLogger("lightning")
    for handler in [h for h in lightning_log.handlers if type(h) is logging.StreamHandler]:
        lightning_log.removeHandler(handler)
