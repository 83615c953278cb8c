"""The key table of controlnet-migrate: each key of NeMo's ControlNet config and what it becomes here.

``kind``: ``map`` (the migration sets ``ours``), ``code`` (the value decides: ``note`` says how), ``same`` (ours
works that way; nothing to set) or ``skip`` (not mapped: ``note`` says why). A ``*`` matches any rest of a key;
the first exact row wins, then the first pattern. docs/migrating_from_nemo.md shows this table (``key_table``).
"""

from __future__ import annotations

from dataclasses import dataclass

# The text encoder names the SD generation: the model config chosen when the architecture matches.
PRESETS = {"sd15": "FrozenCLIPEmbedder", "sd21": "FrozenOpenCLIPEmbedder"}


@dataclass(frozen=True)
class Rule:
    nemo: str
    ours: str
    note: str
    kind: str = "map"


ARCH = "`model=sd15` or `sd21` when the whole architecture is theirs, else `model.unet_config.*`"
UNET_ARCH_NOTE = "diffusers UNet2DConditionModel arguments: {}"
SAME_AS_UNET = "our ControlNet copies the UNet's encoder: checked equal to `unet_config`'s (a difference is listed)"
NO_VALIDATION_LOSS = "ours validates with image grids (`validation.*`), not a validation loss"

RULES: tuple[Rule, ...] = (
    Rule("name", "`run_dir`", "`runs/<name>`, or `<exp_manager.exp_dir>/<exp_manager.name>`"),
    # -- trainer ------------------------------------------------------------------------------------------------
    Rule("trainer.devices", "`trainer.devices`", "as it is"),
    Rule("trainer.num_nodes", "`trainer.num_nodes`", "as it is"),
    Rule("trainer.accelerator", "`trainer=gpu` and `trainer.accelerator`", "gpu chooses `trainer=gpu`"),
    Rule("trainer.precision", "`trainer.precision`", "16 -> `16-mixed`, bf16 -> `bf16-mixed`, 32 -> `32`"),
    Rule("trainer.logger", "", "NeMo's exp_manager made the loggers; ours: `report_to` (from "
         "`exp_manager.create_*_logger`)", "skip"),  # fmt: skip
    Rule("trainer.enable_checkpointing", "", "NeMo's exp_manager wrote the checkpoints; ours: `checkpoint.*`",
         "skip"),  # fmt: skip
    Rule("trainer.use_distributed_sampler", "", "our loader splits the shards by rank and worker itself", "same"),
    Rule("trainer.max_epochs", "", "ours counts steps: training ends at `trainer.max_steps`", "skip"),
    Rule("trainer.max_steps", "`trainer.max_steps`", "when > 0; -1 (epochs) is listed: set `trainer.max_steps`",
         "code"),  # fmt: skip
    Rule("trainer.log_every_n_steps", "`trainer.log_every_n_steps`", "as it is"),
    Rule("trainer.accumulate_grad_batches", "`trainer.accumulate_grad_batches`",
         "as it is without `model.global_batch_size`; with it, the global batch decides (as in NeMo)", "code"),
    Rule("trainer.gradient_clip_val", "`trainer.gradient_clip_val`", "as it is"),
    Rule("trainer.benchmark", "`trainer.benchmark`", "as it is (a lightning.Trainer argument)"),
    Rule("trainer.enable_model_summary", "`trainer.enable_model_summary`", "as it is"),
    Rule("trainer.enable_progress_bar", "`trainer.enable_progress_bar`", "as it is"),
    Rule("trainer.limit_val_batches", "", NO_VALIDATION_LOSS, "skip"),
    Rule("trainer.val_check_interval", "", NO_VALIDATION_LOSS, "skip"),
    Rule("trainer.num_sanity_val_steps", "", NO_VALIDATION_LOSS, "skip"),
    Rule("trainer.strategy", "", "NeMo's strategy classes; ours: `trainer=ddp_bf16` or `trainer=fsdp`", "skip"),
    # -- exp_manager --------------------------------------------------------------------------------------------
    Rule("exp_manager.exp_dir", "`run_dir`", "`<exp_dir>/<name>` (null: `runs/<name>`)"),
    Rule("exp_manager.name", "`run_dir`", "the last part of `run_dir`"),
    Rule("exp_manager.create_checkpoint_callback", "`checkpoint.every_n_steps`",
         "true: the same; false: `checkpoint.every_n_steps=0` (only at the end: ours always writes one)", "code"),
    Rule("exp_manager.checkpoint_callback_params.every_n_train_steps", "`checkpoint.every_n_steps`", "as it is"),
    Rule("exp_manager.checkpoint_callback_params.save_top_k", "`checkpoint.keep_last`",
         "-1 -> 0 (keep all); k -> k: the newest k, not the best k by a monitored metric"),
    Rule("exp_manager.checkpoint_callback_params.*", "", "ours writes `step=N.ckpt` every `checkpoint.every_n_steps` "
         "and keeps the newest; no metric is monitored and no .nemo archive is written", "skip"),  # fmt: skip
    Rule("exp_manager.resume_if_exists", "`resume`", "as it is"),
    Rule("exp_manager.resume_ignore_no_checkpoint", "", "ours starts from scratch when `run_dir` has no checkpoint",
         "same"),  # fmt: skip
    Rule("exp_manager.resume_from_checkpoint", "", "null: the same; a NeMo checkpoint cannot be resumed here", "code"),
    Rule("exp_manager.create_tensorboard_logger", "`report_to`", "true -> tensorboard (with W&B: both)"),
    Rule("exp_manager.create_wandb_logger", "`report_to`", "true -> wandb (offline unless `wandb.mode=online`)"),
    Rule("exp_manager.wandb_logger_kwargs.project", "`tracker_project_name`", "the W&B project"),
    Rule("exp_manager.wandb_logger_kwargs.*", "", "`name`: the run is named after `run_dir`; the others (group, "
         "tags, ...) have no counterpart; all unused without `create_wandb_logger`", "code"),  # fmt: skip
    Rule("exp_manager.ema.enable", "", "false: the same; true: EMA is not implemented", "code"),
    Rule("exp_manager.ema.*", "", "used with `ema.enable` only (EMA is not implemented)", "code"),
    Rule("exp_manager.*", "", "NeMo's experiment manager (logging, timing, versions) has no counterpart", "skip"),
    # -- model: batch, weights, schedule ------------------------------------------------------------------------
    Rule("model.precision", "", "`trainer.precision` decides (NeMo set both alike)", "same"),
    Rule("model.micro_batch_size", "`data.batch_size`", "the per-GPU batch"),
    Rule("model.global_batch_size", "`trainer.accumulate_grad_batches`",
         "global / (micro_batch_size x devices x num_nodes); not a whole number, or devices not a count: listed"),
    Rule("model.seed", "`seed`", "as it is"),
    Rule("model.linear_start", "`model.scheduler_config.beta_start`", "set when it differs from the model's"),
    Rule("model.linear_end", "`model.scheduler_config.beta_end`", "set when it differs from the model's"),
    Rule("model.timesteps", "`model.scheduler_config.num_train_timesteps`", "set when it differs from the model's"),
    Rule("model.beta_schedule", "`model.scheduler_config.beta_schedule`", "ldm's linear (linear in sqrt(beta)) -> "
         "scaled_linear, sqrt_linear -> linear, cosine -> squaredcos_cap_v2; others are listed", "code"),  # fmt: skip
    Rule("model.cosine_s", "", "0.008: the same (squaredcos_cap_v2 uses it); another value is listed", "code"),
    Rule("model.given_betas", "`model.scheduler_config.trained_betas`", "null: the same"),
    Rule("model.num_timesteps_cond", "", "1: the same; a conditioning-timestep schedule is not implemented", "code"),
    Rule("model.log_every_t", "", "ldm's sampling-progress interval; ours logs validation grids", "skip"),
    Rule("model.first_stage_key", "", "a batch key inside NeMo (images); ours is `image`, read from the tar member "
         "`data.image_key` (jpg, as NeMo's loader read)", "same"),  # fmt: skip
    Rule("model.cond_stage_key", "", "a batch key inside NeMo (captions); ours is `caption`, read from the tar "
         "member `data.caption_key` (txt, as NeMo's loader read)", "same"),  # fmt: skip
    Rule("model.control_key", "`model.control_key`", "the hint's batch key (read from the tar member "
         "`data.hint_key`, png, as NeMo's loader read)"),  # fmt: skip
    Rule("model.image_size", "`data.resolution`", "the latent size x the VAE's factor, when "
         "`augmentations.resize_smallest_side` is not given", "code"),  # fmt: skip
    Rule("model.channels", "", "the latent channels: the VAE's (checked with the architecture)", "same"),
    Rule("model.cond_stage_trainable", "", "false: the same; true: ours keeps the text encoder locked", "code"),
    Rule("model.conditioning_key", "", "crossattn: the same; others are not implemented", "code"),
    Rule("model.monitor", "", NO_VALIDATION_LOSS, "skip"),
    Rule("model.scale_factor", "`model.first_stage_config.scaling_factor`", "as it is"),
    Rule("model.use_ema", "", "EMA is not implemented", "skip"),
    Rule("model.scale_by_std", "", "false: the same; true: set `scaling_factor` to the value NeMo logged", "code"),
    Rule("model.ckpt_path", "", "null: the same; a NeMo ControlNet checkpoint is not read", "code"),
    Rule("model.ignore_keys", "", "used with `ckpt_path` only", "same"),
    Rule("model.load_only_unet", "", "used with `ckpt_path` only", "same"),
    Rule("model.parameterization", "`model.prediction_type`", "eps -> epsilon, v -> v_prediction; x0 is listed",
         "code"),  # fmt: skip
    Rule("model.clip_denoised", "", "ldm's sampler clamp; ours samples with diffusers' schedulers", "skip"),
    Rule("model.original_elbo_weight", "", "0: the same; the ELBO term is not implemented", "code"),
    Rule("model.v_posterior", "", "0: the same; ours samples with diffusers' schedulers", "code"),
    Rule("model.l_simple_weight", "", "1: the same; ours weighs the simple loss 1", "code"),
    Rule("model.use_positional_encodings", "", "false: the same; not implemented", "code"),
    Rule("model.learn_logvar", "", "false: the same; a learned loss variance is not implemented", "code"),
    Rule("model.logvar_init", "", "0: the same; not implemented", "code"),
    Rule("model.loss_type", "", "l2: the same (mean squared error); l1 is not implemented", "code"),
    Rule("model.learning_rate", "`optim.lr`", "only without `model.optim.lr`: NeMo's Megatron wrapper built the "
         "optimizer from `model.optim`", "code"),  # fmt: skip
    Rule("model.concat_mode", "", "used with conditioning_key concat only", "same"),
    Rule("model.cond_stage_forward", "", "null: the same; a custom text-encoder call is not implemented", "code"),
    Rule("model.text_embedding_dropout_rate", "`model.proportion_empty_prompts`",
         "caption dropout; ours uses the empty prompt's embedding, NeMo zeroed the embedding"),
    Rule("model.fused_opt", "", "NeMo's apex fused kernels; ours: torch's fused AdamW (`optim.fused`)", "skip"),
    Rule("model.inductor", "`perf.compile`", "regional torch.compile of the UNet and ControlNet blocks"),
    Rule("model.inductor_cudagraphs", "", "CUDA graphs are not used", "skip"),
    Rule("model.capture_cudagraph_iters", "", "CUDA graphs are not used", "skip"),
    Rule("model.channels_last", "`perf.channels_last`", "as it is"),
    Rule("model.only_mid_control", "`model.only_mid_control`", "as it is"),
    Rule("model.sd_locked", "`model.sd_locked`", "false also sets `optim.unet_lr` to the ControlNet's rate, "
         "as NeMo trained the decoder"),  # fmt: skip
    Rule("model.resume_from_checkpoint", "", "null: the same; a NeMo checkpoint cannot be resumed here", "code"),
    Rule("model.apex_transformer_log_level", "", "apex is not used", "skip"),
    Rule("model.gradient_as_bucket_view", "", "ours: `trainer=ddp_bf16` sets it", "skip"),
    Rule("model.nsys_profile*", "", "use nsys directly (nsys profile around the training command)", "skip"),
    # -- model: the ControlNet ----------------------------------------------------------------------------------
    Rule("model.control_stage_config._target_", "", "ours: a diffusers ControlNetModel made from the UNet", "same"),
    Rule("model.control_stage_config.params.hint_channels", "`model.hint_channels`", "as it is"),
    Rule("model.control_stage_config.params.use_checkpoint", "`perf.gradient_checkpointing.controlnet`", "as it is"),
    Rule("model.control_stage_config.params.from_pretrained_unet", "",
         "equal to `unet_config.from_pretrained`: the same (ours starts the ControlNet as a copy of the UNet); "
         "null (random start) or another file is listed", "code"),  # fmt: skip
    Rule("model.control_stage_config.params.from_NeMo", "", "the layout of `from_pretrained_unet`", "same"),
    Rule("model.control_stage_config.params.image_size", "", "unused in NeMo's ControlNet", "same"),
    Rule("model.control_stage_config.params.use_flash_attention", "",
         "ours always runs PyTorch SDPA (flash and memory-efficient kernels where the GPU has them)", "same"),
    Rule("model.control_stage_config.params.*", "", SAME_AS_UNET, "code"),
    # -- model: the UNet ----------------------------------------------------------------------------------------
    Rule("model.unet_config._target_", "", "ours: diffusers UNet2DConditionModel", "same"),
    Rule("model.unet_config.from_pretrained", "`model.checkpoint` or `model.path`",
         "a .ckpt/.safetensors/.pt/.pth file in original layout (`from_NeMo: true`) -> `model.checkpoint` (every "
         "part is read from it); diffusers weights (`from_NeMo: false`) -> `model=local_diffusers model.path=` "
         "the directory above unet/; null: random init", "code"),  # fmt: skip
    Rule("model.unet_config.from_NeMo", "", "the layout of `from_pretrained` (see there)", "same"),
    Rule("model.unet_config.image_size", "", "unused in NeMo's UNet", "same"),
    Rule("model.unet_config.in_channels", ARCH, UNET_ARCH_NOTE.format("in_channels")),
    Rule("model.unet_config.out_channels", ARCH, UNET_ARCH_NOTE.format("out_channels")),
    Rule("model.unet_config.model_channels", ARCH, UNET_ARCH_NOTE.format("block_out_channels")),
    Rule("model.unet_config.channel_mult", ARCH, UNET_ARCH_NOTE.format("block_out_channels = model_channels x each")),
    Rule("model.unet_config.num_res_blocks", ARCH, UNET_ARCH_NOTE.format("layers_per_block")),
    Rule("model.unet_config.attention_resolutions", ARCH,
         UNET_ARCH_NOTE.format("down/up_block_types: CrossAttn at the levels whose downsampling is listed")),
    Rule("model.unet_config.num_heads", ARCH, UNET_ARCH_NOTE.format("attention_head_dim (diffusers' name for the "
         "number of heads)")),  # fmt: skip
    Rule("model.unet_config.num_head_channels", ARCH,
         UNET_ARCH_NOTE.format("attention_head_dim = channels / num_head_channels per level")),
    Rule("model.unet_config.transformer_depth", ARCH, UNET_ARCH_NOTE.format("transformer_layers_per_block")),
    Rule("model.unet_config.context_dim", ARCH, UNET_ARCH_NOTE.format("cross_attention_dim; must be the text "
         "encoder's width")),  # fmt: skip
    Rule("model.unet_config.use_linear_in_transformer", ARCH, UNET_ARCH_NOTE.format("use_linear_projection")),
    Rule("model.unet_config.use_spatial_transformer", "", "true: the same; false (ldm's plain attention) is listed",
         "code"),  # fmt: skip
    Rule("model.unet_config.legacy", "", "no effect on the architecture when num_heads is given", "same"),
    Rule("model.unet_config.use_checkpoint", "`perf.gradient_checkpointing.unet_decoder`",
         "the locked encoder keeps no activations; the decoder does (the residuals' gradients pass it)"),
    Rule("model.unet_config.use_flash_attention", "",
         "ours always runs PyTorch SDPA (flash and memory-efficient kernels where the GPU has them)", "same"),
    # -- model: the VAE and the text encoder --------------------------------------------------------------------
    Rule("model.first_stage_config._target_", "", "ours: diffusers AutoencoderKL", "same"),
    Rule("model.first_stage_config.from_pretrained", "",
         "null: the same; a file is listed: ours reads the VAE from `model.checkpoint` or `model.path`", "code"),
    Rule("model.first_stage_config.embed_dim", "`model=sd15`/`sd21` or `model.first_stage_config.latent_channels`",
         "the latent channels"),
    Rule("model.first_stage_config.monitor", "", NO_VALIDATION_LOSS, "skip"),
    Rule("model.first_stage_config.ddconfig.double_z", "", "true: the same; false is listed", "code"),
    Rule("model.first_stage_config.ddconfig.z_channels", "`model=...` or `model.first_stage_config.latent_channels`",
         "diffusers AutoencoderKL arguments"),  # fmt: skip
    Rule("model.first_stage_config.ddconfig.resolution", "", "no effect on the weights", "same"),
    Rule("model.first_stage_config.ddconfig.in_channels", "`model=...` or `model.first_stage_config.in_channels`",
         "diffusers AutoencoderKL arguments"),  # fmt: skip
    Rule("model.first_stage_config.ddconfig.out_ch", "`model=...` or `model.first_stage_config.out_channels`",
         "diffusers AutoencoderKL arguments"),  # fmt: skip
    Rule("model.first_stage_config.ddconfig.ch", "`model=...` or `model.first_stage_config.block_out_channels`",
         "ch x each of ch_mult"),  # fmt: skip
    Rule("model.first_stage_config.ddconfig.ch_mult", "`model=...` or `model.first_stage_config.block_out_channels`",
         "ch x each of ch_mult"),  # fmt: skip
    Rule("model.first_stage_config.ddconfig.num_res_blocks",
         "`model=...` or `model.first_stage_config.layers_per_block`", "diffusers AutoencoderKL arguments"),
    Rule("model.first_stage_config.ddconfig.attn_resolutions", "", "[]: the same; attention inside the levels is "
         "listed (diffusers' AutoencoderKL has it in the middle block only)", "code"),  # fmt: skip
    Rule("model.first_stage_config.ddconfig.dropout", "", "the VAE is locked (eval mode)", "same"),
    Rule("model.first_stage_config.lossconfig*", "", "no VAE loss: the VAE is locked", "same"),
    Rule("model.cond_stage_config._target_", "`model=sd15` or `model=sd21`",
         "FrozenCLIPEmbedder (CLIP ViT-L/14) -> sd15, FrozenOpenCLIPEmbedder (ViT-H/14) -> sd21; others are listed",
         "code"),  # fmt: skip
    Rule("model.cond_stage_config.version", "`model.cond_stage_config.text_encoder`, `.tokenizer`",
         "a local directory -> from_pretrained nodes on it; a hub id: ours never asks a hub: the text encoder comes "
         "from `model.checkpoint` or `model.path` (listed when there is neither)", "code"),  # fmt: skip
    Rule("model.cond_stage_config.max_length", "`model.cond_stage_config.tokenizer.model_max_length`",
         "set when it differs from the model's (77)"),
    Rule("model.cond_stage_config.device", "", "the trainer places every module", "same"),
    Rule("model.cond_stage_config.arch", "", "OpenCLIP's architecture: `model=sd21`'s text tower", "same"),
    Rule("model.cond_stage_config.layer", "", "OpenCLIP's output layer: `model=sd21` takes the penultimate", "same"),
    Rule("model.cond_stage_config.freeze", "", "the text encoder is always locked", "same"),
    # -- model.data ---------------------------------------------------------------------------------------------
    Rule("model.data.num_workers", "`data.num_workers`", "as it is"),
    Rule("model.data.synthetic_data", "", "false: the same; NeMo's random tensors are not implemented (ours: "
         "`data=shapes`)", "code"),  # fmt: skip
    Rule("model.data.synthetic_data_length", "", "used with `synthetic_data` only", "code"),
    Rule("model.data.train.dataset_path", "`data.shards`", "tar files (joined to `local_root_path`); a pickled "
         "wdinfo (.pkl) is listed: it is never unpickled", "code"),  # fmt: skip
    Rule("model.data.validation.dataset_path", "`data.validation_shards`", "as `train.dataset_path`", "code"),
    Rule("model.data.train.augmentations", "", "null: the same (no augmentations)", "code"),
    Rule("model.data.train.augmentations.resize_smallest_side", "`data.resolution`", "as it is"),
    Rule("model.data.train.augmentations.center_crop_h_w", "`data.augment.crop=center`",
         "ours crops a square of `data.resolution`"),
    Rule("model.data.train.augmentations.random_crop_h_w", "`data.augment.crop=random`",
         "ours crops a square of `data.resolution`"),
    Rule("model.data.train.augmentations.horizontal_flip", "`data.augment.hflip`", "true -> 0.5, false -> 0"),
    Rule("model.data.train.filterings", "", "null: the same; filter while making shards (controlnet-prep)", "code"),
    Rule("model.data.webdataset.infinite_sampler", "`data.resampled`",
         "false: the same; true -> `data.resampled=true` (set `data.samples_per_epoch`)", "code"),
    Rule("model.data.webdataset.local_root_path", "`data.shards`", "relative tar paths are joined to it"),
    Rule("model.data.*", "", "no counterpart in our data configs (`conf/data/`)", "skip"),
    # -- model.optim --------------------------------------------------------------------------------------------
    Rule("model.optim.name", "`optim.fused`", "fused_adam -> AdamW, fused; adamw, adam -> AdamW; others are listed",
         "code"),  # fmt: skip
    Rule("model.optim.lr", "`optim.lr`", "as it is"),
    Rule("model.optim.weight_decay", "`optim.weight_decay`", "as it is"),
    Rule("model.optim.betas", "`optim.betas`", "as it is"),
    Rule("model.optim.eps", "`optim.eps`", "as it is"),
    Rule("model.optim.sched.name", "`optim.lr_scheduler`", "WarmupHoldPolicy, WarmupPolicy -> constant_with_warmup; "
         "CosineAnnealing -> cosine; WarmupAnnealing -> linear; Constant -> constant; others are listed",
         "code"),  # fmt: skip
    Rule("model.optim.sched.warmup_steps", "`optim.warmup_steps`", "as it is"),
    Rule("model.optim.sched.warmup_ratio", "`optim.warmup_steps`", "x `trainer.max_steps`, without warmup_steps",
         "code"),  # fmt: skip
    Rule("model.optim.sched.hold_steps", "", "WarmupHoldPolicy holds the rate to the end, as constant_with_warmup",
         "same"),  # fmt: skip
    Rule("model.optim.sched.min_lr", "", "0 (or WarmupHoldPolicy, where it applies after max_steps only): the same; "
         "diffusers' decaying schedules end at 0", "code"),  # fmt: skip
    Rule("model.optim.sched.constant_steps", "", "0: the same; a constant phase before the decay is not implemented",
         "code"),  # fmt: skip
    Rule("model.optim.sched.max_steps", "", "null or `trainer.max_steps`: the same (the schedule spans it)", "code"),
    Rule("model.optim.sched.last_epoch", "", "the schedule starts at the run's step", "same"),
    Rule("model.optim.*", "", "no counterpart in `optim/adamw.yaml`", "skip"),
    # -- model.image_logger -------------------------------------------------------------------------------------
    Rule("model.image_logger.batch_frequency", "`validation.every_n_steps`",
         "ours draws the samples from `data.validation_shards` (set it), not from the training batch"),
    Rule("model.image_logger.max_images", "`validation.num_samples`", "the smaller of max_images and N"),
    Rule("model.image_logger.log_images_kwargs.N", "`validation.num_samples`", "the smaller of max_images and N"),
    Rule("model.image_logger.log_images_kwargs.sample_steps", "`validation.num_inference_steps`", "as it is"),
    Rule("model.image_logger.log_images_kwargs.ddim_steps", "`validation.num_inference_steps`", "as it is"),
    Rule("model.image_logger.log_images_kwargs.unconditional_guidance_scale", "`validation.guidance_scale`",
         "as it is"),
    Rule("model.image_logger.*", "", "ours: validation grids (`validation.*`: sampler, seed, guess_mode)", "skip"),
)
