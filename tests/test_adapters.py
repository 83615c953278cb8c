"""Adapter mode's building blocks: LoRA/LoKr on the UNet, the frozen ControlNet's residuals wherever
the ControlNet lives (resident, accelerate offload, manual swap) and wherever they wait."""

import copy

import pytest
import torch

from nemo_controlnet.models.adapters import (
    ControlResiduals,
    add_adapter,
    check_adapter_options,
    make_adapter_config,
    save_lora,
)
from nemo_controlnet.models.controlnet import controlled_unet_forward
from nemo_controlnet.models.families import SDUNetFamily
from nemo_controlnet.models.stack import build_stack
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.run import train
from tests.conftest import compose_train

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def parts():
    cfg = compose_train([])
    module = ControlNetModule(cfg.model, cfg.optim)
    torch.manual_seed(0)
    for name, p in module.controlnet.named_parameters():  # non-zero zero convs: residuals that matter
        if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
            p.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "noisy_latents": torch.randn(2, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
        "hint": torch.rand(2, 3, 64, 64, generator=g),
    }
    return module, inputs


def residuals_of(residuals: ControlResiduals, inputs: dict):
    """The SD family's (down, mid) residuals through ``residuals`` for the fixture's inputs."""
    cond = {"encoder_hidden_states": inputs["encoder_hidden_states"], "added_cond_kwargs": None}
    return residuals(SDUNetFamily(), inputs["noisy_latents"], inputs["timesteps"], cond, inputs["hint"])


def _residual_shapes_of_the_unet(unet, inputs) -> list[tuple]:
    """The skip tensors the UNet's decoder takes, captured from its own encoder."""
    shapes = []
    handles = [unet.conv_in.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))]
    for block in unet.down_blocks:
        handles.append(block.register_forward_hook(lambda m, a, out: shapes.extend(tuple(r.shape) for r in out[1])))
    mid = []
    handles.append(unet.mid_block.register_forward_hook(lambda m, a, out: mid.append(tuple(out.shape))))
    with torch.no_grad():
        unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"])
    for h in handles:
        h.remove()
    return shapes + mid


def test_residual_shapes_test(parts):
    module, inputs = parts
    down, mid = residuals_of(ControlResiduals(module.controlnet), inputs)
    assert all(not r.requires_grad for r in (*down, mid))  # detached: no graph through the frozen ControlNet
    assert [tuple(r.shape) for r in (*down, mid)] == _residual_shapes_of_the_unet(module.unet, inputs)


def test_sd15_gives_12_down_residuals_and_one_mid():
    cfg = compose_train(["model=sd15"])
    with torch.device("meta"):
        stack = build_stack(cfg.model)
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_unet(stack.unet, load_weights_from_unet=False)
        down, mid = controlnet(torch.randn(1, 4, 64, 64), torch.tensor([1]), torch.randn(1, 77, 768),
                               torch.rand(1, 3, 512, 512), return_dict=False)  # fmt: skip
    assert len(down) == 12 and tuple(mid.shape) == (1, 1280, 8, 8)
    assert [tuple(d.shape[1:]) for d in down][::3] == [(320, 64, 64), (320, 32, 32), (640, 16, 16), (1280, 8, 8)]


@pytest.mark.parametrize(
    "offload, storage", [("accelerate", "gpu"), ("manual_swap", "gpu"), ("manual_swap", "cpu_pinned")]
)
def test_swap_correctness_test(parts, offload, storage):
    """Offloaded (accelerate's hooks) or swapped ControlNets, residuals parked on the host or not: the
    UNet's prediction is bit-identical to the resident flow's."""
    module, inputs = parts
    expected = controlled_unet_forward(module.unet, module.controlnet, **inputs)
    moved = ControlResiduals(copy.deepcopy(module.controlnet), offload, storage)
    down, mid = moved.fetch(residuals_of(moved, inputs), inputs["noisy_latents"].device, torch.float32)
    with torch.no_grad():
        pred = module.unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"],
                           down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip
    torch.testing.assert_close(pred, expected.detach(), rtol=0, atol=0)  # the same numbers, not just close
    if offload == "manual_swap":
        assert next(moved.controlnet.parameters()).device.type == "cpu"  # swapped back out after the call


def _swap_spy(residuals):
    """Per ControlNet call: whether its first conv ran on a swapped-in copy (not the host weights)."""
    conv = residuals.controlnet.conv_in
    host = residuals._host[(conv, "_parameters", "weight")]
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr() != host.data_ptr()))
    return conv, host, seen


def test_manual_swap_brings_the_weights_for_each_call_and_back_also_inside_a_pipeline(parts):
    """The swap is a hook on the ControlNet's forward: the training call and a diffusers pipeline's
    calls (validation, sampling) both run on a device copy; between calls the host copy is all there is."""
    from nemo_controlnet.inference.pipeline import controlnet_pipeline, sample

    module, inputs = parts
    swapped = ControlResiduals(copy.deepcopy(module.controlnet), "manual_swap", "gpu")
    swapped.place(torch.device("cpu"))
    conv, host, seen = _swap_spy(swapped)
    residuals_of(swapped, inputs)
    assert seen == [True] and conv.weight.data_ptr() == host.data_ptr()
    pipe = controlnet_pipeline(module.unet, swapped.controlnet, module.vae, module.text_encoder, module.tokenizer,
                               module.noise_scheduler.config)  # fmt: skip
    images = sample(pipe, ["a circle"], inputs["hint"][:1], num_inference_steps=2, guidance_scale=2.0)
    assert images.shape == (1, 64, 64, 3)
    assert seen == [True] * 3 and conv.weight.data_ptr() == host.data_ptr()  # two steps, one batched CFG call each
    reference = controlnet_pipeline(module.unet, module.controlnet, module.vae, module.text_encoder,
                                    module.tokenizer, module.noise_scheduler.config)  # fmt: skip
    expected = sample(reference, ["a circle"], inputs["hint"][:1], num_inference_steps=2, guidance_scale=2.0)
    assert (images == expected).all()  # the swapped ControlNet samples what the resident one does


def test_lora_and_lokr_train_only_the_adapter_and_start_as_the_base(parts):
    module, inputs = parts
    for kind in ("lora", "lokr"):
        unet = copy.deepcopy(module.unet).requires_grad_(False)
        with torch.no_grad():
            before = unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"]).sample
        base = {k: v.clone() for k, v in unet.state_dict().items()}
        trainable = add_adapter(unet, make_adapter_config(kind, 4, 4, TARGETS))
        names = [n for n, p in unet.named_parameters() if p.requires_grad]
        assert names and all(kind in n for n in names) and all(p.dtype == torch.float32 for p in trainable)
        out = unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"]).sample
        if kind == "lora":  # B starts at zero: the adapted UNet is the base until it trains
            torch.testing.assert_close(out, before)
        optimizer = torch.optim.SGD(trainable, lr=1.0)
        out.pow(2).mean().backward()
        optimizer.step()
        after = unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"]).sample
        assert not torch.allclose(after, before), kind
        for k, v in unet.state_dict().items():  # every base weight as it was
            key = k.replace(".base_layer", "")
            if key in base and "lora" not in k and "lokr" not in k:
                assert torch.equal(v, base[key]), k


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_saved_adapter_reloads_into_a_fresh_pipeline(parts, tmp_path, kind):
    """A LoRA in diffusers' format reloads through ``pipe.load_lora_weights`` itself; a LoKr (peft's
    format) through load_adapter, which controlnet-generate lora= uses for both."""
    from nemo_controlnet.inference.pipeline import controlnet_pipeline
    from nemo_controlnet.models.adapters import load_adapter

    module, inputs = parts
    unet = copy.deepcopy(module.unet).requires_grad_(False)
    add_adapter(unet, make_adapter_config(kind, 4, 8, TARGETS))
    for p in unet.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # as if trained
    save_lora(unet, tmp_path / "adapter", {"controlnet": "frozen"})

    def fresh_pipe():
        return controlnet_pipeline(copy.deepcopy(module.unet), None, module.vae, module.text_encoder,
                                   module.tokenizer, module.noise_scheduler.config)  # fmt: skip

    pipe = fresh_pipe()
    if kind == "lora":
        assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
        pipe.load_lora_weights(tmp_path / "adapter")
    else:
        assert load_adapter(pipe, tmp_path / "adapter") == "lokr"
    args = (inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*args).sample, unet(*args).sample)
        assert not torch.allclose(module.unet(*args).sample, unet(*args).sample)
    with pytest.raises(FileNotFoundError, match="lora=.*no pytorch_lora_weights.safetensors"):
        load_adapter(fresh_pipe(), tmp_path)


def test_impossible_combinations_are_refused_naming_the_key():
    check_adapter_options("accelerate", "gpu", cuda=False)
    check_adapter_options("manual_swap", "cpu_pinned", cuda=False, dev_mode=True)
    with pytest.raises(ValueError, match="residual_storage=cpu_pinned needs CUDA"):
        check_adapter_options("none", "cpu_pinned", cuda=False)
    with pytest.raises(ValueError, match="offload_strategy='disk'"):
        check_adapter_options("disk", "gpu", cuda=True)
    with pytest.raises(ValueError, match="adapter.type='dora'"):
        make_adapter_config("dora", 4, 4, TARGETS)


def _adapter_cfg(train_cfg, pretrained, *overrides):
    from omegaconf import OmegaConf

    cfg = train_cfg("+experiment=lora_frozen_controlnet", f"controlnet.name_or_path={pretrained}",
                    "adapter.rank=4", "adapter.alpha=4", *overrides)  # fmt: skip
    OmegaConf.resolve(cfg)
    return cfg


@pytest.mark.parametrize("controlnet_train", [False, True])
def test_optimizer_param_test(train_cfg, pretrained_controlnet, controlnet_train):
    """Optimizer groups: the adapter only; ControlNet parameters only with controlnet.train=true, at
    their own learning rate; the checkpoint says whether the ControlNet was fine-tuned."""
    cfg = _adapter_cfg(train_cfg, pretrained_controlnet, f"controlnet.train={str(controlnet_train).lower()}",
                       "controlnet.lr=3e-5", "adapter.lr=2e-4")  # fmt: skip
    module = ControlNetModule(cfg.model, cfg.optim, adapter_cfg=cfg.adapter, controlnet_cfg=cfg.controlnet)
    module.trainer = type("T", (), {"max_steps": 10})()
    groups = module.configure_optimizers()["optimizer"].param_groups
    adapter_ids = {id(p) for n, p in module.unet.named_parameters() if "lora_" in n}
    assert groups[0]["name"] == "lora_adapter" and {id(p) for p in groups[0]["params"]} == adapter_ids
    assert groups[0]["initial_lr"] == pytest.approx(2e-4)  # (lr itself starts at 0: warm-up)
    if controlnet_train:
        assert groups[1]["name"] == "controlnet" and groups[1]["initial_lr"] == pytest.approx(3e-5)
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.controlnet.parameters()}
    else:
        assert len(groups) == 1 and not any(p.requires_grad for p in module.controlnet.parameters())
        assert module.residuals is not None
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["nemo_controlnet"]["controlnet_finetuned"] is controlnet_train
    assert set(checkpoint["state_dict"]) == set(module.trainable_named_parameters())


@pytest.mark.parametrize("offload, storage", [("none", "gpu"), ("manual_swap", "cpu_pinned")])
def test_compute_control_residuals_gives_the_frozen_controlnets_detached_residuals(
    train_cfg, pretrained_controlnet, offload, storage
):
    """The module's compute_control_residuals(batch, noisy_latents, timesteps): one detached residual per
    UNet skip (plus the mid), equal to the ControlNet's own output for the batch's captions and hints."""
    cfg = _adapter_cfg(train_cfg, pretrained_controlnet, f"controlnet.offload_strategy={offload}",
                       f"controlnet.residual_storage={storage}", "controlnet.dev_mode=true")  # fmt: skip
    module = ControlNetModule(cfg.model, cfg.optim, adapter_cfg=cfg.adapter, controlnet_cfg=cfg.controlnet)
    module.residuals.place(torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    batch = {"caption": ["a red circle", "a blue circle"], "hint": torch.rand(2, 3, 64, 64, generator=g)}
    noisy, timesteps = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    down, mid = module.compute_control_residuals(batch, noisy, timesteps)
    states, _ = module.encode_prompts(batch["caption"])
    with torch.no_grad():
        ref_down, ref_mid = module.controlnet(noisy, timesteps, states, batch["hint"], return_dict=False)
    assert len(down) == len(ref_down) and all(not r.requires_grad for r in (*down, mid))
    for got, ref in zip((*down, mid), (*ref_down, ref_mid), strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    inputs = {"noisy_latents": noisy, "timesteps": timesteps, "encoder_hidden_states": states}
    assert [tuple(r.shape) for r in (*down, mid)] == _residual_shapes_of_the_unet(module.unet, inputs)


@pytest.mark.parametrize("offload", ["none", "accelerate", "manual_swap"])
def test_adapter_run_trains_the_lora_only_and_exports_it(train_cfg, pretrained_controlnet, tmp_path, offload):
    cfg = _adapter_cfg(train_cfg, pretrained_controlnet, f"controlnet.offload_strategy={offload}",
                       "trainer.max_steps=2", "validation.num_samples=1", "adapter.lr=1e-2")  # fmt: skip
    start = ControlNetModule(cfg.model, cfg.optim, adapter_cfg=cfg.adapter, controlnet_cfg=cfg.controlnet)
    before = {k: v.clone() for k, v in start.unet.state_dict().items()}
    cn_before = {k: v.clone() for k, v in start.controlnet.state_dict().items()}
    trainer, module = train(cfg)
    after = module.unet.state_dict()
    lora = [k for k in after if "lora_" in k]
    assert lora and any(not torch.equal(after[k], before[k]) for k in lora if "lora_B" in k)
    assert all(torch.equal(after[k], before[k]) for k in after if "lora_" not in k)  # the base is untouched
    cn_after = {k: v.cpu() for k, v in module.controlnet.state_dict().items()}
    assert all(torch.equal(cn_after[k], cn_before[k]) for k in cn_before)  # the ControlNet too
    out = tmp_path / "run" / "lora"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (tmp_path / "run" / "controlnet").exists()
    import json

    meta = json.loads((out / "nemo_controlnet.json").read_text())
    assert meta["controlnet"]["offload_strategy"] == offload and meta["controlnet"]["finetuned"] is False
    assert meta["controlnet"]["name_or_path"] == str(pretrained_controlnet)


def test_generation_with_the_frozen_controlnet_and_the_trained_lora(train_cfg, pretrained_controlnet, tmp_path):
    """controlnet-generate lora=<run>/lora: the adapter changes the images; guess_mode changes them too."""
    import numpy as np
    from hydra import compose, initialize_config_module
    from PIL import Image

    from nemo_controlnet.inference.generate import generate

    train(_adapter_cfg(train_cfg, pretrained_controlnet, "trainer.max_steps=2", "validation.num_samples=0",
                       "adapter.lr=5e-2"))  # fmt: skip
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[16:48, 30:34] = 255
    Image.fromarray(hint).save(tmp_path / "h.png")

    def images(name, *extra):
        with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
            overrides = [
                f"controlnet={pretrained_controlnet}",
                f"hints=[{tmp_path / 'h.png'}]",
                "prompts=[a circle]",
                "num_inference_steps=3",
                "device=cpu",
                "resolution=64",
                f"out_dir={tmp_path / name}",
            ]
            cfg = compose(config_name="generate", overrides=[*overrides, *extra])
        return np.asarray(Image.open(generate(cfg)[0])).astype(int)

    plain, adapted = images("plain"), images("lora", f"lora={tmp_path / 'run' / 'lora'}")
    guessed = images("guess", f"lora={tmp_path / 'run' / 'lora'}", "guess_mode=true")
    assert np.abs(plain - adapted).max() > 0 and np.abs(adapted - guessed).max() > 0
