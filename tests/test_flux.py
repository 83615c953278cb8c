"""The Flux family (models/families/flux.py): the tiny Flux config trains, exports and samples; its text
embeddings, packing, hint latents and flow-matching draw are diffusers' own."""

import json
import logging

import pytest
import torch
from diffusers import FluxControlNetModel, FluxPipeline
from omegaconf import OmegaConf

from nemo_controlnet.models.families import family_for
from nemo_controlnet.models.families.flux import FluxFamily, pack, unpack
from nemo_controlnet.training.run import train
from tests.conftest import compose_train, tiny_family


def tiny_flux():
    return tiny_family("tiny_flux")


def test_tiny_flux_trains_four_steps_and_exports_a_loadable_controlnet(train_cfg):
    cfg = train_cfg("model=tiny_flux", "trainer.max_steps=4")
    trainer, module = train(cfg)
    assert trainer.global_step == 4
    assert module.family.name == "flux"
    assert type(module.unet).__name__ == "FluxTransformer2DModel"
    # every locked part is frozen, T5 included
    assert not any(p.requires_grad for p in module.text_encoder_2.parameters())
    assert not any(p.requires_grad for p in module.unet.parameters())
    exported = FluxControlNetModel.from_pretrained(cfg.run_dir + "/controlnet")
    assert exported.config.num_layers == 1 and exported.config.num_single_layers == 1
    assert exported.config.num_attention_heads == 2 and exported.config.attention_head_dim == 8
    for key, value in module.controlnet.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key
    # the zero-initialised parts moved: the ControlNet learned something
    assert exported.controlnet_x_embedder.weight.abs().sum() > 0
    assert any(b.weight.abs().sum() > 0 for b in [*exported.controlnet_blocks, *exported.controlnet_single_blocks])


def test_controlnet_copies_the_transformer_and_leaves_its_config_alone():
    cfg, family, stack = tiny_flux()
    controlnet = family.make_controlnet(cfg.model, stack)
    assert stack.unet.config["num_layers"] == 1 and stack.unet.config["num_single_layers"] == 2
    assert controlnet.config.num_layers == 1 and controlnet.config.num_single_layers == 1
    # the heads are the transformer's, not from_transformer's 12B defaults (24 x 128)
    assert controlnet.config.num_attention_heads == 2 and controlnet.config.attention_head_dim == 8
    for mine, theirs in ((controlnet.transformer_blocks[0], stack.unet.transformer_blocks[0]),
                         (controlnet.single_transformer_blocks[0], stack.unet.single_transformer_blocks[0]),
                         (controlnet.x_embedder, stack.unet.x_embedder),
                         (controlnet.context_embedder, stack.unet.context_embedder)):  # fmt: skip
        expected = theirs.state_dict()
        for key, value in mine.state_dict().items():
            assert torch.equal(expected[key], value), key
    assert all(p.abs().sum() == 0 for p in controlnet.controlnet_x_embedder.parameters())
    assert controlnet.input_hint_block is None  # the hint goes in as VAE latents


def test_text_embeddings_are_the_pipelines():
    cfg, family, stack = tiny_flux()
    pipe = family.pipeline(stack, None)
    captions = ["a red circle on blue", ""]
    states, pooled = family.encode_text(stack, captions)
    expected, expected_pooled, text_ids = pipe.encode_prompt(
        captions, captions, max_sequence_length=family.max_sequence_length
    )
    assert states.shape == (2, family.max_sequence_length, stack.unet.config.joint_attention_dim)
    assert pooled.shape == (2, stack.unet.config.pooled_projection_dim)
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    cond = family.conditioning(stack, {}, (states, pooled), torch.zeros(2, 16, 8, 8))
    torch.testing.assert_close(cond["txt_ids"], text_ids)
    assert cond["controlnet_cond"] is None
    torch.testing.assert_close(cond["guidance"], torch.full((2,), 3.5))


def test_packing_round_trips_and_denoise_is_the_transformer_on_packed_input():
    cfg, family, stack = tiny_flux()
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 8, 6)
    packed = pack(latents)
    assert packed.shape == (2, 4 * 3, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack(packed, 8, 6), latents)
    # a channels_last input (the module's layout option) packs alike
    assert torch.equal(pack(latents.contiguous(memory_format=torch.channels_last)), packed)
    text = family.encode_text(stack, ["a", "b"])
    cond = family.conditioning(stack, {}, text, latents)
    timesteps = torch.tensor([250.0, 800.0])
    pred = family.denoise(stack.unet, latents, timesteps, cond, None)
    assert pred.shape == latents.shape
    expected = stack.unet(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.full((2,), 3.5),
                          encoder_hidden_states=text[0], pooled_projections=text[1], return_dict=False,
                          img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32),
                          txt_ids=torch.zeros(16, 3))[0]  # fmt: skip
    torch.testing.assert_close(pred, FluxPipeline._unpack_latents(expected, 8 * 8, 6 * 8, 8))


def test_flow_matching_draw_shift_and_x0_estimate():
    cfg, family, stack = tiny_flux()
    torch.manual_seed(0)
    latents = torch.randn(3, 16, 8, 8)
    torch.manual_seed(1)
    noisy, timesteps, target = family.noise(stack, latents)
    assert timesteps.shape == (3,) and timesteps.dtype == torch.float32
    assert ((timesteps > 0) & (timesteps <= 1000)).all()
    sigmas = family.sigmas(stack, timesteps)
    noise = target + latents
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    # the exact velocity gives back x0
    torch.testing.assert_close(family.predicted_x0(stack, noisy, timesteps, target), latents)
    assert family.loss_weighting(stack, timesteps) is None  # logit_normal shapes the draw, not the loss
    torch.testing.assert_close(FluxFamily("sigma_sqrt").loss_weighting(stack, timesteps), sigmas**-2.0)

    def drawn(family, side):
        torch.manual_seed(2)  # the same u for every draw
        return family.sigmas(stack, family.noise(stack, torch.zeros(4, 16, side, side))[1]).flatten()

    plain = FluxFamily(resolution_shift=False)
    u = drawn(plain, 8)
    # the shift at a large sequence length (4096 tokens: mu = max_shift) moves every sigma up
    big = drawn(family, 128)
    torch.testing.assert_close(big, torch.exp(torch.tensor(1.15)) / (torch.exp(torch.tensor(1.15)) + 1 / u - 1))
    assert (big > u).all() and (big > drawn(family, 8)).all()


def test_hint_is_vae_encoded_and_residuals_reach_the_transformer():
    cfg, family, stack = tiny_flux()
    controlnet = family.make_controlnet(cfg.model, stack)
    for block in [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks]:
        torch.nn.init.normal_(block.weight, std=0.1)  # away from zero, so the residuals are not all zero
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "hint": torch.rand(2, 1, 64, 64)}
    text = family.encode_text(stack, ["a", "b"])
    latents = family.latents(stack, batch, torch.float32)
    assert latents.shape == (2, 16, 8, 8)
    torch.manual_seed(0)
    cond = family.conditioning(stack, batch, text, latents)
    torch.manual_seed(0)
    vae = stack.vae
    hint = batch["hint"].expand(-1, 3, -1, -1) * 2 - 1
    expected = (vae.encode(hint).latent_dist.sample() - 0.1159) * 0.3611
    torch.testing.assert_close(cond["controlnet_cond"], FluxPipeline._pack_latents(expected, 2, 16, 8, 8))
    noisy, timesteps, _ = family.noise(stack, latents)
    blocks, singles = family.control_residuals(controlnet, noisy, timesteps, cond, batch["hint"], 1.0)
    assert len(blocks) == 1 and len(singles) == 1 and blocks[0].shape == (2, 16, 16)
    plain = family.denoise(stack.unet, noisy, timesteps, cond, None)
    controlled = family.denoise(stack.unet, noisy, timesteps, cond, (blocks, singles))
    assert controlled.shape == latents.shape and not torch.allclose(controlled, plain)
    # each kind reaches the transformer on its own
    for one in ((blocks, None), (None, singles)):
        assert not torch.allclose(family.denoise(stack.unet, noisy, timesteps, cond, one), plain)
    # without a ControlNet (stack.controlnet None) the hint is not encoded
    stack.controlnet = None
    assert family.conditioning(stack, batch, text, latents)["controlnet_cond"] is None


def test_pipeline_samples_with_the_controlnet():
    cfg, family, stack = tiny_flux()
    controlnet = family.make_controlnet(cfg.model, stack)
    pipe = family.pipeline(stack, controlnet)
    assert type(pipe).__name__ == "FluxControlNetPipeline" and pipe.unet is stack.unet
    out = pipe("a circle", control_image=torch.rand(1, 3, 64, 64), num_inference_steps=2, height=64, width=64,
               output_type="pt").images  # fmt: skip
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    # the recipe's call (inference/pipeline.py sample): a one-channel hint as image=
    out = pipe(prompt=["a"], image=torch.rand(1, 1, 64, 64), controlnet_conditioning_scale=1.0, guess_mode=False,
               num_inference_steps=2, height=64, width=64, output_type="np").images  # fmt: skip
    assert out.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="guess_mode"):
        pipe("a", image=torch.rand(1, 3, 64, 64), guess_mode=True, num_inference_steps=1, height=64, width=64)
    assert type(family.pipeline(stack, None)).__name__ == "FluxPipeline"
    assert OmegaConf.select(cfg, "model.family.resolution_shift") is True


def test_tiny_flux_resumes(train_cfg, caplog):
    train(train_cfg("model=tiny_flux", "trainer.max_steps=2", "validation.num_samples=0"))
    with caplog.at_level(logging.INFO, logger="nemo_controlnet"):
        trainer, _ = train(train_cfg("model=tiny_flux", "trainer.max_steps=3", "validation.num_samples=0"))
    assert trainer.global_step == 3 and "resuming from" in caplog.text


def test_load_controlnet_refuses_one_that_does_not_fit(tmp_path):
    cfg, family, stack = tiny_flux()
    controlnet = family.make_controlnet(cfg.model, stack)
    controlnet.save_pretrained(tmp_path / "fits")
    loaded, channels = family.load_controlnet(tmp_path / "fits", {"hint": {"channels": 1}}, stack)
    assert channels == 1
    for key, value in controlnet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    config = json.loads((tmp_path / "fits" / "config.json").read_text())
    config["joint_attention_dim"] = 128
    (tmp_path / "fits" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="joint_attention_dim=128"):
        family.load_controlnet(tmp_path / "fits", {}, stack)


def test_family_options_are_checked():
    with pytest.raises(ValueError, match="model.family.weighting_scheme"):
        FluxFamily("normal")
    with pytest.raises(ValueError, match="model.family.max_sequence_length"):
        FluxFamily(max_sequence_length=0)
    with pytest.raises(ValueError, match="model.family.guidance_scale"):
        FluxFamily(guidance_scale=-1)
    cfg, family, stack = tiny_flux()
    with pytest.raises(ValueError, match="only_mid_control"):
        family.configure_controlnet(None, OmegaConf.merge(cfg.model, {"only_mid_control": True}))


def test_a_transformer_without_guidance_embeds_trains_and_samples_without_guidance():
    cfg = compose_train(["model=tiny_flux", "model.unet_config.guidance_embeds=false"])  # as FLUX.1-schnell
    family = family_for(cfg.model)
    stack = family.build_stack(cfg.model)
    controlnet = family.make_controlnet(cfg.model, stack)
    assert controlnet.config.guidance_embeds is False
    batch = {"image": torch.rand(1, 3, 64, 64) * 2 - 1, "hint": torch.rand(1, 3, 64, 64)}
    text = family.encode_text(stack, ["a"])
    latents = family.latents(stack, batch, torch.float32)
    cond = family.conditioning(stack, batch, text, latents)
    assert cond["guidance"] is None
    noisy, timesteps, _ = family.noise(stack, latents)
    residuals = family.control_residuals(controlnet, noisy, timesteps, cond, batch["hint"], 1.0)
    assert family.denoise(stack.unet, noisy, timesteps, cond, residuals).shape == latents.shape
    out = family.pipeline(stack, controlnet)("a", image=batch["hint"], num_inference_steps=1, height=64, width=64,
                                             output_type="pt").images  # fmt: skip
    assert torch.isfinite(out).all()


def original_flux_state(transformer) -> dict:
    """A FluxTransformer2DModel's weights in the original (Black Forest Labs) single-file layout: the inverse
    of diffusers' convert_flux_transformer_checkpoint_to_diffusers, so that diffusers' converter reads it."""
    s = transformer.state_dict()
    out = {}

    def put(original: str, ours: str) -> None:
        for leaf in ("weight", "bias"):
            out[f"{original}.{leaf}"] = s[f"{ours}.{leaf}"]

    for original, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                           ("guidance_in", "guidance_embedder")):  # fmt: skip
        put(f"{original}.in_layer", f"time_text_embed.{ours}.linear_1")
        put(f"{original}.out_layer", f"time_text_embed.{ours}.linear_2")
    put("txt_in", "context_embedder")
    put("img_in", "x_embedder")
    put("final_layer.linear", "proj_out")
    for leaf in ("weight", "bias"):  # diffusers holds (scale, shift), the original (shift, scale)
        scale, shift = s[f"norm_out.linear.{leaf}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    for i in range(len(transformer.transformer_blocks)):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        streams = (("img", "norm1", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm_q", "norm_k"),
                   ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context",
                    "norm_added_q", "norm_added_k"))  # fmt: skip
        for side, norm, qkv, proj, mlp, q, k in streams:
            put(f"{o}{side}_mod.lin", f"{d}{norm}.linear")
            for leaf in ("weight", "bias"):
                out[f"{o}{side}_attn.qkv.{leaf}"] = torch.cat([s[f"{d}attn.{n}.{leaf}"] for n in qkv])
            put(f"{o}{side}_attn.proj", f"{d}attn.{proj}")
            put(f"{o}{side}_mlp.0", f"{d}{mlp}.net.0.proj")
            put(f"{o}{side}_mlp.2", f"{d}{mlp}.net.2")
            out[f"{o}{side}_attn.norm.query_norm.scale"] = s[f"{d}attn.{q}.weight"]
            out[f"{o}{side}_attn.norm.key_norm.scale"] = s[f"{d}attn.{k}.weight"]
    for i in range(len(transformer.single_transformer_blocks)):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        put(f"{o}modulation.lin", f"{d}norm.linear")
        for leaf in ("weight", "bias"):
            parts = [s[f"{d}attn.to_{x}.{leaf}"] for x in "qkv"] + [s[f"{d}proj_mlp.{leaf}"]]
            out[f"{o}linear1.{leaf}"] = torch.cat(parts)
        put(f"{o}linear2", f"{d}proj_out")
        out[f"{o}norm.query_norm.scale"] = s[f"{d}attn.norm_q.weight"]
        out[f"{o}norm.key_norm.scale"] = s[f"{d}attn.norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.slow
def test_a_single_file_flux_transformer_loads_over_a_diffusers_directory(tmp_path):
    """model=local_flux model.checkpoint=<flux1-dev-layout file>: the transformer from the file through
    diffusers' converter, which assumes Flux's width (3072): so one double and one single block at that
    width (531M parameters, bf16), the rest of the base from the directory; a file that also carries the
    VAE and text encoders (ComfyUI's all-in-one layout: vae., text_encoders.clip_l / t5xxl) gives them too."""
    from safetensors.torch import save_file

    from nemo_controlnet.models.single_file import original_vae_state
    from nemo_controlnet.models.stack import fingerprint

    cfg, family, stack = tiny_flux()
    family.pipeline(stack, None).save_pretrained(tmp_path / "flux")
    config = {**stack.unet.config, "attention_head_dim": 128, "num_attention_heads": 24, "axes_dims_rope": [16, 56, 56]}
    (tmp_path / "flux" / "transformer" / "config.json").write_text(json.dumps(config))
    (tmp_path / "flux" / "transformer" / "diffusion_pytorch_model.safetensors").unlink()  # the file has them
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(5)
        wide = type(stack.unet).from_config(config)
    finally:
        torch.set_default_dtype(default)
    save_file(original_flux_state(wide), tmp_path / "flux1-wide.safetensors")
    model = compose_train(["model=local_flux", f"model.path={tmp_path / 'flux'}",
                           f"model.checkpoint={tmp_path / 'flux1-wide.safetensors'}"]).model  # fmt: skip
    loaded = family_for(model).build_stack(model)
    assert loaded.unet.config.num_attention_heads == 24
    state = loaded.unet.state_dict()
    assert state.keys() == wide.state_dict().keys()
    for key, value in wide.state_dict().items():
        assert torch.equal(state[key].to(value.dtype), value), key
    assert loaded.text_encoder_2.config.d_model == stack.text_encoder_2.config.d_model  # from the directory
    assert fingerprint(loaded.vae, *loaded.text_encoders()) == fingerprint(stack.vae, *stack.text_encoders())

    source = family.build_stack(compose_train(["model=tiny_flux", "model.seed=7"]).model)
    parts = {"vae." + k[len("first_stage_model."):]: v for k, v in original_vae_state(source.vae).items()}
    for prefix, module in (("clip_l", source.text_encoder), ("t5xxl", source.text_encoder_2)):
        parts.update({f"text_encoders.{prefix}.transformer.{k}": v.clone().contiguous()
                      for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"})  # fmt: skip
    save_file({**original_flux_state(wide), **parts}, tmp_path / "flux1-all-in-one.safetensors")
    model = compose_train(["model=local_flux", f"model.path={tmp_path / 'flux'}",
                           f"model.checkpoint={tmp_path / 'flux1-all-in-one.safetensors'}"]).model  # fmt: skip
    loaded = family_for(model).build_stack(model)
    assert fingerprint(loaded.vae, *loaded.text_encoders()) == fingerprint(source.vae, *source.text_encoders())
