"""The real architectures are facts: built on the meta device (no memory, no init), they must have
the published sizes and fit together."""

import pytest
import torch
from diffusers import ControlNetModel
from hydra.utils import instantiate

from nemo_controlnet.config import validate_train_config
from tests.conftest import compose_train


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _build(model: str):
    cfg = compose_train([f"model={model}"])
    validate_train_config(cfg)
    m = cfg.model
    with torch.device("meta"):
        unet = instantiate(m.unet_config)
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(m.control_stage_config.conditioning_embedding_out_channels),
            load_weights_from_unet=False,
        )
        vae = instantiate(m.first_stage_config)
        text_encoder = instantiate(m.cond_stage_config.text_encoder)
    return cfg, unet, controlnet, vae, text_encoder


@pytest.mark.parametrize(
    "model,unet_m,controlnet_m,text_m,prediction",
    [("sd15", 859.52, 361.28, 123.06, "epsilon"), ("sd21", 865.91, 364.23, 340.39, "v_prediction")],
)
def test_sd_architectures_have_the_published_sizes(model, unet_m, controlnet_m, text_m, prediction):
    cfg, unet, controlnet, vae, text_encoder = _build(model)
    assert round(_count(unet), 2) == unet_m
    assert round(_count(controlnet), 2) == controlnet_m
    assert round(_count(vae), 2) == 83.65
    assert round(_count(text_encoder), 2) == text_m
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert cfg.model.prediction_type == cfg.model.scheduler_config.prediction_type == prediction
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # latents and hints line up 1:8


def test_sdxl_architecture_has_the_published_sizes():
    cfg = compose_train(["model=sdxl"])
    validate_train_config(cfg)
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet_config)
        text_encoder = instantiate(cfg.model.cond_stage_config.text_encoder)
        text_encoder_2 = instantiate(cfg.model.cond_stage_config.text_encoder_2)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    assert round(_count(unet), 2) == 2567.46
    assert round(_count(text_encoder_2), 2) == 694.66
    assert round(_count(controlnet), 2) == 1251.01
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    pooled_and_time_ids = text_encoder_2.config.projection_dim + 6 * unet.config.addition_time_embed_dim
    assert unet.config.projection_class_embeddings_input_dim == pooled_and_time_ids


@pytest.mark.parametrize("model,transformer_m", [("sd3", 2028.33), ("sd35_large", 8056.63)])
def test_sd3_architectures_have_the_published_sizes_and_fit_together(model, transformer_m):
    from nemo_controlnet.models.families.sd3 import controlnet_from_transformer

    cfg = compose_train([f"model={model}"])
    validate_train_config(cfg)
    m, cond = cfg.model, cfg.model.cond_stage_config
    with torch.device("meta"):
        transformer = instantiate(m.unet_config)
        controlnet = controlnet_from_transformer(transformer, num_layers=m.control_stage_config.num_layers)
        vae = instantiate(m.first_stage_config)
        clip_l, clip_g, t5 = (instantiate(cond[k]) for k in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    assert round(_count(transformer), 2) == transformer_m
    assert round(_count(vae), 2) == 83.82
    assert [round(_count(e), 2) for e in (clip_l, clip_g, t5)] == [123.65, 694.66, 4762.31]
    if model == "sd3":
        assert round(_count(controlnet), 2) == 1062.86 and controlnet.config.num_layers == 12
    # the text encoders' outputs are what the transformer's embedders take
    assert transformer.config.joint_attention_dim == t5.config.d_model
    assert clip_l.config.hidden_size + clip_g.config.hidden_size <= t5.config.d_model  # zero-padded to it
    assert transformer.config.pooled_projection_dim == clip_l.config.projection_dim + clip_g.config.projection_dim
    assert vae.config.latent_channels == transformer.config.in_channels == 16


def test_local_sd3_reads_a_diffusers_directory_offline(tmp_path):
    """model=local_sd3 builds the same base from a saved SD3 pipeline directory (all three encoders)."""
    from nemo_controlnet.models.families import family_for
    from nemo_controlnet.models.stack import fingerprint

    tiny = compose_train(["model=tiny_sd3"]).model
    family = family_for(tiny)
    stack = family.build_stack(tiny)
    family.pipeline(stack, None).save_pretrained(tmp_path / "sd3")
    local = compose_train(["model=local_sd3", f"model.path={tmp_path / 'sd3'}"]).model
    loaded = family_for(local).build_stack(local)
    assert type(loaded.unet).__name__ == "SD3Transformer2DModel" and loaded.text_encoder_2.t5 is not None
    assert fingerprint(loaded.unet, loaded.vae, *loaded.text_encoders()) == fingerprint(
        stack.unet, stack.vae, *stack.text_encoders()
    )
    assert loaded.noise_scheduler.config.shift == stack.noise_scheduler.config.shift
    torch.testing.assert_close(family.encode_text(loaded, ["a b"])[0], family.encode_text(stack, ["a b"])[0])


def test_flux_architecture_has_the_published_sizes_and_fits_together():
    from nemo_controlnet.models.families.flux import controlnet_from_transformer

    cfg = compose_train(["model=flux"])
    validate_train_config(cfg)
    m, cond = cfg.model, cfg.model.cond_stage_config
    with torch.device("meta"):
        transformer = instantiate(m.unet_config)
        layers = m.control_stage_config
        controlnet = controlnet_from_transformer(transformer, layers.num_layers, layers.num_single_layers)
        vae = instantiate(m.first_stage_config)
        clip, t5 = instantiate(cond.text_encoder), instantiate(cond.text_encoder_2)
    assert round(_count(transformer), 2) == 11901.41  # FLUX.1 [dev]: 19 double + 38 single blocks
    assert round(_count(controlnet), 2) == 1442.33
    assert (len(controlnet.transformer_blocks), len(controlnet.single_transformer_blocks)) == (4, 0)
    assert [round(_count(x), 2) for x in (vae, clip, t5)] == [83.82, 123.06, 4762.31]
    assert transformer.config.joint_attention_dim == t5.config.d_model
    assert transformer.config.pooled_projection_dim == clip.config.hidden_size
    assert transformer.config.in_channels == 4 * vae.config.latent_channels  # 2x2 packing
    assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim


def test_local_flux_reads_a_diffusers_directory_offline(tmp_path):
    from nemo_controlnet.models.families import family_for
    from nemo_controlnet.models.stack import fingerprint

    tiny = compose_train(["model=tiny_flux"]).model
    family = family_for(tiny)
    stack = family.build_stack(tiny)
    family.pipeline(stack, None).save_pretrained(tmp_path / "flux")
    local = compose_train(["model=local_flux", f"model.path={tmp_path / 'flux'}",
                           f"model.family.max_sequence_length={family.max_sequence_length}"]).model  # fmt: skip
    loaded = family_for(local).build_stack(local)
    assert type(loaded.unet).__name__ == "FluxTransformer2DModel"
    assert fingerprint(loaded.unet, loaded.vae, *loaded.text_encoders()) == fingerprint(
        stack.unet, stack.vae, *stack.text_encoders()
    )
    assert loaded.noise_scheduler.config.use_dynamic_shifting
    with torch.no_grad():
        torch.testing.assert_close(family.encode_text(loaded, ["a b"]), family.encode_text(stack, ["a b"]))
