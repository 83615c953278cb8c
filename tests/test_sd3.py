"""The SD3 family (models/families/sd3.py): the tiny SD3 config trains, exports and samples; its text
embeddings, hint latents and flow-matching draw are diffusers' own."""

import logging

import pytest
import torch
from diffusers import SD3ControlNetModel
from omegaconf import OmegaConf

from nemo_controlnet.models.families import family_for
from nemo_controlnet.models.families.sd3 import SD3Family
from nemo_controlnet.training.run import train
from tests.conftest import compose_train, tiny_family


def tiny_sd3():
    return tiny_family("tiny_sd3")


def test_tiny_sd3_trains_four_steps_and_exports_a_loadable_controlnet(train_cfg):
    cfg = train_cfg("model=tiny_sd3", "trainer.max_steps=4")
    trainer, module = train(cfg)
    assert trainer.global_step == 4
    assert module.family.name == "sd3"
    assert type(module.unet).__name__ == "SD3Transformer2DModel"
    # every locked part is frozen, T5 included (it rides in text_encoder_2)
    assert not any(p.requires_grad for p in module.text_encoder_2.t5.parameters())
    assert not any(p.requires_grad for p in module.unet.parameters())
    exported = SD3ControlNetModel.from_pretrained(cfg.run_dir + "/controlnet")
    assert exported.config.num_layers == 1 and exported.config.num_attention_heads == 4
    for key, value in module.controlnet.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key
    # the zero-initialised output blocks moved: the ControlNet learned something
    assert any(b.weight.abs().sum() > 0 for b in exported.controlnet_blocks)


def test_controlnet_copies_the_transformer_and_leaves_its_config_alone():
    cfg, family, stack = tiny_sd3()
    controlnet = family.make_controlnet(cfg.model, stack)
    assert stack.unet.config["num_layers"] == 2  # diffusers' from_transformer writes 1 into this dict item
    assert controlnet.config.num_layers == 1
    block = stack.unet.transformer_blocks[0].state_dict()
    for key, value in controlnet.transformer_blocks[0].state_dict().items():
        assert torch.equal(block[key], value), key
    assert all(p.abs().sum() == 0 for p in controlnet.pos_embed_input.parameters())


def test_text_embeddings_are_the_pipelines():
    cfg, family, stack = tiny_sd3()
    pipe = family.pipeline(stack, None)
    captions = ["a red circle on blue", ""]
    states, pooled = family.encode_text(stack, captions)
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        captions, captions, captions, do_classifier_free_guidance=False,
        max_sequence_length=family.max_sequence_length,
    )  # fmt: skip
    assert states.shape == (2, 77 + family.max_sequence_length, stack.unet.config.joint_attention_dim)
    assert pooled.shape == (2, stack.unet.config.pooled_projection_dim)
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(pooled, expected_pooled)


def test_flow_matching_draw_and_x0_estimate():
    cfg, family, stack = tiny_sd3()
    torch.manual_seed(0)
    latents = torch.randn(3, 16, 8, 8)
    torch.manual_seed(1)
    noisy, timesteps, target = family.noise(stack, latents)
    assert timesteps.shape == (3,) and ((timesteps > 0) & (timesteps <= 1000)).all()
    sigmas = family.sigmas(stack, timesteps)
    noise = target + latents
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    # the exact velocity gives back x0
    torch.testing.assert_close(family.predicted_x0(stack, noisy, timesteps, target), latents)
    assert family.loss_weighting(stack, timesteps) is None  # logit_normal shapes the draw, not the loss
    torch.testing.assert_close(SD3Family("sigma_sqrt").loss_weighting(stack, timesteps), sigmas**-2.0)
    torch.testing.assert_close(SD3Family("cosmap").loss_weighting(stack, timesteps),
                               2 / (torch.pi * (1 - 2 * sigmas + 2 * sigmas**2)))  # fmt: skip


def test_hint_is_vae_encoded_and_residuals_reach_the_transformer():
    cfg, family, stack = tiny_sd3()
    controlnet = family.make_controlnet(cfg.model, stack)
    for block in controlnet.controlnet_blocks:  # away from zero, so the residuals are not all zero
        torch.nn.init.normal_(block.weight, std=0.1)
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "hint": torch.rand(2, 3, 64, 64)}
    text = family.encode_text(stack, ["a", "b"])
    latents = family.latents(stack, batch, torch.float32)
    torch.manual_seed(0)
    cond = family.conditioning(stack, batch, text, latents)
    torch.manual_seed(0)
    vae = stack.vae
    expected = (vae.encode(batch["hint"] * 2 - 1).latent_dist.sample() - vae.config.shift_factor) * 1.5305
    torch.testing.assert_close(cond["controlnet_cond"], expected)
    noisy, timesteps, _ = family.noise(stack, latents)
    residuals = family.control_residuals(controlnet, noisy, timesteps, cond, batch["hint"], 1.0)
    assert len(residuals) == 1
    controlled = family.denoise(stack.unet, noisy, timesteps, cond, residuals)
    plain = family.denoise(stack.unet, noisy, timesteps, cond, None)
    assert controlled.shape == latents.shape and not torch.allclose(controlled, plain)


def test_pipeline_samples_with_the_controlnet():
    cfg, family, stack = tiny_sd3()
    controlnet = family.make_controlnet(cfg.model, stack)
    pipe = family.pipeline(stack, controlnet)
    out = pipe("a circle", control_image=torch.rand(1, 3, 64, 64), num_inference_steps=2, height=64, width=64,
               output_type="pt", max_sequence_length=family.max_sequence_length).images  # fmt: skip
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert OmegaConf.select(cfg, "model.family.weighting_scheme") == "logit_normal"


def test_tiny_sd3_resumes(train_cfg, caplog):
    train(train_cfg("model=tiny_sd3", "trainer.max_steps=2", "validation.num_samples=0"))
    with caplog.at_level(logging.INFO, logger="nemo_controlnet"):
        trainer, _ = train(train_cfg("model=tiny_sd3", "trainer.max_steps=3", "validation.num_samples=0"))
    assert trainer.global_step == 3 and "resuming from" in caplog.text


def test_sigma_sqrt_weights_the_training_loss(monkeypatch):
    """With sigma_sqrt the module's loss is the squared error weighted by sigma^-2 per sample, as diffusers'
    SD3 script computes it; with logit_normal it is the plain MSE."""
    cfg = compose_train(["model=tiny_sd3", "model.family.weighting_scheme=sigma_sqrt",
                         "model.proportion_empty_prompts=0"])  # fmt: skip
    from nemo_controlnet.training.module import ControlNetModule

    module = ControlNetModule(cfg.model, cfg.optim)
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "hint": torch.rand(2, 3, 64, 64), "caption": ["a", "b"]}
    seen = {}
    denoise = module.family.denoise

    def record(base, noisy, timesteps, cond, residuals):
        pred = denoise(base, noisy, timesteps, cond, residuals)
        seen.update(timesteps=timesteps, pred=pred)
        return pred

    noise = module.family.noise

    def record_noise(stack, latents):
        out = noise(stack, latents)
        seen["target"] = out[2]
        return out

    monkeypatch.setattr(module.family, "denoise", record)
    monkeypatch.setattr(module.family, "noise", record_noise)
    loss = module.diffusion_loss(batch)
    sigmas = module.family.sigmas(module, seen["timesteps"])
    err = (seen["pred"].float() - seen["target"].float()) ** 2
    torch.testing.assert_close(loss, (err / sigmas**2).mean())
    assert not torch.allclose(loss, err.mean())


def original_sd3_state(transformer) -> dict:
    """An SD3Transformer2DModel's weights in the original (Stability) single-file layout: the inverse of
    diffusers' convert_sd3_transformer_checkpoint_to_diffusers for transformers without qk norm or dual
    attention, so that diffusers' own converter reads it back."""
    s = {k: v.clone() for k, v in transformer.state_dict().items()}

    def swap(w):  # diffusers' norm_out and last context norm hold (scale, shift); the original (shift, scale)
        a, b = w.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)

    out = {"pos_embed": s["pos_embed.pos_embed"], "x_embedder.proj.weight": s["pos_embed.proj.weight"],
           "x_embedder.proj.bias": s["pos_embed.proj.bias"], "context_embedder.weight": s["context_embedder.weight"],
           "context_embedder.bias": s["context_embedder.bias"],
           "final_layer.linear.weight": s["proj_out.weight"], "final_layer.linear.bias": s["proj_out.bias"],
           "final_layer.adaLN_modulation.1.weight": swap(s["norm_out.linear.weight"]),
           "final_layer.adaLN_modulation.1.bias": swap(s["norm_out.linear.bias"])}  # fmt: skip
    for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        for n, m in ((1, 0), (2, 2)):
            for leaf in ("weight", "bias"):
                out[f"{theirs}.mlp.{m}.{leaf}"] = s[f"time_text_embed.{ours}.linear_{n}.{leaf}"]
    n = len(transformer.transformer_blocks)
    for i in range(n):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == n - 1
        for leaf in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{leaf}"] = torch.cat([s[f"{d}attn.to_{x}.{leaf}"] for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{leaf}"] = torch.cat([s[f"{d}attn.add_{x}_proj.{leaf}"] for x in "qkv"])
            out[f"{o}x_block.attn.proj.{leaf}"] = s[f"{d}attn.to_out.0.{leaf}"]
            out[f"{o}x_block.adaLN_modulation.1.{leaf}"] = s[f"{d}norm1.linear.{leaf}"]
            context_norm = s[f"{d}norm1_context.linear.{leaf}"]
            out[f"{o}context_block.adaLN_modulation.1.{leaf}"] = swap(context_norm) if last else context_norm
            out[f"{o}x_block.mlp.fc1.{leaf}"] = s[f"{d}ff.net.0.proj.{leaf}"]
            out[f"{o}x_block.mlp.fc2.{leaf}"] = s[f"{d}ff.net.2.{leaf}"]
            if not last:  # the last block's context stream ends in its attention
                out[f"{o}context_block.attn.proj.{leaf}"] = s[f"{d}attn.to_add_out.{leaf}"]
                out[f"{o}context_block.mlp.fc1.{leaf}"] = s[f"{d}ff_context.net.0.proj.{leaf}"]
                out[f"{o}context_block.mlp.fc2.{leaf}"] = s[f"{d}ff_context.net.2.{leaf}"]
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


def test_a_single_file_transformer_loads_over_the_config_or_a_diffusers_directory(tmp_path):
    """model.checkpoint: the transformer from one original-layout file (diffusers' converter reads it), with the
    architecture of model=tiny_sd3's node or of local_sd3's directory; the other parts as configured."""
    from safetensors.torch import save_file

    from nemo_controlnet.models.stack import fingerprint

    cfg, family, stack = tiny_sd3()
    family.pipeline(stack, None).save_pretrained(tmp_path / "sd3")
    torch.manual_seed(123)  # another transformer than the directory's: the weights must come from the file
    finetuned = type(stack.unet).from_config(stack.unet.config)
    save_file(original_sd3_state(finetuned), tmp_path / "finetuned.safetensors")

    for overrides in (["model=tiny_sd3"], ["model=local_sd3", f"model.path={tmp_path / 'sd3'}"]):
        model = compose_train([*overrides, f"model.checkpoint={tmp_path / 'finetuned.safetensors'}"]).model
        loaded = family_for(model).build_stack(model)
        for key, value in finetuned.state_dict().items():
            assert torch.equal(loaded.unet.state_dict()[key], value), (overrides, key)
        assert fingerprint(loaded.vae, loaded.text_encoder) == fingerprint(stack.vae, stack.text_encoder)
    with pytest.raises(ValueError, match="model.checkpoint=.*no such file"):
        family.build_stack(compose_train(["model=tiny_sd3", f"model.checkpoint={tmp_path / 'none.safetensors'}"]).model)


def hf_layout(prefix: str, module: torch.nn.Module, leave_out: tuple = ()) -> dict:
    """A text encoder's weights as Stability's all-in-one files hold them: its transformers layout under a
    prefix."""
    return {prefix + k: v.clone().contiguous() for k, v in module.state_dict().items() if k not in leave_out}


def test_an_all_in_one_sd3_file_gives_the_vae_and_text_encoders_too(tmp_path):
    """model.checkpoint=<an SD3 file with its VAE and CLIP-L, CLIP-G and T5 (sd3_medium_incl_clips_t5xxl...)>:
    every part it carries is read from it, over the config's random init; CLIP-L without a projection gets
    the identity (as diffusers' loader); a part that does not fit the config's architecture is named."""
    from safetensors.torch import save_file

    from nemo_controlnet.models.single_file import original_vae_state
    from nemo_controlnet.models.stack import fingerprint

    cfg, family, stack = tiny_sd3()
    source = family.build_stack(compose_train(["model=tiny_sd3", "model.seed=7"]).model)  # another base
    clip_l, clip_g, t5 = source.text_encoder, source.text_encoder_2.clip, source.text_encoder_2.t5
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(clip_l.text_projection.weight.shape[0]))
    state = {**original_sd3_state(source.unet), **original_vae_state(source.vae),
             **hf_layout("text_encoders.clip_l.transformer.", clip_l, leave_out=("text_projection.weight",)),
             **hf_layout("text_encoders.clip_g.transformer.", clip_g),
             **hf_layout("text_encoders.t5xxl.transformer.", t5,
                         leave_out=("encoder.embed_tokens.weight",))}  # fmt: skip
    save_file(state, tmp_path / "sd3_incl_clips_t5.safetensors")
    model = compose_train(["model=tiny_sd3", f"model.checkpoint={tmp_path / 'sd3_incl_clips_t5.safetensors'}"]).model
    loaded = family.build_stack(model)
    for part in ("unet", "vae", "text_encoder"):
        assert fingerprint(getattr(loaded, part)) == fingerprint(getattr(source, part)), part
    assert fingerprint(loaded.text_encoder_2.clip, loaded.text_encoder_2.t5) == fingerprint(clip_g, t5)
    assert fingerprint(loaded.vae) != fingerprint(stack.vae)  # not the config's random init
    torch.testing.assert_close(family.encode_text(loaded, ["a b"]), family.encode_text(source, ["a b"]))

    bad = dict(state)
    bad["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(3, 3)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"\(t5\): shared.weight is \(3, 3\) in the file"):
        family.build_stack(compose_train(["model=tiny_sd3", f"model.checkpoint={tmp_path / 'bad.safetensors'}"]).model)
