"""The run side of a NeMo ControlNet config: data, batch arithmetic, trainer, optimizer and schedule,
checkpoints, loggers and the image logger."""

from __future__ import annotations

import os
from pathlib import Path

from nemo_controlnet.config import PRECISIONS
from nemo_controlnet.migration.engine import Mapper, show

PRECISION = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32", "64": "64"}
SCHEDULERS = {"WarmupHoldPolicy": "constant_with_warmup", "WarmupPolicy": "constant_with_warmup",
              "CosineAnnealing": "cosine", "WarmupAnnealing": "linear", "Constant": "constant"}  # fmt: skip
ADAM = ("fused_adam", "adamw", "adam")


def map_data(x: Mapper, resolution_factor: int) -> None:
    d = "model.data"
    root = x.get(f"{d}.webdataset.local_root_path")
    for split, ours in (("train", "data.shards"), ("validation", "data.validation_shards")):
        paths = x.get(f"{d}.{split}.dataset_path")
        if paths is None:
            continue
        paths = [paths] if isinstance(paths, str) else list(paths)
        pickles = [p for p in paths if str(p).endswith(".pkl")]
        tars = [os.path.join(root, p) if root else p for p in paths if p not in pickles]
        if pickles:
            x.skip(f"{d}.{split}.dataset_path", "a pickled wdinfo (.pkl) is never unpickled here; list its "
                   f"tar files in {ours} (or write shards and a manifest.json with controlnet-prep)")  # fmt: skip
            x.m.notes.append(f"{ours}: set it to the tar files of {', '.join(map(str, pickles))}")
        if tars:
            x.m.values[ours] = tars
            if not pickles:
                x.mapped(f"{d}.{split}.dataset_path", ours)
    if root is not None:
        x.mapped(f"{d}.webdataset.local_root_path", "data.shards (relative tar paths joined to it)")
    x.put(f"{d}.num_workers", "data.num_workers", x.get(f"{d}.num_workers"))
    x.put("model.micro_batch_size", "data.batch_size", x.get("model.micro_batch_size"))
    aug = f"{d}.train.augmentations"
    side = x.get(f"{aug}.resize_smallest_side")
    if side is not None:
        x.put(f"{aug}.resize_smallest_side", "data.resolution", int(side))
        x.same("model.image_size", "the latent size; data.resolution comes from resize_smallest_side")
    elif x.get("model.image_size") is not None:
        x.m.values["data.resolution"] = int(x.get("model.image_size")) * resolution_factor
        x.mapped("model.image_size", f"data.resolution (the latent size x {resolution_factor})")
    for key, crop in (("center_crop_h_w", "center"), ("random_crop_h_w", "random")):
        if x.has(f"{aug}.{key}"):
            x.put(f"{aug}.{key}", "data.augment.crop", crop)
    if x.has(f"{aug}.horizontal_flip"):
        x.put(f"{aug}.horizontal_flip", "data.augment.hflip", 0.5 if x.get(f"{aug}.horizontal_flip") else 0.0)
    x.check(f"{d}.train.filterings", None, "filter while making shards (controlnet-prep); the loader does not")
    x.check(f"{d}.train.augmentations", None, "no augmentations given")  # an empty block
    sampler = x.get(f"{d}.webdataset.infinite_sampler")
    if sampler:
        x.put(f"{d}.webdataset.infinite_sampler", "data.resampled", True)
        x.m.notes.append("data.resampled=true: set data.samples_per_epoch (a resampled stream is endless)")
    else:
        x.same(f"{d}.webdataset.infinite_sampler")
    synthetic = x.get(f"{d}.synthetic_data", False)
    x.check(f"{d}.synthetic_data", False, "NeMo's random tensors; ours: data=shapes (generated shapes with hints)")
    if synthetic:
        x.skip(f"{d}.synthetic_data_length", "used with synthetic_data only")
    else:
        x.same(f"{d}.synthetic_data_length")


def map_training(x: Mapper) -> None:
    t, o, s = "trainer", "model.optim", "model.optim.sched"
    if str(x.get(f"{t}.accelerator", "")).lower() in ("gpu", "cuda"):
        x.m.choices["trainer"] = "gpu"
    for key in ("accelerator", "devices", "num_nodes", "log_every_n_steps", "gradient_clip_val", "benchmark",
                "enable_model_summary", "enable_progress_bar"):  # fmt: skip
        x.put(f"{t}.{key}", f"trainer.{key}", x.get(f"{t}.{key}"))
    precision = str(x.get(f"{t}.precision", ""))
    precision = PRECISION.get(precision, precision)
    if precision in PRECISIONS:
        x.put(f"{t}.precision", "trainer.precision", precision)
    elif x.has(f"{t}.precision"):
        x.skip(f"{t}.precision", f"not one of {sorted(PRECISIONS)}")
    max_steps = x.get(f"{t}.max_steps", -1)
    if max_steps > 0:
        x.put(f"{t}.max_steps", "trainer.max_steps", int(max_steps))
        x.skip(f"{t}.max_epochs", "training ends at trainer.max_steps")
    else:
        x.skip(f"{t}.max_steps", "ours counts steps: set trainer.max_steps (epochs x samples / "
               "global batch)")  # fmt: skip
        x.skip(f"{t}.max_epochs", "ours counts steps: set trainer.max_steps (epochs x samples / global batch)")
    _map_batch(x)
    name = x.get(f"{o}.name")
    if name in ADAM:
        x.put(f"{o}.name", "optim.fused", name == "fused_adam")
        if name == "adam" and x.get(f"{o}.weight_decay", 0):
            x.m.notes.append("optim: NeMo's adam added weight decay to the gradient; ours is AdamW (decoupled)")
    elif name is not None:
        x.skip(f"{o}.name", "ours trains with AdamW")
    lr = x.get(f"{o}.lr")
    for key in ("lr", "weight_decay", "eps"):
        x.put(f"{o}.{key}", f"optim.{key}", x.get(f"{o}.{key}"))
    if x.has(f"{o}.betas"):
        x.put(f"{o}.betas", "optim.betas", list(x.get(f"{o}.betas")))
    if lr is None and x.get("model.learning_rate") is not None:
        lr = x.get("model.learning_rate")
        x.put("model.learning_rate", "optim.lr", lr)
    else:
        x.skip("model.learning_rate", "NeMo's Megatron wrapper built the optimizer from model.optim (lr there)")
    if x.get("model.sd_locked") is False and lr is not None:
        x.m.values["optim.unet_lr"] = lr
        x.m.notes.append(f"model.sd_locked=false: the UNet decoder trained at the ControlNet's rate in NeMo; "
                         f"optim.unet_lr={lr} (ours defaults to a lower one)")  # fmt: skip
    sched = x.get(f"{s}.name")
    if sched in SCHEDULERS:
        x.put(f"{s}.name", "optim.lr_scheduler", SCHEDULERS[sched])
    elif sched is not None:
        x.skip(f"{s}.name", f"no counterpart among {sorted(set(SCHEDULERS.values()))}")
    x.put(f"{s}.warmup_steps", "optim.warmup_steps", int(x.get(f"{s}.warmup_steps", 0)))
    ratio, steps = x.get(f"{s}.warmup_ratio"), x.m.values.get("trainer.max_steps")
    if ratio is not None and steps and not x.has(f"{s}.warmup_steps"):
        x.put(f"{s}.warmup_ratio", "optim.warmup_steps", round(ratio * steps))
    elif ratio is not None:
        x.skip(f"{s}.warmup_ratio", "ours takes optim.warmup_steps (needs trainer.max_steps to convert a ratio)")
    x.same(f"{s}.hold_steps")  # WarmupHoldPolicy holds the rate until max_steps; so does constant_with_warmup
    if sched == "WarmupHoldPolicy":
        x.same(f"{s}.min_lr")
    else:
        x.check(f"{s}.min_lr", 0, "diffusers' decaying schedules end at 0 (cosine, linear)")
    x.check(f"{s}.constant_steps", 0, "a constant phase before the decay is not implemented")
    x.check(f"{s}.max_steps", x.m.values.get("trainer.max_steps"), "the schedule spans trainer.max_steps")
    x.same(f"{s}.last_epoch")


def _map_batch(x: Mapper) -> None:
    micro, total = x.get("model.micro_batch_size"), x.get("model.global_batch_size")
    devices, nodes = x.get("trainer.devices", 1), x.get("trainer.num_nodes", 1)
    accumulate = x.get("trainer.accumulate_grad_batches")
    steps = None
    if total is None:
        pass
    elif not all(isinstance(v, int) and v > 0 for v in (micro, devices, nodes)):
        x.skip("model.global_batch_size", f"devices={show(devices)} is not a count: set "
               "trainer.accumulate_grad_batches = global_batch_size / (micro_batch_size x GPUs)")  # fmt: skip
    elif total % (micro * devices * nodes):
        x.skip("model.global_batch_size", "not a multiple of micro_batch_size x devices x num_nodes = "
               f"{micro} x {devices} x {nodes}")  # fmt: skip
    else:
        steps = total // (micro * devices * nodes)
        x.put("model.global_batch_size", "trainer.accumulate_grad_batches", steps)
        x.m.notes.append(f"trainer.accumulate_grad_batches={steps}: global_batch_size {total} / (micro_batch_size "
                         f"{micro} x devices {devices} x num_nodes {nodes})")  # fmt: skip
    if steps is None:
        x.put("trainer.accumulate_grad_batches", "trainer.accumulate_grad_batches", accumulate)
    else:
        x.check("trainer.accumulate_grad_batches", steps, "model.global_batch_size decides, as in NeMo")


def map_run(x: Mapper) -> None:
    e, p = "exp_manager", "exp_manager.checkpoint_callback_params"
    name = x.get("exp_manager.name") or x.get("name") or Path(x.m.source).stem
    root = x.get("exp_manager.exp_dir") or "runs"
    x.m.values["run_dir"] = f"{root}/{name}"
    for key in ("name", "exp_manager.name", "exp_manager.exp_dir"):
        x.mapped(key, "run_dir")
    x.put("model.seed", "seed", x.get("model.seed"))
    x.put(f"{e}.resume_if_exists", "resume", bool(x.get(f"{e}.resume_if_exists")))
    x.same(f"{e}.resume_ignore_no_checkpoint")
    x.check(f"{e}.resume_from_checkpoint", None, "a NeMo checkpoint cannot be resumed here")
    if x.has(f"{e}.create_checkpoint_callback") and not x.get(f"{e}.create_checkpoint_callback"):
        x.put(f"{e}.create_checkpoint_callback", "checkpoint.every_n_steps", 0)
        x.skip(f"{p}.every_n_train_steps", "create_checkpoint_callback is false: checkpoints at the end only")
    else:
        x.same(f"{e}.create_checkpoint_callback")
        x.put(f"{p}.every_n_train_steps", "checkpoint.every_n_steps", x.get(f"{p}.every_n_train_steps"))
    keep = x.get(f"{p}.save_top_k")
    if keep is not None:
        x.put(f"{p}.save_top_k", "checkpoint.keep_last", 0 if keep < 0 else int(keep))
    tensorboard, wandb = x.get(f"{e}.create_tensorboard_logger"), x.get(f"{e}.create_wandb_logger")
    loggers = [name for name, on in (("tensorboard", tensorboard), ("wandb", wandb)) if on]
    if tensorboard is not None or wandb is not None:  # NeMo's exp_manager made these two; ours: report_to
        x.m.values["report_to"] = (loggers[0] if len(loggers) == 1 else loggers) if loggers else "none"
        for key in (f"{e}.create_tensorboard_logger", f"{e}.create_wandb_logger"):
            if x.has(key):
                x.mapped(key, "report_to")
    w = f"{e}.wandb_logger_kwargs"
    for key in (k for k in x.actual if k.startswith(f"{w}.")):
        if not wandb:
            x.same(key, "used with create_wandb_logger only")
        elif key == f"{w}.project":
            x.put(key, "tracker_project_name", x.get(key))
        elif key == f"{w}.name":
            x.same(key, "the W&B run is named after run_dir")
        else:
            x.skip(key, "our W&B logger sets project, run name and config only (offline unless wandb.mode=online)")
    x.check(f"{e}.ema.enable", False, "EMA is not implemented")
    if not x.get(f"{e}.ema.enable"):
        for key in (k for k in x.actual if k.startswith(f"{e}.ema.") and k != f"{e}.ema.enable"):
            x.same(key, "used with ema.enable only")
    i = "model.image_logger"
    x.put(f"{i}.batch_frequency", "validation.every_n_steps", x.get(f"{i}.batch_frequency"))
    counts = [x.get(k) for k in (f"{i}.max_images", f"{i}.log_images_kwargs.N") if x.get(k) is not None]
    if counts:
        x.m.values["validation.num_samples"] = min(counts)
        x.mapped(f"{i}.max_images", "validation.num_samples")
        x.mapped(f"{i}.log_images_kwargs.N", "validation.num_samples")
    for key in ("sample_steps", "ddim_steps"):
        x.put(f"{i}.log_images_kwargs.{key}", "validation.num_inference_steps", x.get(f"{i}.log_images_kwargs.{key}"))
    x.put(f"{i}.log_images_kwargs.unconditional_guidance_scale", "validation.guidance_scale",
          x.get(f"{i}.log_images_kwargs.unconditional_guidance_scale"))  # fmt: skip
    if x.has(f"{i}.batch_frequency"):
        x.m.notes.append("validation: ours draws validation.num_samples samples from data.validation_shards (set it) "
                         "or validation.samples, not from the training batch as NeMo's image logger did")  # fmt: skip
