"""Training: end to end, resume (also after kill -9), what trains and what is saved, options."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from nemo_controlnet.config import ConfigError, validate_train_config
from nemo_controlnet.data.datamodule import validation_samples
from nemo_controlnet.inference.generate import generate
from nemo_controlnet.inference.pipeline import controlnet_pipeline
from nemo_controlnet.data.transforms import normalize_batch
from nemo_controlnet.models.controlnet import controlled_unet_forward
from nemo_controlnet.models.formats import load_original_controlnet
from nemo_controlnet.models.stack import build_stack
from nemo_controlnet.training.checkpoint import latest_checkpoint, list_checkpoints
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.run import export_checkpoint, train
from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[1]


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_end_to_end_train_resume_export_generate(train_cfg, shapes_dir, tmp_path):
    cfg = train_cfg()
    trainer, module = train(cfg)
    run = Path(cfg.run_dir)
    assert trainer.global_step == 4
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4]
    assert module.data_position == (0, 3)  # four batches consumed
    assert (run / "config.yaml").is_file() and OmegaConf.load(run / "config.yaml").data.batch_size == 4
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["step_0000000.png", "step_0000004.png"]
    assert Image.open(run / "samples" / "step_0000004.png").size == (128, 128)  # 2 rows of hint | sample

    # Run again with more steps: resumes at step 4 and continues the data stream, no replay.
    trainer2, module2 = train(train_cfg("trainer.max_steps=6"))
    assert trainer2.global_step == 6
    assert module2.data_position == (0, 5)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 6]  # keep_last=2

    exported = ControlNetModel.from_pretrained(run / "controlnet")
    for key, value in module2.controlnet.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key
    card = (run / "controlnet" / "README.md").read_text()
    assert "| steps | 6 |" in card and "![validation](validation.png)" in card
    assert (run / "controlnet" / "validation.png").read_bytes() == (run / "samples" / "step_0000006.png").read_bytes()
    original = load_original_controlnet(run / f"control_{run.name}.safetensors", dict(exported.config))  # fp16
    for key, value in module2.controlnet.state_dict().items():
        torch.testing.assert_close(original.state_dict()[key], value, atol=1e-3, rtol=1e-3)

    hint_path = tmp_path / "hint.png"
    Image.fromarray((validation_samples(cfg.validation, cfg.data, 3)[1][0] * 255).byte().permute(1, 2, 0).numpy()).save(
        hint_path
    )
    gen_cfg = OmegaConf.create(
        {
            "controlnet": str(run),
            "model": None,
            "hints": [str(hint_path)],
            "images": [],
            "hint": None,
            "prompts": ["red circle with blue background"],
            "negative_prompt": None,
            "resolution": None,
            "num_inference_steps": 2,
            "guidance_scale": 7.5,
            "control_scale": 1.0,
            "seed": 0,
            "batch_size": 2,
            "sampler": "unipc",
            "device": "cpu",
            "out_dir": str(tmp_path / "gen"),
        }
    )
    written = generate(gen_cfg)
    assert [p.name for p in written] == ["00000.png"]
    assert Image.open(written[0]).size == (64, 64)
    assert (tmp_path / "gen" / "grid.png").is_file()


def test_interrupted_run_ends_bitwise_equal_to_uninterrupted(train_cfg, tmp_path):
    """Weights, optimizer, schedule, data position and RNG all resume: 2 + 2 steps == 4 steps."""
    _, straight = train(train_cfg("validation.num_samples=0", f"run_dir={tmp_path / 'a'}"))
    train(train_cfg("validation.num_samples=0", f"run_dir={tmp_path / 'b'}", "trainer.max_steps=2"))
    _, resumed = train(train_cfg("validation.num_samples=0", f"run_dir={tmp_path / 'b'}"))
    assert resumed.data_position == straight.data_position == (0, 3)
    for key, value in straight.controlnet.state_dict().items():
        assert torch.equal(resumed.controlnet.state_dict()[key], value), key


def test_locked_weights_unchanged_controlnet_changed(train_cfg):
    cfg = train_cfg("checkpoint.every_n_steps=0", "validation.num_samples=0")
    fresh = build_stack(cfg.model)
    fresh_controlnet = instantiate(cfg.model.control_stage_config, unet=fresh.unet, hint_channels=3)
    _, module = train(cfg)
    for name, part in (("unet", fresh.unet), ("vae", fresh.vae), ("text_encoder", fresh.text_encoder)):
        for key, value in part.state_dict().items():
            assert torch.equal(getattr(module, name).state_dict()[key], value), f"{name}.{key} changed"
    changed = [
        k for k, v in fresh_controlnet.state_dict().items() if not torch.equal(module.controlnet.state_dict()[k], v)
    ]
    assert any(k.startswith("controlnet_down_blocks") for k in changed)
    assert any(k.startswith("down_blocks") for k in changed)


def test_checkpoints_wait_for_the_end_of_gradient_accumulation(train_cfg):
    cfg = train_cfg(
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=2",
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=0",
        "validation.num_samples=0",
        "model.control_key=control",
    )
    _, module = train(cfg)
    ckpts = list_checkpoints(Path(cfg.run_dir) / "checkpoints")
    assert [s for s, _ in ckpts] == [1, 2]
    positions = [torch.load(p, weights_only=True)["nemo_controlnet"]["data_position"] for _, p in ckpts]
    assert positions == [[0, 1], [0, 3]]  # two micro-batches per step, saved after the second


def test_bf16_mixed_runs_locked_parts_in_bf16(train_cfg):
    cfg = train_cfg("trainer.precision=bf16-mixed", "trainer.max_steps=2", "validation.num_samples=1")
    _, module = train(cfg)
    assert {p.dtype for m in (module.unet, module.vae, module.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.controlnet.parameters()} == {torch.float32}  # master weights
    assert (Path(cfg.run_dir) / "samples" / "step_0000002.png").is_file()


def test_checkpoint_holds_only_trainable_weights(train_cfg):
    cfg = train_cfg("trainer.max_steps=2", "validation.num_samples=0")
    train(cfg)
    ckpt = torch.load(latest_checkpoint(Path(cfg.run_dir) / "checkpoints"), weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith("controlnet.") for k in keys)
    assert ckpt["nemo_controlnet"]["data_position"] == [0, 1]
    assert "optimizer_states" in ckpt and ckpt["global_step"] == 2


@pytest.mark.parametrize("sd_locked", [True, False])
def test_optimizer_holds_exactly_the_trainable_parameters(sd_locked):
    cfg = compose_train([f"model.sd_locked={str(sd_locked).lower()}", "optim.unet_lr=3e-6"])
    module = ControlNetModule(cfg.model, cfg.optim)
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert {id(p) for p in module.controlnet.parameters()} <= in_optimizer
    for frozen in (module.vae, module.text_encoder, module.unet.down_blocks, module.unet.mid_block):
        assert not {id(p) for p in frozen.parameters()} & in_optimizer
    decoder = {id(p) for p in module.unet.up_blocks.parameters()} | {id(p) for p in module.unet.conv_out.parameters()}
    groups = {g["name"]: g for g in optimizer.param_groups}
    if sd_locked:
        assert list(groups) == ["controlnet"] and not decoder & in_optimizer
    else:
        assert decoder <= in_optimizer and groups["unet_decoder"]["initial_lr"] == 3e-6
        assert {id(p) for p in groups["unet_decoder"]["params"]} == decoder | {
            id(p) for p in module.unet.conv_norm_out.parameters()
        }


def test_unlocked_decoder_trains_and_is_exported(train_cfg):
    cfg = train_cfg("model.sd_locked=false", "optim.unet_lr=1e-3", "trainer.max_steps=2", "validation.num_samples=0")
    fresh = build_stack(cfg.model)
    _, module = train(cfg)
    assert not torch.equal(module.unet.conv_out.weight, fresh.unet.conv_out.weight)
    assert torch.equal(module.unet.conv_in.weight, fresh.unet.conv_in.weight)  # the encoder stays locked
    ckpt = torch.load(latest_checkpoint(Path(cfg.run_dir) / "checkpoints"), weights_only=True)
    assert any(k.startswith("unet.up_blocks") for k in ckpt["state_dict"])
    assert not any(k.startswith("unet.down_blocks") for k in ckpt["state_dict"])
    assert (Path(cfg.run_dir) / "unet" / "config.json").is_file()


def test_resume_false_starts_over_keeping_the_old_checkpoints(train_cfg):
    cfg = train_cfg("trainer.max_steps=2", "validation.num_samples=0")
    train(cfg)
    trainer, _ = train(train_cfg("trainer.max_steps=2", "validation.num_samples=0", "resume=false"))
    run = Path(cfg.run_dir)
    assert trainer.global_step == 2
    aside = list(run.glob("checkpoints.previous-*"))
    assert len(aside) == 1 and [s for s, _ in list_checkpoints(aside[0])] == [2]


def test_resume_over_another_base_is_refused(train_cfg):
    train(train_cfg("trainer.max_steps=2", "validation.num_samples=0"))
    with pytest.raises(RuntimeError, match="trained over base model"):
        train(train_cfg("trainer.max_steps=4", "validation.num_samples=0", "model.seed=1"))


def test_generation_over_another_base_is_refused(train_cfg, tmp_path):
    import json

    cfg = train_cfg("trainer.max_steps=1", "validation.num_samples=0")
    train(cfg)
    meta_path = Path(cfg.run_dir) / "controlnet" / "nemo_controlnet.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"]["seed"] = 5  # as if the recorded base were another one
    meta_path.write_text(json.dumps(meta))
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        gen = compose(
            config_name="generate",
            overrides=[f"controlnet={cfg.run_dir}", "device=cpu", f"out_dir={tmp_path / 'g'}", "num_inference_steps=2"],
        )
    OmegaConf.set_struct(gen, False)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "h.png")
    gen.hints = [str(tmp_path / "h.png")]
    with pytest.raises(RuntimeError, match="differs from the one .* was trained over"):
        generate(gen)
    gen.use_recorded_base = False  # the right base, given by config (model: tiny): generation goes ahead
    assert [p.name for p in generate(gen)] == ["00000.png"]


def test_export_from_checkpoint_matches_training(train_cfg):
    cfg = train_cfg("trainer.max_steps=2", "validation.num_samples=0", "export.enabled=false")
    _, module = train(cfg)
    out = export_checkpoint(cfg.run_dir)
    exported = ControlNetModel.from_pretrained(out)
    for key, value in module.controlnet.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key


def test_killed_run_resumes_from_newest_complete_checkpoint(train_cfg):
    cfg = train_cfg()
    run = Path(cfg.run_dir)
    args = [
        sys.executable,
        "-m",
        "nemo_controlnet.cli.train",
        f"run_dir={run}",
        f"data.shards={cfg.data.shards}",
        "data.synthetic=null",
        "data.num_workers=0",
        "data.batch_size=2",
        "trainer.max_steps=100000",
        "checkpoint.every_n_steps=3",
        "checkpoint.keep_last=0",
        "validation.num_samples=0",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while len(list_checkpoints(run / "checkpoints")) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoints written"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpts = run / "checkpoints"
    newest_step, newest = list_checkpoints(ckpts)[-1]
    # What a kill during a write, or a damaged disk, can leave behind:
    (ckpts / ".step=9999998.ckpt.tmp-123").write_bytes(newest.read_bytes()[:1000])
    (ckpts / "step=9999999.ckpt").write_bytes(newest.read_bytes()[:5000])
    assert latest_checkpoint(ckpts) == newest
    trainer, _ = train(
        train_cfg(
            f"trainer.max_steps={newest_step + 1}",
            "validation.num_samples=0",
            "checkpoint.every_n_steps=3",
            "checkpoint.keep_last=0",
        )
    )
    assert trainer.global_step == newest_step + 1
    assert list_checkpoints(ckpts)[-2][0] == newest_step + 1  # the final step is checkpointed too


def test_hint_in_training_batch_equals_pipeline_input(shapes_dir):
    """Same range, channel order and pixels: what training sees is what generation feeds."""
    cfg = compose_train([f"validation.shards={shapes_dir / 'val'}", "validation.num_samples=2"])
    prompts, hints, _ = validation_samples(cfg.validation, cfg.data, 3)  # the loader's decode path
    stack = build_stack(cfg.model)
    controlnet = instantiate(cfg.model.control_stage_config, unet=stack.unet, hint_channels=3)
    pipe = controlnet_pipeline(
        stack.unet, controlnet, stack.vae, stack.text_encoder, stack.tokenizer, stack.noise_scheduler.config
    )
    as_pil = [Image.fromarray((h * 255).round().byte().permute(1, 2, 0).numpy()) for h in hints]
    from_pil = pipe.prepare_image(as_pil, 64, 64, 2, 1, torch.device("cpu"), torch.float32)
    from_tensor = pipe.prepare_image(hints, 64, 64, 2, 1, torch.device("cpu"), torch.float32)
    assert torch.allclose(from_pil, hints, atol=1e-6)  # pipeline: [0, 1] RGB, like the batch
    assert torch.equal(from_tensor, hints)  # and our tensors pass through unchanged
    assert hints.min() >= 0 and 0.5 < hints.max() <= 1


def test_command_line_overrides_reach_the_model():
    cfg = compose_train(
        [
            "model.hint_channels=1",
            "model.only_mid_control=true",
            "model.unet_config.layers_per_block=2",
            "model.control_scale=0.5",
            "model.proportion_empty_prompts=0.0",
        ]
    )
    module = ControlNetModule(cfg.model, cfg.optim)
    assert module.controlnet.config.conditioning_channels == 1
    assert module.unet.config.layers_per_block == 2 and module.controlnet.config.layers_per_block == 2
    assert module.controlnet._only_mid_control_hook is not None
    assert module.control_scale == 0.5 and module.proportion_empty_prompts == 0.0


def test_bad_config_fails_fast_naming_the_key(monkeypatch):
    def must_not_build(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr("nemo_controlnet.training.run.ControlNetModule", must_not_build)
    cfg = compose_train(["data.batch_size=0", "model.proportion_empty_prompts=1.5", "trainer.precision=bf17"])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "data.batch_size=0" in message and "model.proportion_empty_prompts=1.5" in message
    assert "trainer.precision='bf17'" in message
    validate_train_config(compose_train())  # the default is valid


def test_caption_dropout_and_prediction_targets():
    cfg = compose_train(["model.proportion_empty_prompts=1.0"])
    module = ControlNetModule(cfg.model, cfg.optim)
    assert module.drop_captions(["a", "b", "c"]) == ["", "", ""]
    module.proportion_empty_prompts = 0.0
    assert module.drop_captions(["a", "b"]) == ["a", "b"]
    module.proportion_empty_prompts = 0.5
    torch.manual_seed(0)
    dropped = sum(c == "" for c in module.drop_captions(["x"] * 2000))
    assert 900 < dropped < 1100


def test_v_prediction_loss_uses_the_velocity_target():
    cfg = compose_train(["model.prediction_type=v_prediction", "model.proportion_empty_prompts=0.0"])
    module = ControlNetModule(cfg.model, cfg.optim)
    assert module.noise_scheduler.config.prediction_type == "v_prediction"
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "hint": torch.rand(2, 3, 64, 64), "caption": ["a", "b"]}
    torch.manual_seed(3)
    loss = module.diffusion_loss(batch)
    # The same draws, by hand: latents, noise, timesteps, then the v target.
    torch.manual_seed(3)
    with torch.no_grad():
        latents = module.vae.encode(batch["image"]).latent_dist.sample() * module.vae.config.scaling_factor
        ehs, _ = module.encode_prompts(batch["caption"])
        noise = torch.randn(latents.shape)  # logical order, whatever the layout
        t = torch.randint(0, 1000, (2,))
        noisy = module.noise_scheduler.add_noise(latents, noise, t)
        down, mid = module.controlnet(noisy, t, ehs, controlnet_cond=batch["hint"], return_dict=False)
        pred = module.unet(
            noisy, t, ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    v = module.noise_scheduler.get_velocity(latents, noise, t)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, v), atol=1e-6)
    assert not torch.allclose(loss, torch.nn.functional.mse_loss(pred, noise), atol=1e-4)


def test_validation_keeps_train_mode_and_rng(train_cfg):
    cfg = train_cfg("trainer.max_steps=1")
    _, module = train(cfg)
    from nemo_controlnet.training.validation import ValidationImages

    prompts, hints, _ = validation_samples(cfg.validation, cfg.data, 3)
    callback = ValidationImages(Path(cfg.run_dir) / "val-test", prompts, hints, every_n_steps=1, num_inference_steps=2)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=1)
    module.train()
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    callback.fire(trainer, module, 7)
    assert torch.equal(torch.rand(3), expected)  # sampling did not consume the training RNG
    assert module.training and module.controlnet.training and not module.vae.training
    picture = np.asarray(Image.open(Path(cfg.run_dir) / "val-test" / "step_0000007.png"))
    assert picture.shape == (128, 128, 3)
    assert np.array_equal(picture[:64, :64], (hints[0] * 255).round().byte().permute(1, 2, 0).numpy())


def test_training_on_an_image_folder_with_augmentation(train_cfg, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(4):
        arr = np.zeros((72, 96, 3), np.uint8)
        arr[10 + i : 50, 20:70] = (200, 40 * i, 90)
        Image.fromarray(arr).save(root / f"{i}.jpg")
        (root / f"{i}.txt").write_text(f"box {i}")
    cfg = train_cfg(
        "data=folder", "data.shards=null", f"data.folder.root={root}", "data.hint.on_the_fly=true",
        "data.augment.crop=random", "data.augment.hflip=0.5", "data.resolution=64", "data.batch_size=2",
        "data.num_workers=0", "data.synthetic=null", "trainer.max_steps=3", "validation.num_samples=0",
    )  # fmt: skip
    trainer, module = train(cfg)
    assert trainer.global_step == 3 and module.data_position == (1, 0)  # 2 batches an epoch
    with pytest.raises(ConfigError, match="exactly one of data.shards, data.datasets, data.folder"):
        validate_train_config(compose_train([f"data.datasets=[{{shards: {root}}}]"]))


@pytest.mark.parametrize("access", ["stream", "indexed"])
def test_a_run_over_planted_bad_data_finishes_and_reports_counts(train_cfg, shapes_dir, tmp_path, caplog, access):
    import webdataset as wds

    bad = tmp_path / "bad.tar"
    members = dict(next(iter(wds.WebDataset(str(shapes_dir / "val" / "shapes-000000.tar"), shardshuffle=False))))
    with wds.TarWriter(str(bad)) as sink:
        sink.write({"__key__": "nohint", "jpg": members["jpg"], "txt": "x"})
        sink.write({"__key__": "badjpg", "jpg": b"not a jpeg", "png": members["png"], "txt": "x"})
        if access == "indexed":  # 68 samples: 17 whole batches, so both bad ones are in the epoch's plan
            for i in range(2):
                sink.write({"__key__": f"good{i}", "jpg": members["jpg"], "png": members["png"], "txt": "x"})
    shards = sorted(str(p) for p in (shapes_dir / "train").glob("*.tar")) + [str(bad)]
    cfg = train_cfg(f"data.shards=[{','.join(shards)}]", "trainer.max_steps=18", "validation.num_samples=0",
                    "checkpoint.every_n_steps=0", f"data.access={access}")  # fmt: skip
    with caplog.at_level("INFO", logger="nemo_controlnet"):
        trainer, _ = train(cfg)
    assert trainer.global_step == 18  # past the end of epoch 0 (16 or 17 batches of 4)
    if access == "stream":  # left out: 64 good samples, 16 batches
        counts = "2 bad samples skipped {'missing_hint': 1, 'corrupt_image': 1}"
        assert f"data epoch 0 done: 16 batches, {counts}" in caplog.text
    else:  # replaced by good samples of the same bucket: every planned batch full
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data epoch 0 done"))
        assert line.startswith("data epoch 0 done: 17 batches, ")
        assert "'missing_hint'" in line and "'corrupt_image'" in line


def test_sdxl_micro_conditioning_reaches_both_networks(train_cfg):
    cfg = train_cfg("model=tiny_sdxl", "data.augment.crop=random")
    module = ControlNetModule(cfg.model, cfg.optim)
    with torch.no_grad():
        for p in module.controlnet.controlnet_down_blocks.parameters():
            p.normal_(0, 0.1)
    from nemo_controlnet.data.datamodule import make_decoder
    from nemo_controlnet.data.webdataset import SampleStream, ShardSource, batches, expand_shards

    decoder = make_decoder(cfg.data, 3, seed=1)
    stream = SampleStream([(ShardSource(expand_shards(cfg.data.shards)), 1.0)], decoder, 2, 0, shuffle_buffer=0)
    batch = normalize_batch(next(iter(batches(stream))))
    assert batch["original_size"].tolist() == [[64, 64], [64, 64]]  # the shapes data is 64 px: no crop room
    ehs, pooled = module.encode_prompts(batch["caption"])
    assert ehs.shape == (2, 77, 80) and pooled.shape == (2, 32)
    added = module.family.micro_conditioning(module, batch, pooled)
    assert added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])

    def predict(time_ids):
        kwargs = {"text_embeds": pooled, "time_ids": time_ids}
        with torch.no_grad():
            return controlled_unet_forward(module.unet, module.controlnet, latents, t, ehs, batch["hint"], 1.0, kwargs)

    other = added["time_ids"].clone()
    other[:, 2:4] = 16.0  # another crop corner
    assert (predict(added["time_ids"]) - predict(other)).abs().max() > 1e-4


def test_sdxl_trains_validates_exports_and_generates(train_cfg, tmp_path):
    cfg = train_cfg("model=tiny_sdxl", "trainer.max_steps=2", "validation.num_samples=1")
    trainer, module = train(cfg)
    run = Path(cfg.run_dir)
    assert trainer.global_step == 2 and module.text_encoder_2 is not None
    assert Image.open(run / "samples" / "step_0000002.png").size == (128, 64)  # SDXL pipeline sampled it
    exported = ControlNetModel.from_pretrained(run / "controlnet")
    assert exported.config.addition_embed_type == "text_time"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "h.png")
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        overrides = [f"controlnet={run}", "device=cpu", f"hints=[{tmp_path / 'h.png'}]", "num_inference_steps=2"]
        gen = compose(config_name="generate", overrides=[*overrides, f"out_dir={tmp_path / 'g'}"])
    assert [p.name for p in generate(gen)] == ["00000.png"]


def test_cached_latents_and_text_embeddings_give_the_online_loss(monkeypatch):
    cfg = compose_train(["model.proportion_empty_prompts=0.0"])
    module = ControlNetModule(cfg.model, cfg.optim)
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "hint": torch.rand(2, 3, 64, 64), "caption": ["a b", "c"]}
    torch.manual_seed(3)
    online = module.diffusion_loss(dict(batch))
    torch.manual_seed(3)  # the same draws: the VAE sample, then noise and timesteps
    with torch.no_grad():
        latents = module.vae.encode(batch["image"]).latent_dist.sample() * module.vae.config.scaling_factor
        text_embeds, _ = module.encode_prompts(batch["caption"])

    def must_not_run(*args, **kwargs):
        raise AssertionError("an encoder ran although its output was cached")

    monkeypatch.setattr(module.vae, "encode", must_not_run)
    monkeypatch.setattr(module.text_encoder, "forward", must_not_run)
    cached = {"latents": latents, "text_embeds": text_embeds, "hint": batch["hint"], "caption": batch["caption"]}
    torch.testing.assert_close(module.diffusion_loss(cached), online)

    # Caption dropout on cached embeddings swaps in the empty prompt's, as dropping the caption would.
    monkeypatch.undo()
    with torch.no_grad():
        empty, _ = module.encode_prompts(["", ""])
    module.proportion_empty_prompts = 1.0
    states, _ = module.cached_prompts(cached, drop_captions=True)
    torch.testing.assert_close(states, empty)


def test_preemption_signal_checkpoints_stops_and_the_rerun_continues(train_cfg):
    cfg = train_cfg()
    run = Path(cfg.run_dir)
    args = [sys.executable, "-m", "nemo_controlnet.cli.train", f"run_dir={run}", f"data.shards={cfg.data.shards}",
            "data.synthetic=null", "data.num_workers=0", "data.batch_size=2", "trainer.max_steps=100000",
            "checkpoint.every_n_steps=0", "validation.num_samples=0", "logger=none",
            "trainer.enable_progress_bar=false"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 120
        while "first batch" not in ((run / "train.log").read_text() if (run / "train.log").exists() else ""):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)  # SLURM's warning before the end of the allocation
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    steps = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert len(steps) == 1 and steps[0] > 0  # every_n_steps=0: only the preemption wrote one
    assert not (run / "controlnet").exists()  # no final export from a preempted run
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    trainer, _ = train(train_cfg("checkpoint.every_n_steps=0", "validation.num_samples=0",
                                 f"trainer.max_steps={steps[0] + 2}"))  # fmt: skip
    assert trainer.global_step == steps[0] + 2
    # The run's handlers are gone with it: a later SIGTERM (or a forked worker's) is not swallowed.
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_base_training_is_a_config_and_a_controlnet_trains_over_its_export(train_cfg, tmp_path):
    """No ControlNet in the config: the same trainer trains the UNet itself and exports the base as a
    diffusers directory; a ControlNet then trains over it (the examples/fill50k recipe)."""
    toy = ["model=toy", "data.resolution=32", "validation.num_samples=2", "trainer.max_steps=2"]
    cfg = train_cfg(*toy, "model.control_stage_config=null", f"run_dir={tmp_path / 'base'}", "export.original=false")
    start = ControlNetModule(cfg.model, cfg.optim)
    trainer, module = train(cfg)
    assert module.controlnet is None and module.training_mode.name == "base" and trainer.global_step == 2
    before, after = start.unet.state_dict(), module.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the UNet trained
    for name in ("text_encoder", "vae"):
        a, b = getattr(start, name).state_dict(), getattr(module, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name  # the rest stayed locked
    base = tmp_path / "base" / "base"
    assert (base / "unet" / "config.json").is_file() and (base / "vae" / "config.json").is_file()
    assert Image.open(tmp_path / "base" / "samples" / "step_0000002.png").size == (64, 64)  # hint | text-to-image

    over = train_cfg(
        "+experiment=fill50k_controlnet", f"model.path={base}", f"run_dir={tmp_path / 'cn'}",
        f"data.shards={cfg.data.shards}", f"data.validation_shards={cfg.data.validation_shards}", "data.synthetic=null",
        "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=1", "validation.num_samples=2", "logger=csv",
    )  # fmt: skip
    _, controlled = train(over)
    torch.testing.assert_close(controlled.unet.state_dict()["conv_out.weight"], after["conv_out.weight"])
    assert (tmp_path / "cn" / "controlnet" / "config.json").is_file()


def test_sdxl_on_aspect_buckets_resumes_bitwise_and_checks_the_step(train_cfg, tmp_path, caplog):
    """Mixed-aspect shards, SDXL micro-conditioning, buckets: 2 + 2 steps == 4 steps, and a bucket
    side the base cannot take is refused naming the key."""
    from tests.test_indexed import write_shards

    sizes = [[(96, 64), (64, 96), (72, 72), (120, 60)] * 4 for _ in range(2)]
    shards = write_shards(tmp_path, "mixed", sizes)
    common = ["model=tiny_sdxl", f"data.shards=[{','.join(shards)}]", "data.buckets.enabled=true",
              "data.buckets.step=16", "data.augment.crop=random", "data.augment.hflip=0.5",
              "validation.num_samples=0", "trainer.max_steps=6"]  # fmt: skip
    with caplog.at_level("INFO", logger="nemo_controlnet"):
        _, straight = train(train_cfg(*common, f"run_dir={tmp_path / 'a'}"))
    assert "aspect buckets (width x height, samples): 48x80: 8, 64x64: 8, 80x48: 16" in caplog.text
    train(train_cfg(*common, f"run_dir={tmp_path / 'b'}", "trainer.max_steps=3"))
    _, resumed = train(train_cfg(*common, f"run_dir={tmp_path / 'b'}"))
    assert resumed.data_position == straight.data_position
    for key, value in straight.controlnet.state_dict().items():
        assert torch.equal(resumed.controlnet.state_dict()[key], value), key
    with pytest.raises(ValueError, match="data.buckets.step=8 must be a multiple of 16"):
        train(train_cfg(*common, f"run_dir={tmp_path / 'c'}", "data.buckets.step=8"))
