"""Interop: exports that diffusers' own readers load to the same outputs; safe loading."""

import pickle

import pytest
import torch
from diffusers import ControlNetModel
from hydra.utils import instantiate
from safetensors import safe_open

from nemo_controlnet.models.formats import (
    export_controlnet,
    export_original_controlnet,
    load_original_controlnet,
    load_state_dict_file,
)
from tests.conftest import compose_train


def _controlnet(model: str, device: str = "cpu") -> ControlNetModel:
    cfg = compose_train([f"model={model}"])
    torch.manual_seed(0)
    unet = instantiate(cfg.model.unet_config)
    controlnet = ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(cfg.model.control_stage_config.conditioning_embedding_out_channels),
    )
    with torch.no_grad():  # trained-looking weights: the zero convolutions must not hide a wrong mapping
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return controlnet.eval()


def _outputs(controlnet: ControlNetModel, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = controlnet.config
    latents = torch.randn(1, c.in_channels, size, size, generator=g)
    ehs = torch.randn(1, 8, c.cross_attention_dim, generator=g)
    hint = torch.rand(1, c.conditioning_channels, size * 8, size * 8, generator=g)
    with torch.no_grad():
        down, mid = controlnet(latents, torch.tensor([321]), ehs, controlnet_cond=hint, return_dict=False)
    return [*down, mid]


@pytest.mark.parametrize("model,size", [("tiny", 8), ("sd15", 8)])
def test_original_format_export_loads_in_diffusers_with_the_same_outputs(model, size, tmp_path):
    controlnet = _controlnet(model)
    path = export_original_controlnet(controlnet, tmp_path / "control_test.safetensors", dtype="fp32")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert all(k.startswith("control_model.") for k in keys) and len(keys) == len(controlnet.state_dict())
    assert {"control_model.input_hint_block.14.weight", "control_model.middle_block_out.0.weight",
            "control_model.zero_convs.0.0.weight", "control_model.time_embed.0.weight"} <= keys  # fmt: skip
    controlnet.save_config(tmp_path / "config")  # the config diffusers' reader needs, as shipped with exports
    loaded = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)
    for key, value in controlnet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Equal weights; outputs equal up to float32 rounding (kernels may differ with memory layout).
    expected = _outputs(controlnet, size)
    for a, b in zip(expected, _outputs(loaded, size), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
    # The diffusers-format export (what training writes) loads through from_pretrained alike.
    export_controlnet(controlnet, tmp_path / "diffusers", {"global_step": 1})
    from_dir = ControlNetModel.from_pretrained(tmp_path / "diffusers")
    for key, value in controlnet.state_dict().items():
        assert torch.equal(from_dir.state_dict()[key], value), key
    for a, b in zip(expected, _outputs(from_dir, size), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
    # And our own importer of original-format files gives the same model back.
    again = load_original_controlnet(path, dict(controlnet.config))
    for a, b in zip(expected, _outputs(again, size), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_half_precision_export_is_close(tmp_path):
    controlnet = _controlnet("tiny")
    path = export_original_controlnet(controlnet, tmp_path / "c.safetensors", dtype="fp16")
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded = load_original_controlnet(path, dict(controlnet.config)).float()
    for a, b in zip(_outputs(controlnet, 8), _outputs(loaded, 8), strict=True):
        assert torch.allclose(a, b, atol=2e-3, rtol=1e-2)
    with pytest.raises(ValueError, match="dtype='int8'"):
        export_original_controlnet(controlnet, tmp_path / "x.safetensors", dtype="int8")


def test_a_hint_encoder_the_original_format_cannot_hold_is_refused(tmp_path):
    cfg = compose_train()
    unet = instantiate(cfg.model.unet_config)
    odd = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 32))
    with pytest.raises(ValueError, match="4 conditioning_embedding_out_channels.*2 blocks"):
        export_original_controlnet(odd, tmp_path / "x.safetensors")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_pickled_checkpoints_that_would_run_code_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = {"state_dict": {"w": torch.ones(2)}}
    torch.save(good, tmp_path / "good.ckpt")
    assert torch.equal(load_state_dict_file(tmp_path / "good.ckpt")["w"], torch.ones(2))
    torch.save({"state_dict": _Exploit()}, tmp_path / "evil.ckpt")  # zip format, as torch writes today
    with open(tmp_path / "evil_legacy.pth", "wb") as f:  # plain pickle, as old checkpoints are
        pickle.dump({"state_dict": _Exploit()}, f)
    for name in ("evil.ckpt", "evil_legacy.pth"):
        with pytest.raises(pickle.UnpicklingError):
            load_state_dict_file(tmp_path / name)
        assert not (tmp_path / "pwned").exists()
