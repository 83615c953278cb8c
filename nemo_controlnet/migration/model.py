"""The model side of a NeMo ControlNet config: architecture -> model=sd15|sd21 (or their keys), weights ->
model.checkpoint / model.path, the ControlNet, the noise schedule and the model options."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from nemo_controlnet.config import ConfigError
from nemo_controlnet.migration.engine import MAPPED, SAME, Mapper, show
from nemo_controlnet.migration.rules import PRESETS

MODEL_CONF = Path(__file__).parents[1] / "conf" / "model"
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction"}
WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
LDM_DEFAULTS = {"num_head_channels": -1, "transformer_depth": 1, "use_linear_in_transformer": False, "legacy": True}
# NeMo's (ldm's) architecture keys -> the diffusers argument each one sets.
UNET_ARCH = {"in_channels": "in_channels", "out_channels": "out_channels", "model_channels": "block_out_channels",
             "channel_mult": "block_out_channels", "num_res_blocks": "layers_per_block",
             "attention_resolutions": "down_block_types", "num_heads": "attention_head_dim",
             "num_head_channels": "attention_head_dim", "transformer_depth": "transformer_layers_per_block",
             "context_dim": "cross_attention_dim", "use_linear_in_transformer": "use_linear_projection"}  # fmt: skip
VAE_ARCH = {"in_channels": "in_channels", "out_ch": "out_channels", "ch": "block_out_channels",
            "ch_mult": "block_out_channels", "num_res_blocks": "layers_per_block", "z_channels": "latent_channels"}



def model_preset(name: str) -> dict:
    """conf/model/<name>.yaml with the files of its defaults list merged in (as Hydra composes it)."""
    cfg = OmegaConf.load(MODEL_CONF / f"{name}.yaml")
    merged = OmegaConf.create()
    for entry in cfg.pop("defaults", ["_self_"]):
        merged = OmegaConf.merge(merged, cfg if entry == "_self_" else model_preset(entry))
    return OmegaConf.to_container(merged)


def _unet_architecture(p) -> dict:
    """NeMo's (ldm's) UNet parameters -> diffusers UNet2DConditionModel arguments."""
    levels = len(p("channel_mult"))
    channels = [p("model_channels") * mult for mult in p("channel_mult")]
    attention = [2**i in list(p("attention_resolutions")) for i in range(levels)]
    head_channels = p("num_head_channels", -1)
    heads = [c // head_channels for c in channels] if head_channels and head_channels > 0 else p("num_heads")
    depth = p("transformer_depth", 1)
    return {
        "in_channels": p("in_channels"),
        "out_channels": p("out_channels", p("in_channels")),
        "layers_per_block": p("num_res_blocks"),
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": p("context_dim"),
        "attention_head_dim": heads,
        "use_linear_projection": bool(p("use_linear_in_transformer", False)),
        "transformer_layers_per_block": list(depth) if isinstance(depth, list) else depth,
    }


def _vae_architecture(p) -> dict:
    """NeMo's (ldm's) AutoencoderKL ddconfig -> diffusers AutoencoderKL arguments."""
    n = len(p("ch_mult"))
    return {
        "in_channels": p("in_channels"),
        "out_channels": p("out_ch"),
        "latent_channels": p("z_channels"),
        "layers_per_block": p("num_res_blocks"),
        "block_out_channels": [p("ch") * mult for mult in p("ch_mult")],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
    }


def _differences(ours: dict, preset: dict, defaults: dict) -> dict:
    return {k: v for k, v in ours.items() if preset.get(k, defaults.get(k)) != v}


UNET_DEFAULTS = {"use_linear_projection": False, "transformer_layers_per_block": 1}


def map_model(x: Mapper) -> None:
    """Architecture -> model=sd15|sd21 (or their keys), weights -> model.checkpoint / model.path, options."""
    u, c, f = "model.unet_config", "model.control_stage_config.params", "model.first_stage_config"
    cond_target = str(x.get("model.cond_stage_config._target_", ""))
    preset_name = next((name for name, marker in PRESETS.items() if cond_target.endswith(marker)), None)
    x.check("model.unet_config.use_spatial_transformer", True,
            "false: ldm's plain attention blocks; ours are diffusers' transformer blocks (spatial transformer)")
    missing = [k for k in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "in_channels",
                           "context_dim") if not x.has(f"{u}.{k}")]  # fmt: skip
    if missing:
        raise ConfigError(f"nemo_config={x.m.source!r}: {u} lacks {', '.join(missing)}: the UNet's architecture")
    unet = _unet_architecture(lambda k, d=None: x.get(f"{u}.{k}", d))
    vae_keys = [k for k in VAE_ARCH if x.has(f"{f}.ddconfig.{k}")]
    vae = _vae_architecture(lambda k, d=None: x.get(f"{f}.ddconfig.{k}", d)) if len(vae_keys) == len(VAE_ARCH) else None
    if preset_name is None:
        x.skip("model.cond_stage_config._target_", "not CLIP ViT-L (SD 1.x) or OpenCLIP "
               "ViT-H (SD 2.x); the text encoder stays SD 1.5's: set model.cond_stage_config")  # fmt: skip
        preset_name = "sd15"
    else:
        x.mapped("model.cond_stage_config._target_", f"model={preset_name}")
    preset = model_preset(preset_name)
    unet_diff = _differences(unet, preset["unet_config"], UNET_DEFAULTS)
    vae_diff = _differences(vae, preset["first_stage_config"], {}) if vae else {}
    x.m.choices["model"] = preset_name
    width = preset["cond_stage_config"]["text_encoder"]["config"]["hidden_size"]
    version = str(x.get("model.cond_stage_config.version", ""))
    if "cross_attention_dim" in unet_diff:
        raise ConfigError(
            f"{u}.context_dim={unet['cross_attention_dim']}: the text encoder of model.cond_stage_config "
            f"({version or cond_target}) is {width} wide (model={preset_name}'s); a UNet over another text encoder "
            "is not migrated")
    for key, ours in UNET_ARCH.items():
        x.mapped(f"{u}.{key}", f"model.unet_config.{ours}" if ours in unet_diff else f"model={preset_name}")
    for key, value in unet_diff.items():
        x.m.values[f"model.unet_config.{key}"] = value
    vae_target = "model.first_stage_config.{}"
    for key, ours in VAE_ARCH.items():
        x.mapped(f"{f}.ddconfig.{key}", vae_target.format(ours) if ours in vae_diff else f"model={preset_name}")
    x.mapped(f"{f}.embed_dim", vae_target.format("latent_channels") if "latent_channels" in vae_diff
             else f"model={preset_name}")  # fmt: skip
    for key, value in vae_diff.items():
        x.m.values[f"model.first_stage_config.{key}"] = value
    if vae is None:
        for key in [*vae_keys, "embed_dim"]:
            key = key if key == "embed_dim" else f"ddconfig.{key}"
            x.skip(f"{f}.{key}", f"ddconfig lacks {', '.join(k for k in VAE_ARCH if k not in vae_keys)}: the VAE "
                   f"is model={preset_name}'s")  # fmt: skip
    if unet_diff or vae_diff:
        x.m.notes.append(f"architecture: not {preset_name}'s; model={preset_name} with "
                         + ", ".join([f"model.unet_config.{k}" for k in unet_diff]
                                     + [f"model.first_stage_config.{k}" for k in vae_diff]) + " set")  # fmt: skip
    for key in ("_target_", "image_size", "legacy", "use_flash_attention", "from_NeMo"):
        x.same(f"{u}.{key}")
    _map_control_stage(x, u, c, unet)
    x.check(f"{f}.ddconfig.double_z", True, "false: a VAE without a variance; diffusers' AutoencoderKL has one")
    x.check(f"{f}.ddconfig.attn_resolutions", [], "attention inside the VAE's levels: diffusers' AutoencoderKL "
            "has attention in its middle block only")  # fmt: skip
    for key in ("_target_", "ddconfig.resolution", "ddconfig.dropout"):
        x.same(f"{f}.{key}")
    for key in (k for k in x.actual if k.startswith(f"{f}.lossconfig")):
        x.same(key)
    _map_weights(x, preset_name, preset)
    _map_model_options(x, preset)
    if x.m.choices["model"] == "local_diffusers":
        _from_directory(x)


def _from_directory(x: Mapper) -> None:
    """model=local_diffusers: the architecture, scheduler and VAE scale come from model.path's own configs;
    values for those nodes would override them as from_pretrained arguments, so none is written."""
    nodes = ("model.unet_config.", "model.first_stage_config.", "model.scheduler_config.", "model.cond_stage_config.")
    for key in [k for k in x.m.values if k.startswith(nodes)]:
        del x.m.values[key]
    for key, (status, text) in list(x.m.status.items()):
        if status == MAPPED and (text.startswith(nodes) or text.startswith("model=sd")):
            x.m.status[key] = (SAME, f"model=local_diffusers: from model.path's own configs, not set ({text})")


def _map_control_stage(x: Mapper, u: str, c: str, unet: dict) -> None:
    x.put(f"{c}.hint_channels", "model.hint_channels", x.get(f"{c}.hint_channels"))
    x.put(f"{c}.use_checkpoint", "perf.gradient_checkpointing.controlnet", bool(x.get(f"{c}.use_checkpoint")))
    for key in (*UNET_ARCH, "use_spatial_transformer", "legacy"):
        if x.has(f"{c}.{key}"):
            default = LDM_DEFAULTS.get(key)
            theirs, its = x.get(f"{c}.{key}", default), x.get(f"{u}.{key}", default)
            if theirs == its or key in ("out_channels", "legacy"):
                x.same(f"{c}.{key}")
            else:
                x.skip(f"{c}.{key}", f"differs from {u}.{key}={show(its)}: our ControlNet is a copy of the "
                       "UNet's encoder, so it has the UNet's architecture")  # fmt: skip
    for key in ("image_size", "use_flash_attention", "from_NeMo"):
        x.same(f"{c}.{key}")
    x.same("model.control_stage_config._target_")
    init, weights = x.get(f"{c}.from_pretrained_unet"), x.get(f"{u}.from_pretrained")
    if init is not None and init == weights:
        x.same(f"{c}.from_pretrained_unet")
    elif x.has(f"{c}.from_pretrained_unet"):
        x.skip(f"{c}.from_pretrained_unet", "ours starts the ControlNet as a copy of the base UNet "
               f"({show(weights)}); " + ("NeMo started it at random" if init is None else
                                          "another UNet's weights cannot be the start"))  # fmt: skip


def _map_weights(x: Mapper, preset_name: str, preset: dict) -> None:
    u, f, cond = "model.unet_config", "model.first_stage_config", "model.cond_stage_config"
    weights = x.get(f"{u}.from_pretrained")
    source = None
    if weights is None:
        x.same(f"{u}.from_pretrained", "null: random init, as in NeMo; set model.checkpoint to an SD file")
    elif str(weights).endswith(".nemo"):
        x.skip(f"{u}.from_pretrained", "a .nemo archive: unpack it and give its weights as an original-layout file")
    elif str(weights).endswith(WEIGHT_SUFFIXES) and x.get(f"{u}.from_NeMo", True):
        x.put(f"{u}.from_pretrained", "model.checkpoint", str(weights))
        source = "model.checkpoint"
    else:  # diffusers weights (from_NeMo: false): <root>/unet/diffusion_pytorch_model.bin, or a directory
        path = Path(str(weights))
        path = path.parent if path.suffix else path
        root = path.parent if path.name == "unet" else path
        x.m.choices["model"] = "local_diffusers"
        x.put(f"{u}.from_pretrained", "model.path", str(root))
        x.m.notes.append(f"model=local_diffusers model.path={root}: the diffusers directory that holds the UNet "
                         f"({weights}); its vae/, text_encoder/, tokenizer/ and scheduler/ are read too")  # fmt: skip
        source = "model.path"
    vae = x.get(f"{f}.from_pretrained")
    if vae is None:
        x.same(f"{f}.from_pretrained", "null: " + (f"the VAE comes from {source}" if source else "random init"))
    else:
        x.skip(f"{f}.from_pretrained", f"ours reads the VAE from {source or 'model.checkpoint'} (an SD file holds "
               "first_stage_model.*); another VAE: model.first_stage_config from its diffusers directory")  # fmt: skip
    if source:
        x.same(f"{cond}.version", f"the text encoder comes from {source} (the same weights: SD's own text encoder)")
    elif x.has(f"{cond}.version"):
        x.skip(f"{cond}.version", f"no weights file is given, and ours never reads a text encoder on its own: it is "
               f"{preset_name}'s architecture at random; set model.checkpoint")  # fmt: skip
    max_length = x.get(f"{cond}.max_length")
    tokenizer = preset["cond_stage_config"]["tokenizer"].get("model_max_length")
    if max_length is not None and max_length != tokenizer and source != "model.path":
        x.put(f"{cond}.max_length", f"{cond}.tokenizer.model_max_length", max_length)
    else:
        x.same(f"{cond}.max_length")
    for key in ("device", "arch", "layer", "freeze"):
        x.same(f"{cond}.{key}")


def _map_model_options(x: Mapper, preset: dict) -> None:
    m = "model"
    for key in ("sd_locked", "only_mid_control", "control_key"):
        x.put(f"{m}.{key}", f"model.{key}", x.get(f"{m}.{key}"))
    x.put(f"{m}.text_embedding_dropout_rate", "model.proportion_empty_prompts",
          x.get(f"{m}.text_embedding_dropout_rate"))  # fmt: skip
    x.put(f"{m}.channels_last", "perf.channels_last", bool(x.get(f"{m}.channels_last")))
    x.put(f"{m}.inductor", "perf.compile", bool(x.get(f"{m}.inductor")))
    x.put(f"{m}.scale_factor", "model.first_stage_config.scaling_factor", x.get(f"{m}.scale_factor"))
    x.put(f"{m}.unet_config.use_checkpoint", "perf.gradient_checkpointing.unet_decoder",
          bool(x.get(f"{m}.unet_config.use_checkpoint")))  # fmt: skip
    kind = x.get(f"{m}.parameterization")
    if kind in PARAMETERIZATION:
        x.put(f"{m}.parameterization", "model.prediction_type", PARAMETERIZATION[kind])
    elif kind is not None:
        x.skip(f"{m}.parameterization", "ours predicts epsilon or v (model.prediction_type)")
    scheduler = preset["scheduler_config"]
    for key, ours in (("linear_start", "beta_start"), ("linear_end", "beta_end"), ("timesteps", "num_train_timesteps")):
        value = x.get(f"{m}.{key}")
        if value is not None and value != scheduler.get(ours):
            x.put(f"{m}.{key}", f"model.scheduler_config.{ours}", value)
        else:
            x.mapped(f"{m}.{key}", f"model.scheduler_config.{ours}")
    schedule = x.get(f"{m}.beta_schedule")
    if schedule in BETA_SCHEDULES:
        ours = BETA_SCHEDULES[schedule]
        if ours != scheduler.get("beta_schedule"):
            x.put(f"{m}.beta_schedule", "model.scheduler_config.beta_schedule", ours)
        x.mapped(f"{m}.beta_schedule", f"model.scheduler_config.beta_schedule={ours}")
    elif schedule is not None:
        x.skip(f"{m}.beta_schedule", "no diffusers schedule computes it")
    x.check(f"{m}.cosine_s", 8e-3, "diffusers' squaredcos_cap_v2 uses 0.008")
    betas = x.get(f"{m}.given_betas")
    if betas is not None:
        x.put(f"{m}.given_betas", "model.scheduler_config.trained_betas", list(betas))
    else:
        x.same(f"{m}.given_betas")
    x.check(f"{m}.scale_by_std", False, "true: NeMo computed the scale from the first batch; set "
            "model.first_stage_config.scaling_factor to the value it logged")  # fmt: skip
    x.check(f"{m}.num_timesteps_cond", 1, "a conditioning-timestep schedule (ldm) is not implemented")
    x.check(f"{m}.cond_stage_trainable", False, "true: ours keeps the text encoder locked")
    x.check(f"{m}.conditioning_key", "crossattn", "ours conditions the UNet on text by cross-attention only")
    x.check(f"{m}.loss_type", "l2", "ours trains with the mean squared error (l2)")
    x.check(f"{m}.original_elbo_weight", 0.0, "the ELBO (vlb) term is not implemented")
    x.check(f"{m}.l_simple_weight", 1.0, "ours weighs the simple loss 1")
    x.check(f"{m}.v_posterior", 0.0, "ours samples with diffusers' schedulers")
    x.check(f"{m}.use_positional_encodings", False, "positional encodings of the timestep input are not implemented")
    x.check(f"{m}.learn_logvar", False, "a learned loss variance is not implemented")
    x.check(f"{m}.logvar_init", 0.0, "a loss variance other than 1 is not implemented")
    x.check(f"{m}.cond_stage_forward", None, "a custom text-encoder call is not implemented")
    x.check(f"{m}.ckpt_path", None, "a NeMo ControlNet checkpoint is not read; start from the base "
            "(or model.control_stage_config.pretrained: a diffusers or original-layout ControlNet)")  # fmt: skip
    for key in ("ignore_keys", "load_only_unet", "concat_mode", "channels", "first_stage_key",
                "cond_stage_key", "precision", "resume_from_checkpoint"):  # fmt: skip
        if key == "resume_from_checkpoint":
            x.check(f"{m}.{key}", None, "a NeMo checkpoint cannot be resumed here")
        else:
            x.same(f"{m}.{key}")
