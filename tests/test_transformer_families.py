"""Each transformer family (SD3, Flux) end to end through the same commands as the SD UNets: train 4 steps,
export, reload through controlnet-generate, score with controlnet-eval."""

import json
import shutil

import numpy as np
import pytest
from hydra import compose, initialize_config_module
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
    import diffusers

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
    import torch

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
