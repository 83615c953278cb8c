"""Speed switches change speed and memory, never the maths; the throughput figures are computed."""

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.perf import apply_performance
from nemo_controlnet.training.run import train
from tests.conftest import compose_train

BATCH = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "hint": torch.rand(2, 3, 64, 64), "caption": ["a", "b"]}


def _loss_and_grads(module: ControlNetModule, seed: int = 0):
    torch.manual_seed(seed)
    loss = module.diffusion_loss(dict(BATCH))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _module(*overrides: str) -> ControlNetModule:
    cfg = compose_train(["model.sd_locked=false", "model.proportion_empty_prompts=0.0", *overrides])
    return ControlNetModule(cfg.model, cfg.optim)


@pytest.mark.parametrize(
    "perf",
    [
        {"gradient_checkpointing": {"controlnet": True, "unet_decoder": True}},
        {"channels_last": True},
        {"compile": True, "compile_backend": "eager"},
    ],
)
def test_speed_switches_keep_loss_and_gradients(perf):
    reference = _module()
    expected_loss, expected_grads = _loss_and_grads(reference)
    module = _module()
    applied = apply_performance(module, OmegaConf.create(perf), "cpu")
    loss, grads = _loss_and_grads(module)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if "gradient_checkpointing" in perf:
        assert applied["checkpointed_controlnet_blocks"] > 0 and applied["checkpointed_unet_decoder_blocks"] > 0
        assert all(b.gradient_checkpointing for b in module.unet.up_blocks)
        assert not any(b.gradient_checkpointing for b in module.unet.down_blocks)  # the encoder needs no grad
    if "channels_last" in perf:
        conv = module.controlnet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_auto_switches_stay_off_on_cpu():
    module = _module()
    assert apply_performance(module, OmegaConf.create({"channels_last": "auto", "tf32": True}), "cpu") == {}
    assert not module.channels_last


def test_ranks_draw_different_noise_and_rank_zero_keeps_its_stream():
    module = _module()
    module._trainer = SimpleNamespace(global_rank=1, global_step=3)
    module.seed = 11
    module.on_train_start()
    assert torch.initial_seed() == 11 + 7919 + 3
    module._trainer = SimpleNamespace(global_rank=0, global_step=3)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    module.on_train_start()
    assert torch.equal(torch.get_rng_state(), state)


def test_throughput_and_mfu_are_logged(train_cfg):
    cfg = train_cfg(
        "trainer.max_steps=6", "perf.warmup_steps=1", "perf.peak_tflops=0.001", "validation.num_samples=0",
        "optim.scale_lr=true",
    )  # fmt: skip
    trainer, module = train(cfg)
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(cfg.optim.lr * 4)  # batch 4
    rows = list(csv.DictReader(open(next(Path(cfg.run_dir).glob("logs/version_*/metrics.csv")))))
    logged = [r for r in rows if r.get("perf/samples_per_s")]
    assert logged, "no throughput row"
    last = logged[-1]
    assert float(last["perf/samples_per_s"]) > 0 and 0 <= float(last["perf/data_wait_fraction"]) < 1
    tflops = float(last["perf/tflops_per_device"])
    assert tflops > 0 and float(last["perf/mfu"]) == pytest.approx(tflops / 0.001)
    flops = next(cb for cb in trainer.callbacks if type(cb).__name__ == "Throughput").flops_per_sample
    assert flops > 1e6  # forward + backward of the tiny UNet, ControlNet, VAE encoder and text encoder


def test_locked_unet_encoder_keeps_no_activations_for_backward():
    """The residuals enter at the skips and the middle, so only the decoder needs a graph: the
    locked encoder runs without autograd and saves nothing for backward."""
    module = _module("model.sd_locked=true")
    saved = {"bytes": 0}
    grad_in_encoder = []

    def pack(t):
        saved["bytes"] += t.numel() * t.element_size()
        return t

    for block in module.unet.down_blocks:
        block.register_forward_hook(lambda m, i, o: grad_in_encoder.append(o[0].requires_grad))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(0)
        module.diffusion_loss(dict(BATCH))
    ours = saved["bytes"]
    assert grad_in_encoder and not any(grad_in_encoder)  # no graph through the locked encoder

    # Against the same step with a graph through the encoder: what not keeping it saves.
    saved["bytes"] = 0
    original = module.unet.conv_in.forward
    module.unet.conv_in.forward = lambda x: original(x.detach().requires_grad_(True))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(0)
        module.diffusion_loss(dict(BATCH))
    assert any(grad_in_encoder[-len(module.unet.down_blocks) :])
    assert ours < saved["bytes"]
