"""controlnet-migrate: NeMo's ControlNet config (controlnet_v1-5.yaml, written here as NeMo shipped it) becomes an
experiment config that controlnet-train composes and validates, with every NeMo key mapped, the same here, or
listed as not mapped with why; the key table in docs/migrating_from_nemo.md is the one the code maps by."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from nemo_controlnet.config import ConfigError, validate_train_config
from nemo_controlnet.migration import key_table, migrate, migrate_file
from nemo_controlnet.migration.engine import MAPPED, NOT_MAPPED, SAME, canonical, rule_for
from nemo_controlnet.migration.model import model_preset

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sys.executable).parent  # the console scripts beside the interpreter (.venv/bin)
DOCS = REPO / "docs" / "migrating_from_nemo.md"

SD15_UNET = {"in_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
             "channel_mult": [1, 2, 4, 4], "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
             "context_dim": 768, "use_checkpoint": False, "legacy": False, "use_flash_attention": False}  # fmt: skip
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
NEMO = "nemo.collections.multimodal"

# NeMo's examples/multimodal/text_to_image/controlnet/conf/controlnet_v1-5.yaml, as it shipped (with a list of
# tar files, bf16, channels_last and inductor on).
CONTROLNET_V15 = {
    "name": "ControlNet-v1-5",
    "trainer": {"devices": 8, "num_nodes": 2, "accelerator": "gpu", "precision": "bf16", "logger": False,
                "enable_checkpointing": False, "use_distributed_sampler": False, "max_epochs": 3, "max_steps": 40000,
                "log_every_n_steps": 10, "accumulate_grad_batches": 1, "gradient_clip_val": 1.0, "benchmark": False,
                "enable_model_summary": True, "limit_val_batches": 0},  # fmt: skip
    "exp_manager": {
        "exp_dir": None, "name": "${name}", "create_wandb_logger": False,
        "wandb_logger_kwargs": {"project": "stable-diffusion", "group": "controlnet", "name": "controlnet-v1.5"},
        "create_checkpoint_callback": True, "create_tensorboard_logger": True,
        "checkpoint_callback_params": {"save_top_k": -1, "every_n_train_steps": 5000},
        "resume_if_exists": True, "resume_ignore_no_checkpoint": True,
        "resume_from_checkpoint": "${model.resume_from_checkpoint}",
        "ema": {"enable": False, "decay": 0.9999, "validate_original_weights": False, "every_n_steps": 1,
                "cpu_offload": False},
    },  # fmt: skip
    "model": {
        "precision": "${trainer.precision}", "micro_batch_size": 4, "global_batch_size": 128,
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000,
        "first_stage_key": "images", "cond_stage_key": "captions", "control_key": "hint", "image_size": 64,
        "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False, "scale_by_std": False, "ckpt_path": None, "ignore_keys": [],
        "parameterization": "eps", "clip_denoised": True, "load_only_unet": False, "cosine_s": 8e-3,
        "given_betas": None, "original_elbo_weight": 0, "v_posterior": 0, "l_simple_weight": 1,
        "use_positional_encodings": False, "learn_logvar": False, "logvar_init": 0, "beta_schedule": "linear",
        "loss_type": "l2", "learning_rate": 1.0e-4, "concat_mode": True, "cond_stage_forward": None,
        "text_embedding_dropout_rate": 0.1, "fused_opt": True, "inductor": True, "inductor_cudagraphs": False,
        "capture_cudagraph_iters": -1, "channels_last": True, "only_mid_control": False, "sd_locked": True,
        "control_stage_config": {
            "_target_": f"{NEMO}.models.controlnet.controlnet.ControlNet",
            "params": {"from_pretrained_unet": "/ckpts/v1-5-pruned.ckpt", "from_NeMo": True, "image_size": 32,
                       "hint_channels": 3, "use_linear_in_transformer": False, **SD15_UNET},
        },
        "unet_config": {"_target_": f"{NEMO}.models.controlnet.controlnet.ControlledUnetModel",
                        "from_pretrained": "/ckpts/v1-5-pruned.ckpt", "from_NeMo": True, "image_size": 32,
                        "out_channels": 4, **SD15_UNET},
        "first_stage_config": {"_target_": f"{NEMO}.models.text_to_image.stable_diffusion.ldm.autoencoder."
                                           "AutoencoderKL",
                               "from_pretrained": "/ckpts/vae.bin", "embed_dim": 4, "monitor": "val/rec_loss",
                               "ddconfig": SD_VAE, "lossconfig": {"target": "torch.nn.Identity"}},
        "cond_stage_config": {"_target_": f"{NEMO}.modules.stable_diffusion.encoders.modules.FrozenCLIPEmbedder",
                              "version": "openai/clip-vit-large-patch14", "device": "cuda", "max_length": 77},
        "data": {
            "num_workers": 16, "synthetic_data": False, "synthetic_data_length": 10000,
            "train": {"dataset_path": ["fill50k/fill50k-000000.tar", "fill50k/fill50k-000001.tar"],
                      "augmentations": {"resize_smallest_side": 512, "center_crop_h_w": "512, 512",
                                        "horizontal_flip": False},
                      "filterings": None},
            "webdataset": {"infinite_sampler": False, "local_root_path": "/datasets"},
        },
        "optim": {"name": "fused_adam", "lr": 2e-5, "weight_decay": 0.0, "betas": [0.9, 0.999],
                  "sched": {"name": "WarmupHoldPolicy", "warmup_steps": 100, "hold_steps": 10000000000000}},
        "nsys_profile": {"enabled": False, "start_step": 10, "end_step": 10, "ranks": [0], "gen_shape": False},
        "image_logger": {"batch_frequency": 1000, "max_images": 4},
        "seed": 1234, "resume_from_checkpoint": None, "apex_transformer_log_level": 30,
        "gradient_as_bucket_view": True,
    },
}  # fmt: skip

# What has no counterpart here, and nothing else.
NOT_MAPPED_V15 = {
    "trainer.logger", "trainer.enable_checkpointing", "trainer.max_epochs", "trainer.accumulate_grad_batches",
    "trainer.limit_val_batches", "model.learning_rate", "model.log_every_t", "model.monitor", "model.use_ema",
    "model.clip_denoised", "model.fused_opt", "model.inductor_cudagraphs", "model.capture_cudagraph_iters",
    "model.first_stage_config.from_pretrained", "model.first_stage_config.monitor", "model.apex_transformer_log_level",
    "model.gradient_as_bucket_view", *(f"model.nsys_profile.{k}" for k in ("enabled", "start_step", "end_step",
                                                                         "ranks", "gen_shape")),
}  # fmt: skip


DELETE = object()


def nemo_config(tmp_path: Path, changes: dict | None = None, name: str = "controlnet_v1-5") -> Path:
    """CONTROLNET_V15 with ``changes`` (dotted keys; DELETE removes one) written as NeMo's YAML."""
    cfg = OmegaConf.create(copy.deepcopy(CONTROLNET_V15))
    for key, value in (changes or {}).items():
        parent, _, leaf = key.rpartition(".")
        if value is DELETE:
            OmegaConf.select(cfg, parent).pop(leaf)
        else:
            OmegaConf.update(cfg, key, value, force_add=True)
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(cfg, path)
    return path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([str(SCRIPTS / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def composed(config_dir: Path, name: str, *overrides: str, cwd: Path):
    """The job config controlnet-train composes from a migrated file, as the documented command runs it."""
    proc = _run("controlnet-train", "--config-dir", str(config_dir), f"+experiment={name}", *overrides, "--cfg", "job",
                cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return OmegaConf.create(proc.stdout)


def test_nemo_controlnet_v15_migrates_to_a_config_that_composes_and_validates(tmp_path):
    source = nemo_config(tmp_path)
    out = tmp_path / "configs" / "experiment" / "controlnet_v1-5.yaml"
    proc = _run("controlnet-migrate", f"nemo_config={source}", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    command = f"controlnet-train --config-dir {tmp_path / 'configs'} +experiment=controlnet_v1-5"
    assert f"train with: {command}" in proc.stdout
    listed = proc.stdout.split("not mapped (")[1].split("notes:")[0].splitlines()[1:]
    assert {line.strip().split("=")[0] for line in listed} == NOT_MAPPED_V15
    assert "  model.use_ema=false: EMA is not implemented" in listed
    assert "trainer.accumulate_grad_batches=2: global_batch_size 128 / (micro_batch_size 4 x devices 8 x num_nodes 2)" \
        in proc.stdout  # fmt: skip
    text = out.read_text()
    assert text.startswith("# @package _global_\n") and "#   model.use_ema=false: EMA is not implemented" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["controlnet_v1-5.yaml"]  # atomic: no temp file left

    cfg = composed(tmp_path / "configs", "controlnet_v1-5", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    validate_train_config(cfg)
    unet = compose_model("sd15").unet_config
    assert cfg.model.name == "sd15" and cfg.model.unet_config == unet  # the architecture: SD 1.5's, untouched
    assert cfg.model.checkpoint == "/ckpts/v1-5-pruned.ckpt" and cfg.model.control_stage_config.pretrained is None
    assert (cfg.model.hint_channels, cfg.model.sd_locked, cfg.model.only_mid_control) == (3, True, False)
    assert cfg.model.control_key == "hint" and cfg.model.prediction_type == "epsilon"
    assert cfg.model.proportion_empty_prompts == 0.1 and cfg.model.first_stage_config.scaling_factor == 0.18215
    scheduler = cfg.model.scheduler_config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert list(cfg.data.shards) == ["/datasets/fill50k/fill50k-000000.tar", "/datasets/fill50k/fill50k-000001.tar"]
    assert (cfg.data.batch_size, cfg.data.num_workers, cfg.data.resolution) == (4, 16, 512)
    assert (cfg.data.augment.crop, cfg.data.augment.hflip) == ("center", 0.0)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.strategy == "auto"  # trainer=gpu
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.precision) == (8, 2, "bf16-mixed")
    assert (cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches, cfg.trainer.log_every_n_steps) == (40000, 2, 10)
    assert cfg.optim.lr == 2e-5 and cfg.optim.weight_decay == 0.0 and list(cfg.optim.betas) == [0.9, 0.999]
    assert (cfg.optim.fused, cfg.optim.lr_scheduler, cfg.optim.warmup_steps) == (True, "constant_with_warmup", 100)
    assert cfg.perf.channels_last is True and cfg.perf.compile is True
    assert dict(cfg.perf.gradient_checkpointing) == {"controlnet": False, "unet_decoder": False}
    assert (cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last, cfg.resume, cfg.seed) == (5000, 0, True, 1234)
    assert (cfg.validation.every_n_steps, cfg.validation.num_samples, cfg.report_to) == (1000, 4, "tensorboard")

    # The run directory is NeMo's: runs/<name> from the command line's directory (exp_dir null).
    assert composed(tmp_path / "configs", "controlnet_v1-5", cwd=tmp_path).run_dir == "runs/ControlNet-v1-5"


def compose_model(name: str):
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[f"model={name}"]).model


def test_every_leaf_is_mapped_the_same_or_listed_and_every_handled_key_is_in_the_docs_table(tmp_path):
    m = migrate(OmegaConf.create(CONTROLNET_V15))

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    assert set(m.status) == set(leaves(CONTROLNET_V15)) == set(m.leaves)  # nothing silently dropped
    assert {k for k, (s, _) in m.status.items() if s == NOT_MAPPED} == NOT_MAPPED_V15
    assert all(why.strip() for _, why in m.status.values())
    docs = DOCS.read_text()
    assert key_table() in docs  # the table the code maps by, verbatim
    for key, (status, _) in m.status.items():
        rule = rule_for(canonical(key))
        assert rule is not None and f"| `{rule.nemo}` |" in docs, key
        if status in (MAPPED, SAME) and "*" not in rule.nemo:
            assert rule.nemo == canonical(key), key  # a mapped key has its own row
    assert m.status["model.unet_config.channel_mult"] == (MAPPED, "model=sd15")
    assert m.status["model.optim.lr"] == (MAPPED, "optim.lr")
    assert m.status["model.unet_config.use_flash_attention"][0] == SAME
    assert "PyTorch SDPA" in m.status["model.unet_config.use_flash_attention"][1]
    # NeMo's own placement of data and optim is under model; a top-level one is read the same way.
    moved = copy.deepcopy(CONTROLNET_V15)
    moved["optim"] = moved["model"].pop("optim")
    m2 = migrate(OmegaConf.create(moved))
    assert m2.status["optim.lr"] == (MAPPED, "optim.lr") and m2.values["optim.lr"] == 2e-5
    # An unknown key is listed, not dropped.
    unknown = copy.deepcopy(CONTROLNET_V15)
    unknown["model"]["my_extension"] = {"knob": 3}
    m3 = migrate(OmegaConf.create(unknown))
    assert m3.status["model.my_extension.knob"] == (NOT_MAPPED, "not a key of NeMo's ControlNet recipe that "
                                                                "controlnet-migrate knows")  # fmt: skip


def test_the_model_presets_read_as_data_are_the_ones_hydra_composes():
    for name in ("sd15", "sd21"):
        composed_model = OmegaConf.to_container(compose_model(name))
        preset = model_preset(name)
        for node in ("unet_config", "first_stage_config", "scheduler_config"):
            assert preset[node] == composed_model[node], (name, node)


def test_sd21_v_prediction_config_chooses_sd21(tmp_path):
    unet = {"num_heads": -1, "num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024}
    parts = ("unet_config", "control_stage_config.params")
    changes = {f"model.{part}.{k}": v for part in parts for k, v in unet.items()}
    changes.update({"model.cond_stage_config._target_": f"{NEMO}.modules.stable_diffusion.encoders.modules."
                    "FrozenOpenCLIPEmbedder", "model.cond_stage_config.version": DELETE,
                    "model.cond_stage_config.arch": "ViT-H-14", "model.cond_stage_config.layer": "penultimate",
                    "model.parameterization": "v", "model.image_size": 96,
                    "model.data.train.augmentations": None})  # fmt: skip
    m = migrate(OmegaConf.load(nemo_config(tmp_path, changes)))
    assert m.choices["model"] == "sd21" and m.status["model.unet_config.num_head_channels"] == (MAPPED, "model=sd21")
    assert not [k for k in m.values if k.startswith("model.unet_config")]
    assert m.values["model.prediction_type"] == "v_prediction" and m.values["data.resolution"] == 768
    assert m.status["model.image_size"] == (MAPPED, "data.resolution (the latent size x 8)")


def test_the_wandb_logger_maps_to_report_to_and_its_project(tmp_path):
    changes = {"exp_manager.create_wandb_logger": True}
    m = migrate(OmegaConf.load(nemo_config(tmp_path, changes)))
    w = "exp_manager.wandb_logger_kwargs"
    assert m.values["report_to"] == ["tensorboard", "wandb"] and m.values["tracker_project_name"] == "stable-diffusion"
    assert m.status["exp_manager.create_wandb_logger"] == (MAPPED, "report_to")
    assert m.status[f"{w}.project"] == (MAPPED, "tracker_project_name")
    assert m.status[f"{w}.name"][0] == SAME and m.status[f"{w}.group"][0] == NOT_MAPPED
    m = migrate(OmegaConf.load(nemo_config(tmp_path, {**changes, "exp_manager.create_tensorboard_logger": False})))
    assert m.values["report_to"] == "wandb"
    m = migrate(OmegaConf.load(nemo_config(tmp_path)))  # W&B off: its kwargs are unused, not "not mapped"
    assert m.values["report_to"] == "tensorboard" and "tracker_project_name" not in m.values
    assert m.status[f"{w}.group"][0] == SAME


def test_a_small_architecture_maps_to_unet_keys_and_the_migrated_config_trains(tmp_path, shapes_dir):
    """Non-standard channels: model=sd15 with the UNet and VAE keys that differ; then two training steps on a
    CPU with the migrated config exactly as written (trainer, data, optimizer, checkpoints all from NeMo's)."""
    tiny_unet = {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1], "num_res_blocks": 1}
    changes = {f"model.{part}.{k}": v for part in ("unet_config", "control_stage_config.params")
               for k, v in tiny_unet.items()}  # fmt: skip
    changes.update({
        "model.first_stage_config.ddconfig.ch": 32, "model.first_stage_config.ddconfig.ch_mult": [1, 1, 1, 1],
        "model.first_stage_config.ddconfig.num_res_blocks": 1, "model.first_stage_config.from_pretrained": None,
        "model.unet_config.from_pretrained": None, "model.control_stage_config.params.from_pretrained_unet": None,
        "trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.num_nodes": 1, "trainer.precision": 32,
        "trainer.max_steps": 2, "trainer.log_every_n_steps": 1, "model.micro_batch_size": 1,
        "model.global_batch_size": 2, "model.channels_last": False, "model.inductor": False,
        "model.data.num_workers": 0, "model.data.train.augmentations.resize_smallest_side": 64,
        "model.data.train.dataset_path": sorted(str(p) for p in (shapes_dir / "train").glob("*.tar")),
        "model.data.webdataset.local_root_path": None, "exp_manager.exp_dir": str(tmp_path / "runs"),
        "exp_manager.checkpoint_callback_params.every_n_train_steps": 2, "model.image_logger.batch_frequency": 0,
        "model.sd_locked": False,
    })  # fmt: skip
    out = tmp_path / "configs" / "experiment" / "tiny.yaml"
    migrate_file(str(nemo_config(tmp_path, changes, "tiny")), str(out))
    m = migrate(OmegaConf.load(tmp_path / "tiny.yaml"))
    assert m.choices == {"model": "sd15", "data": "shards", "trainer": "default"}
    assert {k: v for k, v in m.values.items() if k.startswith(("model.unet_config", "model.first_stage_config"))} == {
        "model.unet_config.layers_per_block": 1,
        "model.unet_config.block_out_channels": [32, 64],
        "model.unet_config.down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "model.unet_config.up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "model.first_stage_config.layers_per_block": 1,
        "model.first_stage_config.block_out_channels": [32, 32, 32, 32],
        "model.first_stage_config.scaling_factor": 0.18215,
    }
    assert m.status["model.unet_config.model_channels"] == (MAPPED, "model.unet_config.block_out_channels")
    assert m.status["model.control_stage_config.params.from_pretrained_unet"][0] == NOT_MAPPED  # NeMo: random start
    assert m.values["optim.unet_lr"] == 2e-5  # sd_locked=false: the decoder at the ControlNet's rate, as in NeMo

    # As written; only the FLOP count (an extra forward and backward at the start) is left out, for time.
    proc = _run("controlnet-train", "--config-dir", str(tmp_path / "configs"), "+experiment=tiny",
                "perf.count_flops=false", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "ControlNet-v1-5"
    assert (run / "checkpoints" / "step=0000002.ckpt").is_file()
    saved = OmegaConf.load(run / "config.yaml")
    assert list(saved.model.unet_config.block_out_channels) == [32, 64] and saved.trainer.accumulate_grad_batches == 2


def test_a_unet_over_another_text_encoder_fails_naming_the_key(tmp_path):
    changes = {"model.unet_config.context_dim": 32, "model.control_stage_config.params.context_dim": 32}
    with pytest.raises(ConfigError, match=r"^model.unet_config.context_dim=32: the text encoder of "
                       r"model.cond_stage_config \(openai/clip-vit-large-patch14\) is 768 wide"):  # fmt: skip
        migrate(OmegaConf.load(nemo_config(tmp_path, changes)))


def test_pickled_wdinfo_and_diffusers_weights(tmp_path):
    changes = {"model.data.train.dataset_path": ["/datasets/fill50k.pkl"], "model.unet_config.from_NeMo": False,
               "model.unet_config.from_pretrained": "/models/sd15/unet/diffusion_pytorch_model.bin",
               "model.first_stage_config.from_pretrained": None, "model.data.webdataset.infinite_sampler": True,
               "model.sd_locked": False, "model.optim.sched.name": "CosineAnnealing",
               "model.optim.sched.min_lr": 1e-6}  # fmt: skip
    out = tmp_path / "configs" / "experiment" / "pkl.yaml"
    report = migrate_file(str(nemo_config(tmp_path, changes)), str(out))
    assert "dataset_path=['/datasets/fill50k.pkl']: a pickled wdinfo (.pkl) is never unpickled" in report
    assert "model.optim.sched.min_lr=1e-06: diffusers' decaying schedules end at 0" in report
    cfg = composed(tmp_path / "configs", "pkl", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert cfg.model.name == "local_diffusers" and cfg.model.path == "/models/sd15"
    assert cfg.model.unet_config._target_ == "diffusers.UNet2DConditionModel.from_pretrained"
    assert set(cfg.model.unet_config) == {"_target_", "pretrained_model_name_or_path", "subfolder", "local_files_only"}
    assert cfg.data.shards is None and cfg.data.resampled is True and cfg.optim.lr_scheduler == "cosine"
    with pytest.raises(ConfigError) as error:  # what is left to set by hand, named
        validate_train_config(cfg)
    assert "set exactly one of data.shards" in str(error.value)
    assert "data.samples_per_epoch: missing" in str(error.value)


def test_command_line_mistakes_are_one_line(tmp_path):
    source = nemo_config(tmp_path)
    missing = tmp_path / "nope.yaml"
    cases = {
        (f"nemo_config={missing}", f"out={tmp_path}/c/experiment/x.yaml"): f"nemo_config='{missing}': no such file",
        (f"nemo_config={source}", f"out={tmp_path}/c/x.yaml"): "expected <dir>/experiment/<name>.yaml",
    }
    for args, message in cases.items():
        proc = _run("controlnet-migrate", *args, cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("controlnet-migrate: error: ") and message in line, line
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not readable as YAML"):
        migrate_file(str(tmp_path / "bad.yaml"), str(tmp_path / "c" / "experiment" / "x.yaml"))
    out = tmp_path / "c" / "experiment" / "x.yaml"
    migrate_file(str(source), str(out))
    with pytest.raises(ConfigError, match="exists; overwrite=true replaces it"):
        migrate_file(str(source), str(out))
    migrate_file(str(source), str(out), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "c", "controlnet_v1-5.yaml"]  # no log files


def test_help_and_cfg_job(tmp_path):
    proc = _run("controlnet-migrate", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("controlnet-migrate is powered by Hydra.")
    assert "== Configuration groups ==" not in proc.stdout and "nemo_config: ???" in proc.stdout
    proc = _run("controlnet-migrate", "nemo_config=x.yaml", "out=c/experiment/x.yaml", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0 and "out: c/experiment/x.yaml" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []
