"""Interop: exports that diffusers' own readers load to the same outputs; safe loading."""

import pickle

import pytest
import torch
from diffusers import ControlNetModel
from hydra.utils import instantiate
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_controlnet.models.controlnet import build_controlnet
from nemo_controlnet.models.formats import (
    export_controlnet,
    export_original_controlnet,
    load_original_controlnet,
    load_state_dict_file,
    original_controlnet_shapes,
)
from nemo_controlnet.models.stack import build_stack
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
    added = None
    if c.addition_embed_type == "text_time":  # SDXL: pooled text, then (original size, crop top-left, target size)
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=g),
                 "time_ids": torch.tensor([[size * 8.0, size * 8.0, 0.0, 0.0, size * 8.0, size * 8.0]])}  # fmt: skip
    with torch.no_grad():
        down, mid = controlnet(
            latents, torch.tensor([321]), ehs, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False
        )
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


def test_sdxl_original_format_export_round_trips_through_our_loader(tmp_path):
    controlnet = _controlnet("tiny_sdxl")
    assert controlnet.config.addition_embed_type == "text_time"
    path = export_original_controlnet(controlnet, tmp_path / "control_sdxl.safetensors", dtype="fp32")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert {f"control_model.label_emb.0.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias")} <= keys
    assert len(keys) == len(controlnet.state_dict())
    export_controlnet(controlnet, tmp_path / "diffusers", {"global_step": 1})
    loaded = load_original_controlnet(path, dict(controlnet.config))
    from_dir = ControlNetModel.from_pretrained(tmp_path / "diffusers")
    for other in (loaded, from_dir):
        assert other.state_dict().keys() == controlnet.state_dict().keys()
        for key, value in controlnet.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key
    expected = _outputs(controlnet, 8)
    assert expected[-1].abs().max() > 0 and all(d.abs().max() > 0 for d in expected[:-1])  # not zero convs
    for other in (loaded, from_dir):  # equal weights, same contiguous layout: the same outputs, bit for bit
        for a, b in zip(expected, _outputs(other, 8), strict=True):
            assert torch.equal(b, a)
    # A file written by another tool without the prefix (bare ldm keys) loads the same.
    bare = {k.removeprefix("control_model."): v for k, v in load_state_dict_file(path).items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    from_bare = load_original_controlnet(tmp_path / "bare.safetensors", dict(controlnet.config))
    for a, b in zip(expected, _outputs(from_bare, 8), strict=True):
        assert torch.equal(b, a)


def test_sdxl_original_format_file_passes_the_compatibility_check_and_continues_training(tmp_path):
    stack = build_stack(compose_train(["model=tiny_sdxl"]).model)
    source = build_controlnet(stack.unet, 3, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = export_original_controlnet(source, tmp_path / "control_sdxl.safetensors", dtype="fp32")
    # SDXL's first down block has no attention: the cross-attention width comes from the next one.
    assert original_controlnet_shapes(path) == {
        "hint_channels": 3, "in_channels": 4, "model_channels": 32, "cross_attention_dim": 80,
        "projection_class_embeddings_input_dim": 80, "hint_width_0": 8, "hint_width_1": 16, "hint_width_2": 16,
        "hint_width_3": 32,
    }  # fmt: skip
    torch.save(load_state_dict_file(path), tmp_path / "control_sdxl.pth")  # the pickled layout reads alike
    assert original_controlnet_shapes(tmp_path / "control_sdxl.pth") == original_controlnet_shapes(path)
    loaded = build_controlnet(stack.unet, 3, pretrained=str(path))
    assert list(loaded.config.conditioning_embedding_out_channels) == [8, 16, 16, 32]
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    sd = build_stack(compose_train().model)  # an SD base (cross-attention 32) is refused before loading
    with pytest.raises(ValueError, match=r"cross_attention_dim=80 does not match the base UNet cross_attention_dim=32"):
        build_controlnet(sd.unet, 3, pretrained=str(path))


@pytest.mark.parametrize(
    "drop,extra,match",
    [
        ("control_model.label_emb.0.2.weight", None, r"missing.*control_model\.label_emb\.0\.2\.weight"),
        ("control_model.zero_convs.3.0.bias", None, r"missing.*control_model\.zero_convs\.3\.0\.bias"),
        (None, "control_model.label_emb.0.4.weight", r"unexpected.*control_model\.label_emb\.0\.4\.weight"),
        (None, "control_model.input_blocks.1.0.extra.weight", r"unexpected.*input_blocks\.1\.0\.extra\.weight"),
    ],
)
def test_an_sdxl_original_file_with_a_missing_or_unexpected_tensor_is_refused(tmp_path, drop, extra, match):
    controlnet = _controlnet("tiny_sdxl")
    path = export_original_controlnet(controlnet, tmp_path / "control_sdxl.safetensors", dtype="fp32")
    state = load_state_dict_file(path)
    if drop:
        del state[drop]
    if extra:
        state[extra] = torch.zeros(2)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=match):
        load_original_controlnet(tmp_path / "broken.safetensors", dict(controlnet.config))


def test_an_sdxl_file_is_refused_by_an_sd_config(tmp_path):
    path = export_original_controlnet(_controlnet("tiny_sdxl"), tmp_path / "control_sdxl.safetensors", dtype="fp32")
    with pytest.raises(ValueError, match=r"unexpected.*control_model\.label_emb\.0\.0\.weight"):
        load_original_controlnet(path, dict(_controlnet("tiny").config))


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
