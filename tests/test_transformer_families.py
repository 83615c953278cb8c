"""Each transformer family (SD3, Flux) end to end through the same commands as the SD UNets: train 4 steps,
export, reload through controlnet-generate, score with controlnet-eval."""

import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from nemo_controlnet.eval.evaluate import evaluate
from nemo_controlnet.inference.generate import generate, load_sampler
from nemo_controlnet.models.formats import read_metadata
from nemo_controlnet.training.run import train

FAMILIES = {"tiny_sd3": "SD3ControlNetModel", "tiny_flux": "FluxControlNetModel"}


def compose_in(config_name: str, overrides: list[str]):
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_train_export_generate_evaluate(model, train_cfg, shapes_dir, tmp_path):

    cfg = train_cfg(f"model={model}", "trainer.max_steps=4", "validation.num_samples=2", "optim.lr=1e-2")
    trainer, module = train(cfg)
    run = tmp_path / "run"
    assert trainer.global_step == 4
    assert (run / "samples" / "step_0000004.png").is_file()  # validation sampled through the family's pipeline
    controlnet_cls = getattr(diffusers, FAMILIES[model])
    assert type(controlnet_cls.from_pretrained(run / "controlnet")) is controlnet_cls
    assert read_metadata(run / "controlnet")["base_model"]["name"] == model
    assert f"from diffusers import {FAMILIES[model]}" in (run / "controlnet" / "README.md").read_text()
    assert not list(run.glob("control_*.safetensors"))  # no original single-file layout for these families

    # reload: the base rebuilt from the recorded config, checked by fingerprint, the ControlNet from its dir
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[16:48, 30:34] = 255
    Image.fromarray(hint).save(tmp_path / "h.png")
    common = [f"controlnet={run}", "device=cpu", "num_inference_steps=2"]
    gen_cfg = compose_in("generate", [*common, f"hints=[{tmp_path / 'h.png'}]", "prompts=[a bar]",
                                      f"out_dir={tmp_path / 'g'}"])  # fmt: skip
    loaded = load_sampler(gen_cfg)
    assert type(loaded.pipe.controlnet) is controlnet_cls and loaded.pipe.unet is loaded.pipe.transformer
    # diffusers' own pipeline class (not the recipe's subclass) samples with the exported ControlNet
    plain_cls = next(c for c in type(loaded.pipe).__mro__ if c.__module__.startswith("diffusers."))
    plain = plain_cls(**loaded.pipe.components)
    out = plain("a bar", control_image=torch.rand(1, 3, 64, 64), height=64, width=64, num_inference_steps=2,
                max_sequence_length=16, output_type="np").images  # fmt: skip
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    written = generate(gen_cfg)
    assert [p.name for p in written] == ["00000.png"]
    assert Image.open(written[0]).size == (64, 64)

    eval_args = [*common, f"shards={shapes_dir / 'val'}", "num_samples=2", "batch_size=2", "guidance_scale=1.0"]
    report = evaluate(compose_in("eval", [*eval_args, f"out_dir={tmp_path / 'e1'}"]))
    assert set(report["results"]) == {"controlled", "uncontrolled"} and report["num_samples"] == 2
    assert {"edge_f1", "ssim", "iou"} <= set(report["results"]["controlled"])
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["results"] == report["results"]

    # A ControlNet with strong residuals over the same base: the baseline (scale 0) stays, control moves.
    other = tmp_path / "other"
    shutil.copytree(run / "controlnet", other)
    net = controlnet_cls.from_pretrained(other)
    for name, p in net.named_parameters():
        if "controlnet_" in name and "blocks" in name:
            p.data.normal_(0, 0.5)
    net.save_pretrained(other)
    (other / "SHA256SUMS").unlink()  # changed on purpose: the export's checksums no longer apply
    report2 = evaluate(compose_in("eval", [*eval_args, f"controlnet={other}", f"out_dir={tmp_path / 'e2'}"]))
    assert report2["results"]["uncontrolled"] == report["results"]["uncontrolled"]
    assert report2["results"]["controlled"] != report["results"]["controlled"]


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_activation_checkpointing_reaches_every_block_and_leaves_the_gradients(model):
    """perf.gradient_checkpointing (controlnet, unet_decoder) switches on the transformer's and the
    ControlNet's own per-block checkpointing; the loss and the ControlNet's gradients are unchanged."""

    from nemo_controlnet.training.module import ControlNetModule
    from nemo_controlnet.training.perf import apply_performance, compile_blocks
    from tests.conftest import compose_train

    cfg = compose_train([f"model={model}", "model.proportion_empty_prompts=0"])
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "hint": torch.rand(2, 3, 64, 64), "caption": ["a", "b"]}

    def step(checkpointed: bool):
        module = ControlNetModule(cfg.model, cfg.optim)
        for block in module.controlnet.controlnet_blocks:  # away from zero: gradients reach the ControlNet body
            torch.nn.init.normal_(block.weight, std=0.1)
        if checkpointed:
            perf = {"gradient_checkpointing": {"controlnet": True, "unet_decoder": True}, "channels_last": False}
            applied = apply_performance(module, perf, "cpu")
            assert applied["checkpointed_controlnet_blocks"] >= 1
            assert applied["checkpointed_unet_decoder_blocks"] >= 1
            assert module.unet.gradient_checkpointing and module.controlnet.gradient_checkpointing
        torch.manual_seed(0)
        loss = module.diffusion_loss(dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in module.controlnet.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = step(False)
    ckpt_loss, ckpt_grads = step(True)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain_grads.keys() == ckpt_grads.keys() and any("transformer_blocks" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)

    # perf.compile finds the transformer's blocks (regional compile), as it finds a UNet's
    module = ControlNetModule(cfg.model, cfg.optim)
    blocks = len(module.unet.transformer_blocks) + len(getattr(module.unet, "single_transformer_blocks", []))
    assert compile_blocks(module.unet, backend="eager") == blocks


@pytest.mark.parametrize("model", sorted(FAMILIES))
@pytest.mark.parametrize("overrides,words", [
    (["+experiment=control_lora"], r"training_mode=control_lora: not available for the (sd3|flux) family"),
    (["+experiment=lora_frozen_controlnet", "controlnet.name_or_path=/nonexistent", "controlnet_reroute=precompute"],
     r"controlnet_reroute=precompute: the residual store holds SD UNet residuals, not the (sd3|flux) family's"),
])  # fmt: skip
def test_sd_unet_only_options_are_refused_by_name_before_the_base_loads(model, overrides, words):
    """Control-LoRA copies a UNet's encoder and the residual store holds UNet (down, mid) residuals: a transformer
    family says so up front, not at export (Control-LoRA) or in the first step."""
    from nemo_controlnet.training.module import ControlNetModule
    from nemo_controlnet.training.run import research_options
    from tests.conftest import compose_train

    cfg = compose_train([f"model={model}", *overrides])
    OmegaConf.resolve(cfg)
    with pytest.raises(ValueError, match=words):
        ControlNetModule(cfg.model, cfg.optim, adapter_cfg=cfg.get("adapter"), controlnet_cfg=cfg.get("controlnet"),
                         mode=cfg.get("training_mode"), research=research_options(cfg))  # fmt: skip


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_adapter_mode_trains_a_transformer_lora_under_the_frozen_controlnet(model, train_cfg, tmp_path):
    """+experiment=lora_frozen_controlnet over a transformer base: the ControlNet (a previous run's export) stays
    as it was, the LoRA on the transformer trains and is written in diffusers' LoRA format for the family's
    pipeline, and controlnet-generate lora= loads it and samples differently than without it."""
    import shutil

    train(train_cfg(f"model={model}", "trainer.max_steps=1", "validation.num_samples=0"))
    shutil.move(tmp_path / "run", tmp_path / "controlnet_run")
    controlnet_dir = tmp_path / "controlnet_run" / "controlnet"
    trainer, module = train(train_cfg(f"model={model}", "+experiment=lora_frozen_controlnet",
                                      f"controlnet.name_or_path={controlnet_dir}", "adapter.lr=1e-2",
                                      "trainer.max_steps=2", "validation.num_samples=1"))  # fmt: skip
    assert trainer.global_step == 2 and module.residuals is not None  # frozen: residuals apart, detached
    frozen = getattr(diffusers, FAMILIES[model]).from_pretrained(controlnet_dir)
    for key, value in frozen.state_dict().items():
        assert torch.equal(module.controlnet.state_dict()[key].to(value.dtype), value), key
    lora = tmp_path / "run" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    from safetensors.torch import load_file

    weights = load_file(lora / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)  # the family pipeline's naming
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained (B starts at zero)

    hint = np.zeros((64, 64, 3), np.uint8)
    hint[20:44, 20:44] = 255
    Image.fromarray(hint).save(tmp_path / "h.png")
    common = [f"controlnet={controlnet_dir}", "device=cpu", "num_inference_steps=2", f"hints=[{tmp_path / 'h.png'}]"]
    plain = generate(compose_in("generate", [*common, f"out_dir={tmp_path / 'g0'}"]))
    adapted = generate(compose_in("generate", [*common, f"lora={lora}", f"out_dir={tmp_path / 'g1'}"]))
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(adapted[0])))
