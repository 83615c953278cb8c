"""Control-LoRA (adapter.type=control_lora): a ControlNet whose encoder is the locked UNet's, frozen, plus
a LoRA; the hint embedding and zero convs train in full. What trains, what a checkpoint holds, the two
exports (control_lora/ and the merged controlnet/), loading over the base, and refusing another base."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file

from nemo_controlnet.models.control_lora import (
    CONFIG,
    WEIGHTS,
    counts,
    is_full_part,
    load_control_lora,
    merge_control_lora,
)
from nemo_controlnet.models.stack import build_stack
from nemo_controlnet.training.modes import make_mode
from nemo_controlnet.training.modes.control_lora import ControlLoraMode
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.run import export_checkpoint, train
from tests.conftest import compose_train


def _module(cfg, **kwargs) -> ControlNetModule:
    return ControlNetModule(cfg.model, cfg.optim, adapter_cfg=cfg.get("adapter"), controlnet_cfg=cfg.get("controlnet"),
                            mode=cfg.get("training_mode"), **kwargs)  # fmt: skip


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
            "controlnet_cond": torch.rand(2, 3, 64, 64, generator=g)}  # fmt: skip


@torch.no_grad()
def _residuals(controlnet, inputs=None) -> list[torch.Tensor]:
    down, mid = controlnet(**(inputs or _inputs()), return_dict=False)
    return [r.float() for r in (*down, mid)]


def _assert_same(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def _perturb(controlnet, seed=0, lora_b=False):
    """Non-zero zero convs (and LoRA B): residuals, and a merge, that mean something."""
    g = torch.Generator().manual_seed(seed)
    for name, p in controlnet.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")) or (lora_b and "lora_B" in name):
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.1


@pytest.fixture
def cl_cfg(train_cfg):
    def make(*overrides):
        return train_cfg("+experiment=control_lora", *overrides)

    return make


def test_mode_groups_dtypes_and_start_as_the_plain_copy(cl_cfg):
    cfg = cl_cfg()
    module = _module(cfg)
    assert isinstance(module.training_mode, ControlLoraMode) and module.training_mode.name == "control_lora"
    net = module.controlnet
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in net.named_parameters() if "lora_" in n or is_full_part(n)}
    assert any(".conv1.lora_A" in n for n in trainable) and any(".to_q.lora_B" in n for n in trainable)
    assert not any(n.startswith("controlnet_cond_embedding") and "lora_" in n for n in trainable)  # trains in full
    groups = module.training_mode.param_groups(module, cfg.optim)
    assert [(g["name"], g["role"]) for g in groups] == [("control_lora_adapter", "adapter"),
                                                        ("controlnet", "controlnet")]  # fmt: skip
    assert groups[0]["lr"] == pytest.approx(float(cfg.adapter.lr))
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in module.trainable_named_parameters().values())  # each once
    for part in (module.unet, module.vae, module.text_encoder):
        assert part in module.locked_modules() and not any(p.requires_grad for p in part.parameters())
    n = counts(net)
    assert n["trainable"] == sum(p.numel() for p in module.trainable_named_parameters().values())
    assert n["trainable"] < 0.15 * n["full_controlnet"]
    assert module.training_mode.checkpoint_meta(module)["adapter"] == "control_lora"

    # LoRA B = 0: the same residuals as diffusers' plain copy of the UNet's encoder (zero convs made non-zero)
    _perturb(net)
    reference = ControlNetModel.from_unet(module.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    for name in ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block"):
        getattr(reference, name).load_state_dict(getattr(net, name).state_dict())  # the parts that train in full
    _assert_same(_residuals(net), _residuals(reference), atol=0)


def test_locked_dtype_keeps_the_copy_frozen_and_the_lora_in_fp32(cl_cfg):
    module = _module(cl_cfg(), precision="bf16-mixed")
    net = module.controlnet
    assert {p.dtype for n, p in net.named_parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for n, p in net.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    _perturb(net, lora_b=True)
    inputs = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        down, mid = net(**inputs, return_dict=False)
        loss = sum(r.float().pow(2).mean() for r in (*down, mid))
    loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if p.requires_grad)
    merged = merge_control_lora(net)  # fp32, the bf16 copy's values + the delta
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _residuals(net, inputs)
    _assert_same(_residuals(merged, inputs), ours, atol=0.1)


def test_merge_equals_the_lora_model(cl_cfg, tmp_path):
    """merge_control_lora: a plain ControlNetModel with peft's delta in its weights, same residuals; saved and
    reloaded over the base unet by load_control_lora, the same again."""
    from nemo_controlnet.models.control_lora import save_control_lora

    cfg = cl_cfg()
    module = _module(cfg)
    _perturb(module.controlnet, lora_b=True)
    merged = merge_control_lora(module.controlnet)
    assert type(merged) is ControlNetModel and not any("lora" in n for n, _ in merged.named_parameters())
    ours = _residuals(module.controlnet)
    _assert_same(_residuals(merged), ours)
    assert max(r.abs().max() for r in ours) > 0.01
    file = save_control_lora(module.controlnet, tmp_path / "cl", module.training_mode.file_config(module))
    loaded = load_control_lora(build_stack(cfg.model).unet, file)
    _assert_same(_residuals(loaded), ours)
    bf16_base = build_stack(cfg.model).unet.to(torch.bfloat16)  # the same base in another dtype: accepted
    _assert_same(_residuals(load_control_lora(bf16_base, tmp_path / "cl")), ours, atol=0.05)


def test_a_step_trains_only_the_lora_hint_embedding_and_zero_convs(cl_cfg):
    cfg = cl_cfg("adapter.lr=1e-2", "optim.lr=1e-2")
    module = _module(cfg)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = torch.optim.AdamW(module.training_mode.param_groups(module, cfg.optim))
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "hint": torch.rand(2, 3, 64, 64, generator=g),
             "caption": ["a red circle", "a blue square"]}  # fmt: skip
    module.train()
    for _ in range(2):  # the first step moves the zero convs only (their zeros block the LoRA's gradient)
        optimizer.zero_grad()
        module.diffusion_loss(batch, drop_captions=False).backward()
        optimizer.step()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= set(module.trainable_named_parameters())
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= {f"{k}" for k in module.trainable_named_parameters()}  # the base copy, UNet, VAE: unchanged
    assert any("lora_B" in k for k in changed) and any("controlnet_cond_embedding" in k for k in changed)
    assert any("controlnet_down_blocks" in k for k in changed) and any("controlnet_mid_block" in k for k in changed)


def test_run_checkpoints_resumes_and_exports_both(cl_cfg, tmp_path):
    run = tmp_path / "run"
    cfg = cl_cfg("trainer.max_steps=2", "validation.num_samples=0", "adapter.lr=1e-2", "optim.lr=1e-2",
                 "optim.warmup_steps=0")  # fmt: skip
    train(cfg)
    ckpt = torch.load(run / "checkpoints" / "step=0000002.ckpt", weights_only=True)
    meta = ckpt["nemo_controlnet"]
    assert meta["mode"] == "control_lora" and meta["adapter"] == "control_lora" and meta["control_lora"]["rank"] == 3
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith("controlnet.") for k in keys)
    assert all("lora_" in k or is_full_part(k[len("controlnet.") :]) for k in keys)  # nothing of the base
    assert not any(".base_layer." in k for k in keys)

    trainer, module = train(cl_cfg("trainer.max_steps=4", "validation.num_samples=0", "adapter.lr=1e-2",
                                   "optim.lr=1e-2", "optim.warmup_steps=0"))  # fmt: skip
    assert trainer.global_step == 4  # resumed from step 2
    assert set(module.trainable_named_parameters()) == keys

    small, full = run / "control_lora" / WEIGHTS, run / "controlnet" / "diffusion_pytorch_model.safetensors"
    assert small.is_file() and full.is_file() and (run / "control_lora" / "SHA256SUMS").is_file()
    assert small.stat().st_size < 0.2 * full.stat().st_size
    record = json.loads((run / "control_lora" / CONFIG).read_text())
    assert record["rank"] == 3 and record["target_modules"][0] == "to_q"
    assert record["base_fingerprint"] == module.base_fingerprint and record["run"]["global_step"] == 4
    net = module.controlnet
    assert any(p.abs().sum() > 0 for n, p in net.named_parameters() if "lora_B" in n)  # the LoRA trained

    exported = ControlNetModel.from_pretrained(run / "controlnet", local_files_only=True)
    ours = _residuals(net)
    _assert_same(_residuals(exported), ours)
    _assert_same(_residuals(load_control_lora(build_stack(cfg.model).unet, run / "control_lora")), _residuals(exported),
                 atol=1e-6)  # fmt: skip

    # controlnet-export: the newest checkpoint exported again, the same tensors
    trained = load_file(small)
    export_checkpoint(run, original=False)
    again = load_file(small)
    assert set(again) == set(trained) and all(torch.equal(again[k], trained[k]) for k in trained)


def test_a_mismatched_base_is_refused_naming_the_file(cl_cfg, tmp_path):
    from nemo_controlnet.models.control_lora import save_control_lora

    cfg = cl_cfg()
    module = _module(cfg)
    file = save_control_lora(module.controlnet, tmp_path / "cl", module.training_mode.file_config(module))
    other = build_stack(cl_cfg("model.seed=5").model).unet  # the same architecture, other weights
    with pytest.raises(ValueError, match=f"{file}: this Control-LoRA was trained over base UNet"):
        load_control_lora(other, file)
    load_control_lora(other, file, allow_other_base=True)  # on request: a warning instead
    wider = build_stack(cl_cfg("model.unet_config.block_out_channels=[32,32]").model).unet
    with pytest.raises(ValueError, match=f"{file}: this Control-LoRA was trained over another UNet architecture"):
        load_control_lora(wider, tmp_path / "cl")


def test_bad_configs_are_refused_naming_the_key(cl_cfg):
    from nemo_controlnet.models.adapters import check_adapter_run

    with pytest.raises(ValueError, match="keep model.sd_locked=true"):
        check_adapter_run(cl_cfg("model.sd_locked=false"), cuda=False)
    with pytest.raises(ValueError, match="keep model.sd_locked=true"):
        _module(cl_cfg("model.sd_locked=false"))
    with pytest.raises(ValueError, match="adapter.rank=0"):
        check_adapter_run(cl_cfg("adapter.rank=0"), cuda=False)
    with pytest.raises(ValueError, match="matched no Linear/Conv2d layer"):
        _module(cl_cfg("adapter.target_modules=[nothing_here]"))
    check_adapter_run(cl_cfg(), cuda=False)  # no controlnet.name_or_path needed
    cfg = compose_train(["+experiment=control_lora"])
    assert isinstance(make_mode(None, cfg.model, cfg.adapter), ControlLoraMode)  # inferred from adapter.type
    with pytest.raises(ValueError, match="needs the adapter block with adapter.type=control_lora"):
        make_mode("control_lora", cfg.model)


def test_controlnet_train_cli_exports_both_and_generate_reads_the_merged_one(shapes_dir, tmp_path):
    import numpy as np
    from hydra import compose, initialize_config_module
    from PIL import Image

    from nemo_controlnet.inference.generate import generate

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_controlnet.cli.train", "+experiment=control_lora", "trainer.max_steps=2",
         f"run_dir={run}", f"data.shards={shapes_dir / 'train'}", f"data.validation_shards={shapes_dir / 'val'}",
         "data.synthetic=null", "data.batch_size=2", "data.num_workers=0", "validation.num_samples=1",
         "validation.num_inference_steps=2", "trainer.enable_progress_bar=false", "logger=csv"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "control_lora" / WEIGHTS).is_file() and (run / "controlnet" / "config.json").is_file()
    log = (run / "train.log").read_text()
    assert "mode control_lora" in log and "of the full ControlNet's" in log
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(tmp_path / "h.png")
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        gen = compose(config_name="generate", overrides=[f"controlnet={run}", f"hints=[{tmp_path / 'h.png'}]",
                      "prompts=[a circle]", "num_inference_steps=2", "device=cpu", "resolution=64",
                      f"out_dir={tmp_path / 'gen'}"])  # fmt: skip
    assert Image.open(generate(gen)[0]).size == (64, 64)
