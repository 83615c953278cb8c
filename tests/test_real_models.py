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
