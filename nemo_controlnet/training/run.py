"""A training run: validate the config, prepare data, build, fit (resuming), export."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet import __version__
from nemo_controlnet.config import validate_train_config
from nemo_controlnet.data.datamodule import ShardDataModule, validation_samples
from nemo_controlnet.data.cached import cached_encoding, check_encoder, check_hint_latents
from nemo_controlnet.data.indexed import make_buckets
from nemo_controlnet.prep.synthetic import write_shapes_dataset
from nemo_controlnet.notices import drop_duplicate_lightning_console
from nemo_controlnet.io import CHECKSUM_SUFFIX, DirectoryLock, atomic_path, sweep_stale_temps
from nemo_controlnet.models.adapters import check_adapter_run
from nemo_controlnet.training.callbacks import (
    Preemption,
    StepCheckpoint,
    StepMetrics,
    StepProgressBar,
    Throughput,
)
from nemo_controlnet.training.distributed import configure_fsdp, full_controlnet, is_fsdp
from nemo_controlnet.training.checkpoint import AtomicCheckpointIO, latest_checkpoint, list_checkpoints
from nemo_controlnet.training.hub import hub_model_id, push_to_hub
from nemo_controlnet.training.loggers import make_loggers
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.perf import apply_performance, configure_threads
from nemo_controlnet.training.schedule import parse_schedule
from nemo_controlnet.training.validation import ValidationImages

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"


def ensure_synthetic_data(data_cfg: DictConfig) -> None:
    """The embedded default writes its shapes dataset on first use."""
    synthetic = data_cfg.get("synthetic")
    if not synthetic:
        return
    for split in synthetic.values():
        write_shapes_dataset(**OmegaConf.to_container(split, resolve=True))


def _set_aside_old_checkpoints(ckpt_dir: Path) -> None:
    """``resume=false`` starts over without destroying the previous run's checkpoints."""
    if list_checkpoints(ckpt_dir):
        aside = ckpt_dir.with_name(f"checkpoints.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt_dir.rename(aside)
        log.warning("resume=false: moved existing checkpoints to %s", aside)


def _write_run_config(cfg: DictConfig, run_dir: Path) -> None:
    with atomic_path(run_dir / RUN_CONFIG) as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def slurm_plugins() -> list:
    """Under SLURM, Lightning's own requeue is off: ``Preemption`` checkpoints where resume looks."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def check_resolution(module: ControlNetModule, resolution: int, key: str = "data.resolution") -> None:
    multiple = module.family.resolution_multiple(module)
    if resolution % multiple:
        raise ValueError(f"{key}={resolution} must be a multiple of {multiple} (the latent grid must "
                         f"halve cleanly through every block of the {module.family.name} base)")  # fmt: skip


def prepare_buckets(cfg: DictConfig, module: ControlNetModule) -> None:
    """Aspect buckets: every side a multiple the base can take; a compiled block may specialise once
    per bucket shape (torch's default of 8 recompiles would fall back to eager past 8 buckets)."""
    buckets = cfg.data.get("buckets") or {}
    if not buckets.get("enabled"):
        return
    check_resolution(module, int(buckets.step), "data.buckets.step")
    n = len(make_buckets(int(cfg.data.resolution), int(buckets.step), float(buckets.max_aspect)))
    if (cfg.get("perf") or {}).get("compile"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n + 2)


def export_metadata(cfg: DictConfig, module: ControlNetModule, step: int) -> dict:
    return {
        "nemo_controlnet_version": __version__,
        "global_step": step,
        "base_model": OmegaConf.to_container(cfg.model, resolve=True),
        "base_fingerprint": module.base_fingerprint,
        "sd_locked": module.sd_locked,
        "only_mid_control": bool(cfg.model.only_mid_control),
        "control_scale": module.control_scale,
        "hint": {"channels": int(cfg.model.hint_channels), "range": "[0, 1]", "channel_order": "RGB"},
        "resolution": int(cfg.data.resolution),
        "data": OmegaConf.to_container(OmegaConf.create({"shards": cfg.data.shards}), resolve=True)["shards"],
        "batch_size": int(cfg.data.batch_size),
        **hub_metadata(cfg),
    }


def hub_metadata(cfg: DictConfig) -> dict:
    """What the model card says for the Hub (export.push_to_hub): the repo id and the base's Hub id."""
    export = cfg.get("export") or {}
    if not export.get("push_to_hub"):
        return {}
    out = {"hub_model_id": hub_model_id(export, Path(cfg.run_dir))}
    return out | ({"base_model_id": str(export.base_model_id)} if export.get("base_model_id") else {})


def export_run(
    cfg: DictConfig,
    module: ControlNetModule,
    run_dir: Path,
    step: int,
    controlnet: torch.nn.Module | None = None,
    metrics: dict | None = None,
) -> Path:
    """What the run's mode exports (ControlNet: run_dir/controlnet and the original single file; base:
    run_dir/base; adapter: run_dir/lora), with the run's metadata. ``controlnet``: the whole
    ControlNet when the module's is sharded (``full_controlnet``);
    ``metrics``: the last validation's scores, for the model card."""
    metadata = export_metadata(cfg, module, step)
    if metrics:
        metadata["validation_metrics"] = metrics
    elif (run_dir / "samples" / "metrics.jsonl").is_file():  # re-export: the newest recorded
        lines = (run_dir / "samples" / "metrics.jsonl").read_text().splitlines()
        metadata["validation_metrics"] = json.loads(lines[-1]) if lines else {}
    return module.training_mode.export(module, run_dir, metadata, cfg.export, controlnet)


def take_run_dir(run_dir: Path, stack: ExitStack) -> None:
    """The launcher's rank holds an exclusive lock on ``run_dir`` for the whole run (a second
    training there is refused, naming the holder) and, holding it, removes what killed writers
    left behind: checkpoint temp files (no other process writes checkpoints here), checksums
    of checkpoints that were never renamed into place, other temp files of dead processes."""
    stack.enter_context(DirectoryLock(run_dir, "training"))
    ckpt_dir = run_dir / "checkpoints"
    sweep_stale_temps(ckpt_dir, only_dead=False)
    for sidecar in ckpt_dir.glob(f"step=*.ckpt{CHECKSUM_SUFFIX}") if ckpt_dir.is_dir() else []:
        if not sidecar.with_suffix("").exists():
            sidecar.unlink()
    for directory in (run_dir, run_dir / "samples"):
        sweep_stale_temps(directory)  # also written by controlnet-export/-eval: only dead writers' files


def train(cfg: DictConfig) -> tuple[L.Trainer, ControlNetModule]:
    OmegaConf.resolve(cfg)  # sub-configs go on alone (model, data): their cross-references resolved here
    drop_duplicate_lightning_console()
    validate_train_config(cfg)
    check_adapter_run(cfg, cuda=torch.cuda.is_available() and cfg.trainer.accelerator != "cpu")
    check_research_options(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if rank_zero_only.rank == 0:  # the launcher's rank, known before the Trainer exists
            take_run_dir(run_dir, stack)
        return _train(cfg, run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> tuple[L.Trainer, ControlNetModule]:
    ckpt_dir = run_dir / "checkpoints"
    log.info("run_dir %s (torch %s, cuda %s)", run_dir.resolve(), torch.__version__, torch.cuda.is_available())
    if os.environ.get("SLURM_JOB_ID"):  # which job, which start of it, which task: what a remote log needs
        env = os.environ.get
        log.info("SLURM job %s, restart %s, task %s of %s on node %s", env("SLURM_JOB_ID"),
                 env("SLURM_RESTART_COUNT", "0"), env("SLURM_PROCID", "0"), env("SLURM_NTASKS", "1"),
                 env("SLURMD_NODENAME", "?"))  # fmt: skip
    perf = cfg.get("perf") or {}
    configure_threads(perf.get("cpu_threads", "auto"), int(cfg.data.num_workers))

    # Safe on every rank at once: shards are deterministic and each is renamed into place whole.
    ensure_synthetic_data(cfg.data)
    encoded = cached_encoding(cfg.data)  # shards with cached latents: checked before any model is built
    if encoded:
        log.info("cached latents and text embeddings from %s (encoders %s, %d px): the VAE encoder and text "
                 "encoders are not run in the step", encoded["manifest"], encoded["fingerprint"],
                 encoded["resolution"])  # fmt: skip
    skip_unsafe = bool(cfg.checkpoint.get("skip_unsafe", False))
    ckpt_path = latest_checkpoint(ckpt_dir, skip_unsafe) if cfg.resume else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    elif cfg.resume:
        log.info("no checkpoint in %s: starting fresh", ckpt_dir)
    if rank_zero_only.rank == 0:  # the launcher's rank, known before the Trainer exists
        if not cfg.resume:
            _set_aside_old_checkpoints(ckpt_dir)
        _write_run_config(cfg, run_dir)

    L.seed_everything(cfg.seed, workers=True)
    module = ControlNetModule(cfg.model, cfg.optim, cfg.trainer.precision, seed=int(cfg.seed),
                              adapter_cfg=cfg.get("adapter"), controlnet_cfg=cfg.get("controlnet"),
                              mode=cfg.get("training_mode"), research=research_options(cfg))  # fmt: skip
    check_resolution(module, int(cfg.data.resolution))
    prepare_buckets(cfg, module)
    if encoded:
        check_encoder(encoded, module.encoder_fingerprint)
        check_hint_latents(encoded, module.family.encodes_hint, module.family.name, int(cfg.model.hint_channels))
    datamodule = ShardDataModule(
        cfg.data, int(cfg.model.hint_channels), int(cfg.seed), cfg.model.control_key, cached=bool(encoded)
    )
    prompts, hints, metas = validation_samples(cfg.validation, cfg.data, int(cfg.model.hint_channels))

    loggers = make_loggers(cfg, run_dir)  # report_to (or logger)
    validation = ValidationImages(
        run_dir / "samples", prompts, hints, cfg.validation.every_n_steps, cfg.validation.num_inference_steps,
        cfg.validation.guidance_scale, cfg.validation.seed, cfg.validation.sampler, metas,
        bool(cfg.validation.get("guess_mode", False)), int(cfg.validation.get("num_images", 1)),
    )  # fmt: skip
    # Everything that logs at a step runs before the checkpoints of that step (StepCheckpoint and
    # Preemption, last): a kill right after a checkpoint loses no log row.
    callbacks = [StepMetrics(cfg.trainer.get("log_every_n_steps", 50)), validation]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(trainer_kwargs.get("strategy"), dict):  # a strategy object from a _target_ node
        trainer_kwargs["strategy"] = instantiate(cfg.trainer.strategy)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
        # Counting FLOPs runs one step outside the trainer; FSDP's units cannot be run that way.
        count_flops = bool(perf.get("count_flops", True)) and not is_fsdp(trainer_kwargs.get("strategy"))
        callbacks.append(
            Throughput(perf.get("warmup_steps", 5), cfg.trainer.get("log_every_n_steps", 10),
                       perf.get("peak_tflops"), count_flops)
        )  # fmt: skip
    preemption = Preemption(ckpt_dir)
    callbacks += [StepCheckpoint(ckpt_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last), preemption]
    trainer = L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
        enable_checkpointing=False,  # StepCheckpoint writes them
        num_sanity_val_steps=0,
    )
    if encoded and perf.get("release_text_encoders", True):
        released = module.release_text_encoders(trainer.strategy.root_device, prompts)
        log.info("perf.release_text_encoders: the text encoders (%.2f GiB) released; the step reads cached text "
                 "embeddings, and the empty prompt and %d validation prompt(s) were encoded once on %s",
                 released / 2**30, len(set(prompts)), trainer.strategy.root_device)  # fmt: skip
    # FSDP's settings name the locked parts it ignores: after any release (the strategy reads them in fit)
    configure_fsdp(trainer.strategy, module)
    effective = int(cfg.data.batch_size) * trainer.world_size * int(cfg.trainer.get("accumulate_grad_batches", 1))
    apply_performance(module, perf, trainer.strategy.root_device.type)
    if cfg.optim.get("scale_lr"):
        module.lr_scale = float(effective)
        log.info("optim.scale_lr: learning rates x %d (the effective batch)", effective)
    log.info(
        "effective batch %d = %d per device x %d device(s) x %d accumulation; max_steps %d",
        effective,
        cfg.data.batch_size,
        trainer.world_size,
        cfg.trainer.get("accumulate_grad_batches", 1),
        cfg.trainer.max_steps,
    )
    with warnings.catch_warnings():
        # The locked parts stay in eval mode by design; the endless stream has no length by design.
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    if preemption.stopped:
        log.warning("preempted at step %d: export skipped (the requeued run exports at the end)", trainer.global_step)
    elif cfg.export.enabled:
        controlnet = full_controlnet(trainer, module)  # under FSDP a collective: every rank takes part
        if trainer.is_global_zero:
            out = export_run(cfg, module, run_dir, trainer.global_step, controlnet, validation.last_metrics)
            if cfg.export.get("push_to_hub"):
                push_to_hub(out, hub_model_id(cfg.export, run_dir), trainer.global_step)
    return trainer, module


def load_run_config(run_dir: str | Path) -> DictConfig:
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a training run directory (no {RUN_CONFIG})")
    return OmegaConf.load(path)


REROUTES = ("always", "precompute", "none")


def research_options(cfg: DictConfig) -> DictConfig:
    """The run's research options (docs/control_train.md) the module needs: the training schedule, the
    ControlNet's residual routing and the precomputed residuals' folder."""
    keys = ("control_training_schedule", "schedule", "controlnet_reroute", "residuals")
    return OmegaConf.create({k: cfg.get(k) for k in keys if cfg.get(k) is not None})


def check_research_options(cfg: DictConfig) -> None:
    """The schedule and the residual routing, before anything loads: each bad key fails in seconds, named."""
    research = research_options(cfg)
    parse_schedule(research)
    reroute = str(research.get("controlnet_reroute") or "always")
    if reroute not in REROUTES:
        raise ValueError(f"controlnet_reroute={reroute!r}: use one of {REROUTES}")
    if reroute != "always" and (cfg.get("adapter") or {}).get("type") in (None, "control_lora"):
        raise ValueError(f"controlnet_reroute={reroute}: routes a frozen ControlNet's residuals under an adapter "
                         "(adapter mode: +experiment=lora_frozen_controlnet); other modes use always")  # fmt: skip
    residuals = research.get("residuals") or {}
    if reroute == "precompute" and not residuals.get("dir"):
        raise ValueError("controlnet_reroute=precompute needs residuals.dir (the out_dir of controlnet-prep "
                         "mode=residuals)")  # fmt: skip
    if str(residuals.get("on_mismatch") or "error") not in ("error", "on_the_fly"):
        raise ValueError(f"residuals.on_mismatch={residuals.get('on_mismatch')!r}: use error or on_the_fly")


def export_checkpoint(
    run_dir: str | Path, checkpoint: str | Path | None = None, original: bool = True, dtype: str = "fp16"
) -> Path:
    """Re-export a run's ControlNet from a checkpoint (default: the newest complete one)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    cfg.export.original, cfg.export.dtype = original, dtype
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir / "checkpoints", skip_unsafe=False)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no checkpoint to export in {run_dir / 'checkpoints'}")
    module = ControlNetModule(cfg.model, cfg.optim, cfg.trainer.precision, adapter_cfg=cfg.get("adapter"),
                              controlnet_cfg=cfg.get("controlnet"), mode=cfg.get("training_mode"),
                              research=research_options(cfg))  # fmt: skip
    state = AtomicCheckpointIO().load_checkpoint(path)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=False)
    return export_run(cfg, module, run_dir, int(state["global_step"]))
