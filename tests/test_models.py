"""The ControlNet over the locked UNet: the copy, the zero convolutions, residual injection, options."""

import pytest
import torch
from diffusers import ControlNetModel
from hydra.utils import instantiate

from nemo_controlnet.config import ConfigError

from nemo_controlnet.models.controlnet import build_controlnet, controlled_unet_forward, set_only_mid_control
from nemo_controlnet.models.formats import export_original_controlnet
from nemo_controlnet.models.stack import build_stack, byte_level_clip_tokenizer, fingerprint
from tests.conftest import compose_train


@pytest.fixture(scope="module")
def parts():
    cfg = compose_train()
    stack = build_stack(cfg.model)
    controlnet = instantiate(cfg.model.control_stage_config, unet=stack.unet, hint_channels=3)
    return cfg, stack, controlnet


def _inputs(stack, hint_channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500])
    ehs = torch.randn(2, 77, stack.unet.config.cross_attention_dim, generator=g)
    hint = torch.rand(2, hint_channels, 64, 64, generator=g)
    return latents, timesteps, ehs, hint


def _perturb_zero_convs(controlnet, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
            controlnet.controlnet_cond_embedding.conv_out,
        ]:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_controlnet_copies_unet_encoder_and_middle(parts):
    _, stack, controlnet = parts
    unet_sd, cn_sd = stack.unet.state_dict(), controlnet.state_dict()
    shared = [k for k in cn_sd if k in unet_sd]
    prefixes = {k.split(".")[0] for k in shared}
    assert {"conv_in", "time_embedding", "down_blocks", "mid_block"} <= prefixes
    assert len(shared) > 50
    for key in shared:
        assert torch.equal(cn_sd[key], unet_sd[key]), key


def test_zero_convolutions_are_zero_at_init(parts):
    _, _, controlnet = parts
    zero = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    for module in zero:
        for p in module.parameters():
            assert torch.count_nonzero(p) == 0


def test_untrained_controlnet_leaves_unet_output_unchanged(parts):
    _, stack, controlnet = parts
    latents, t, ehs, hint = _inputs(stack)
    with torch.no_grad():
        plain = stack.unet(latents, t, encoder_hidden_states=ehs).sample
        controlled = controlled_unet_forward(stack.unet, controlnet, latents, t, ehs, hint)
    assert torch.equal(plain, controlled)  # zero convolutions: exactly the base, not nearly


def test_trained_controlnet_residuals_reach_the_unet_and_scale(parts):
    cfg, stack, _ = parts
    controlnet = instantiate(cfg.model.control_stage_config, unet=stack.unet, hint_channels=3)
    _perturb_zero_convs(controlnet)
    latents, t, ehs, hint = _inputs(stack)
    with torch.no_grad():
        plain = stack.unet(latents, t, encoder_hidden_states=ehs).sample
        controlled = controlled_unet_forward(stack.unet, controlnet, latents, t, ehs, hint)
        scale0 = controlled_unet_forward(stack.unet, controlnet, latents, t, ehs, hint, control_scale=0.0)
        other_hint = controlled_unet_forward(stack.unet, controlnet, latents, t, ehs, torch.zeros_like(hint))
    assert (controlled - plain).abs().max() > 1e-3
    assert torch.equal(scale0, plain)  # control_scale 0 is exactly the base model
    assert (controlled - other_hint).abs().max() > 1e-4  # the output depends on the hint


def test_only_mid_control_zeroes_down_residuals_only(parts):
    cfg, stack, _ = parts
    controlnet = instantiate(cfg.model.control_stage_config, unet=stack.unet, hint_channels=3)
    _perturb_zero_convs(controlnet)
    latents, t, ehs, hint = _inputs(stack)
    with torch.no_grad():
        full_down, full_mid = controlnet(latents, t, ehs, controlnet_cond=hint, return_dict=False)
        full = controlled_unet_forward(stack.unet, controlnet, latents, t, ehs, hint)
        set_only_mid_control(controlnet, True)
        down, mid = controlnet(latents, t, ehs, controlnet_cond=hint, return_dict=False)
        out_dict = controlnet(latents, t, ehs, controlnet_cond=hint, return_dict=True)
        mid_only = controlled_unet_forward(stack.unet, controlnet, latents, t, ehs, hint)
        plain = stack.unet(latents, t, encoder_hidden_states=ehs).sample
        set_only_mid_control(controlnet, False)
        again = controlled_unet_forward(stack.unet, controlnet, latents, t, ehs, hint)
    assert all(torch.count_nonzero(d) == 0 for d in down)
    assert all(torch.count_nonzero(d) == 0 for d in out_dict.down_block_res_samples)
    assert any(torch.count_nonzero(d) > 0 for d in full_down)
    assert torch.equal(mid, full_mid)
    assert (mid_only - plain).abs().max() > 1e-4  # the mid residual still acts
    assert (mid_only - full).abs().max() > 1e-4  # and the down residuals do not
    assert torch.allclose(again, full)  # switching it off restores full control


def test_pretrained_controlnet_loads_and_mismatch_names_both_values(parts, tmp_path):
    _, stack, controlnet = parts
    _perturb_zero_convs(controlnet)
    controlnet.save_pretrained(tmp_path / "cn")
    loaded = build_controlnet(stack.unet, 3, pretrained=str(tmp_path / "cn"))
    for key, value in controlnet.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with pytest.raises(ValueError, match=r"conditioning_channels=3.*hint_channels=1"):
        build_controlnet(stack.unet, 1, pretrained=str(tmp_path / "cn"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_controlnet(stack.unet, 3, pretrained=str(tmp_path / "nowhere"))


def test_pretrained_original_format_controlnet_continues_training(parts, tmp_path):
    _, stack, _ = parts
    source = build_controlnet(stack.unet, 3)
    _perturb_zero_convs(source)
    path = export_original_controlnet(source, tmp_path / "control_x.safetensors", dtype="fp32")
    loaded = build_controlnet(stack.unet, 3, pretrained=str(path), conditioning_embedding_out_channels=(8, 8, 8, 8))
    assert list(loaded.config.conditioning_embedding_out_channels) == [16, 32, 96, 256]  # the file's, not the config's
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    gray = build_controlnet(stack.unet, 1, conditioning_embedding_out_channels=(8, 16, 16, 32))
    export_original_controlnet(gray, tmp_path / "control_gray.safetensors")
    with pytest.raises(
        ValueError, match=r"control_gray.safetensors: ControlNet conditioning_channels=1 .*hint_channels=3"
    ):
        build_controlnet(stack.unet, 3, pretrained=str(tmp_path / "control_gray.safetensors"))


def test_pretrained_controlnet_for_another_base_is_refused(tmp_path):
    small = build_stack(compose_train(["model.unet_config.cross_attention_dim=16"]).model)
    other = ControlNetModel.from_unet(small.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    other.save_pretrained(tmp_path / "cn")
    base = build_stack(compose_train().model)
    with pytest.raises(ValueError, match=r"cross_attention_dim=16 does not match the base UNet cross_attention_dim=32"):
        build_controlnet(base.unet, 3, pretrained=str(tmp_path / "cn"))


def test_seeded_random_init_is_reproducible_and_seed_sensitive():
    a = build_stack(compose_train().model)
    b = build_stack(compose_train().model)
    c = build_stack(compose_train(["model.seed=7"]).model)
    assert fingerprint(a.unet, a.vae, a.text_encoder) == fingerprint(b.unet, b.vae, b.text_encoder)
    assert fingerprint(a.unet, a.vae, a.text_encoder) != fingerprint(c.unet, c.vae, c.text_encoder)


def test_byte_level_tokenizer_round_trips_and_fits_the_text_encoder(parts):
    _, stack, _ = parts
    tok = byte_level_clip_tokenizer()
    assert tok.model_max_length == 77
    ids = tok(["Red circle, with café background!"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids.max() < stack.text_encoder.config.vocab_size
    decoded = tok.decode(ids[0], skip_special_tokens=True)
    # Every byte survives (non-ASCII included); CLIP lowercases and spaces out punctuation.
    assert decoded.replace(" ", "") == "redcircle,withcafébackground!"


def test_local_sdxl_directory_loads_the_same_base(tmp_path):
    tiny = build_stack(compose_train(["model=tiny_sdxl"]).model)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "noise_scheduler"):
        getattr(tiny, name).save_pretrained(tmp_path / "sdxl" / {"noise_scheduler": "scheduler"}.get(name, name))
    loaded = build_stack(compose_train(["model=local_diffusers_xl", f"model.path={tmp_path / 'sdxl'}"]).model)
    assert fingerprint(loaded.unet, loaded.vae, *loaded.text_encoders()) == fingerprint(
        tiny.unet, tiny.vae, *tiny.text_encoders()
    )
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    (tmp_path / "sdxl" / "text_encoder_2" / "config.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "sdxl" / "tokenizer_2")
    with pytest.raises(ConfigError, match="cond_stage_config.tokenizer_2.pretrained_model_name_or_path"):
        build_stack(compose_train(["model=local_diffusers_xl", f"model.path={tmp_path / 'sdxl'}"]).model)


def test_local_diffusers_directory_loads_the_same_base(tmp_path):
    """model=local_diffusers builds every part with from_pretrained from a local directory, offline."""
    tiny = build_stack(compose_train().model)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "noise_scheduler"):
        folder = {"noise_scheduler": "scheduler"}.get(name, name)
        getattr(tiny, name).save_pretrained(tmp_path / "sd" / folder)
    cfg = compose_train(["model=local_diffusers", f"model.path={tmp_path / 'sd'}"])
    assert cfg.model.unet_config.local_files_only is True
    loaded = build_stack(cfg.model)
    assert fingerprint(loaded.unet, loaded.vae, loaded.text_encoder) == fingerprint(
        tiny.unet, tiny.vae, tiny.text_encoder
    )
    text = ["green circle with gray background"]
    assert loaded.tokenizer(text).input_ids == tiny.tokenizer(text).input_ids
    assert loaded.noise_scheduler.config.prediction_type == "epsilon"
    with pytest.raises(
        ConfigError, match=r"model.unet_config.pretrained_model_name_or_path=.*no directory .*missing/unet"
    ):
        build_stack(compose_train(["model=local_diffusers", f"model.path={tmp_path / 'missing'}"]).model)


def test_pixel_autoencoder_round_trips_and_loads_as_a_diffusers_model(tmp_path):
    from nemo_controlnet.models.pixel_vae import PixelAutoencoder

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    exact = PixelAutoencoder(block_out_channels=(1, 1, 1), mode="space_to_depth")
    z = exact.encode(x).latent_dist.sample()
    assert z.shape == (2, 48, 8, 8) and exact.config.latent_channels == 48
    torch.testing.assert_close(exact.decode(z).sample, x, atol=1e-5, rtol=0)

    pool = PixelAutoencoder(block_out_channels=(1, 1))
    flat = torch.full((1, 3, 32, 32), 0.25)
    flat[:, :, 8:24, 8:24] = -0.5  # a flat square on a flat background: exact away from its edges
    out = pool.decode(pool.encode(flat).latent_dist.mode()).sample
    assert pool.encode(flat).latent_dist.mode().shape == (1, 3, 16, 16)
    assert torch.equal(out[:, :, 12:20, 12:20], flat[:, :, 12:20, 12:20]) and (out - flat).abs().max() <= 0.75
    pool.save_pretrained(tmp_path / "vae")
    loaded = PixelAutoencoder.from_pretrained(tmp_path / "vae", local_files_only=True)
    assert loaded.factor == 2 and loaded.config.mode == "pool"
    with pytest.raises(ValueError, match="latent_channels=4"):
        PixelAutoencoder(latent_channels=4, mode="space_to_depth")
