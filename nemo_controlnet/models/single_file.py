"""Stable Diffusion as one original-layout file (``.safetensors``, or ``.ckpt`` read with
``weights_only=True``): load it offline through diffusers' single-file converters with the
architecture from our configs, and write one for tools that want that layout.

A single file has no tokenizer: ``clip_tokenizer_from_bpe`` builds the CLIP tokenizer from the
CLIP BPE vocabulary file, found in an installed package that ships it (``clip-anytorch``:
``pip install --no-deps clip-anytorch``; its imports are never run) or given as a path.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import tempfile
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from hydra.utils import get_class
from safetensors.torch import save_file
from transformers import CLIPTokenizer, PretrainedConfig

from nemo_controlnet.io import atomic_path
from nemo_controlnet.models.formats import DTYPES, _resnet, load_state_dict_file, original_controlnet_key
from nemo_controlnet.models.tokenizers import byte_level_clip_tokenizer

log = logging.getLogger(__name__)

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
BPE_PACKAGES = (("clip", "bpe_simple_vocab_16e6.txt.gz"), ("open_clip", "bpe_simple_vocab_16e6.txt.gz"))

_CHECKPOINTS: dict[str, dict] = {}  # one read of a file serves all its components


def _checkpoint(path: str) -> dict:
    if path not in _CHECKPOINTS:
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.checkpoint: no file {path}")
        log.info("reading single-file checkpoint %s", path)
        _CHECKPOINTS[path] = load_state_dict_file(path)
    return _CHECKPOINTS[path]


def release_checkpoints() -> None:
    _CHECKPOINTS.clear()


def single_file_component(component: str, checkpoint: str, subfolder: str, config=None, **architecture):
    """One part of SD from a single file: ``component`` is the class, ``architecture`` (or a
    transformers ``config``) what our model config says it is; diffusers converts the weights."""
    cls = get_class(component)
    state = _checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / subfolder
        where.mkdir(parents=True)
        if isinstance(config, PretrainedConfig):
            config.save_pretrained(where)
            return create_diffusers_clip_model_from_ldm(
                cls, state, subfolder=subfolder, config=tmp, local_files_only=True
            )
        if not issubclass(cls, ModelMixin):
            raise TypeError(f"{component}: not a diffusers model or a transformers text encoder")
        (where / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **architecture}))
        return cls.from_single_file(state, config=tmp, subfolder=subfolder, local_files_only=True)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (the order fixes the first 512 token ids)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def find_bpe() -> Path | None:
    for package, name in BPE_PACKAGES:
        spec = importlib.util.find_spec(package)  # locates without importing (these import torchvision)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    return None


def clip_tokenizer_from_bpe(
    bpe_path: str | None = None, model_max_length: int = 77, pad_token: str = "<|endoftext|>", num_merges: int = 48894
) -> CLIPTokenizer:
    """The CLIP tokenizer Stable Diffusion uses, from the BPE merges file (vocabulary 49408).
    ``pad_token``: ``<|endoftext|>`` for SD 1.x, ``!`` for SD 2.x and SDXL's second tokenizer."""
    path = Path(bpe_path) if bpe_path else find_bpe()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "no CLIP BPE vocabulary: `pip install --no-deps clip-anytorch` (it ships bpe_simple_vocab_16e6.txt.gz), "
            "or set model.tokenizer_bpe=/path/to/bpe_simple_vocab_16e6.txt.gz"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : num_merges + 1]  # the first line is a version header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    log.info("CLIP tokenizer from %s: %d tokens", path, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)


def sd_clip_tokenizer(
    checkpoint: str | None = None,
    bpe_path: str | None = None,
    model_max_length: int = 77,
    pad_token: str = "<|endoftext|>",
) -> CLIPTokenizer:
    """The real CLIP tokenizer when its vocabulary is at hand; for random weights (no checkpoint)
    a byte-level stand-in will do, since no token means anything yet."""
    if bpe_path or find_bpe():
        return clip_tokenizer_from_bpe(bpe_path, model_max_length, pad_token)
    if checkpoint is None:
        log.info("no CLIP BPE vocabulary installed: byte-level tokenizer for the random-init architecture")
        return byte_level_clip_tokenizer(model_max_length)
    return clip_tokenizer_from_bpe(bpe_path, model_max_length, pad_token)  # raises, saying what to install


def component_from_node(node, checkpoint: str, subfolder: str):
    """A model config node (architecture) loaded from the single file instead of random init."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(node, resolve=True)
    target = kwargs.pop("_target_")
    kwargs.pop("_convert_", None)
    if "config" in kwargs:
        kwargs["config"] = instantiate(node.config)
    return single_file_component(target, checkpoint, subfolder, **kwargs)


def single_file_transformer(node, checkpoint: str):
    """A transformer (SD3, SD3.5, Flux.1) from one original-layout file, as its makers ship it: the
    architecture is the config node's, or, for a ``from_pretrained`` node (``local_sd3``, ``local_flux``),
    that directory's ``config.json``;
    diffusers' single-file converter maps the weights. The file is read safely (safetensors, or
    ``weights_only``). The file stays read for ``single_file_parts``; the caller releases it
    (``release_checkpoints``)."""
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(node, resolve=True)
    target = kwargs.pop("_target_")
    if target.endswith(".from_pretrained"):  # model.path: the architecture from the directory
        cls = get_class(target.rsplit(".", 1)[0])
        return cls.from_single_file(_checkpoint(checkpoint), config=kwargs["pretrained_model_name_or_path"],
                                    subfolder=kwargs.get("subfolder"), local_files_only=True)  # fmt: skip
    return component_from_node(node, checkpoint, "transformer")


# What an all-in-one transformer file may carry besides the transformer (Stability's SD3 / SD3.5 files with
# their VAE and text encoders; ComfyUI's Flux checkpoints): the VAE in the LDM layout, each text encoder in
# its transformers layout under a prefix.
PART_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                 "t5": "text_encoders.t5xxl.transformer."}  # fmt: skip
LDM_VAE_PREFIXES = (VAE_PREFIX, "vae.")


def single_file_parts(checkpoint: str, modules: dict[str, torch.nn.Module | None]) -> list[str]:
    """Load the parts of ``modules`` (``vae``, ``clip_l``, ``clip_g``, ``t5``: built from their config nodes,
    so the architecture is the config's) that the single file carries, in place; the names loaded. A part
    the file holds must fit whole: a missing, extra or misshapen weight is an error naming it. A CLIP-L
    without ``text_projection`` (SD3's files) gets the identity, as diffusers' loader gives it."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = _checkpoint(checkpoint)
    loaded = []
    for name, module in modules.items():
        if module is None:
            continue
        if name == "vae":
            if not any(k.startswith(LDM_VAE_PREFIXES) for k in state):
                continue
            part = convert_ldm_vae_checkpoint(state, dict(module.config))
        else:
            prefix = PART_PREFIXES[name]
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                continue
            projection = getattr(module, "text_projection", None)
            if name == "clip_l" and projection is not None and "text_projection.weight" not in part:
                if projection.weight.shape[0] != projection.weight.shape[1]:
                    raise ValueError(f"model.checkpoint={checkpoint}: its CLIP-L has no text_projection and this "
                                     f"model's is {tuple(projection.weight.shape)}, not square")  # fmt: skip
                part["text_projection.weight"] = torch.eye(projection.weight.shape[0])
        load_part(module, part, f"model.checkpoint={checkpoint} ({name})")
        loaded.append(name)
    return loaded


def load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``state`` into ``module`` in place, every weight of the module given (tied embeddings and
    non-persistent buffers aside), none unknown, each of the module's shape; otherwise an error naming them."""
    own = module.state_dict()
    tied = {"encoder.embed_tokens.weight"}  # T5: the shared embedding
    missing = sorted(k for k in own.keys() - state.keys() if k not in tied and not k.endswith("position_ids"))
    unexpected = sorted(k for k in state.keys() - own.keys() if not k.endswith("position_ids"))
    if missing or unexpected:
        raise ValueError(f"{source}: does not fit this model's architecture (missing {missing[:4]}"
                         f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{'...' if len(unexpected) > 4 else ''})")  # fmt: skip
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{source}: {key} is {tuple(value.shape)} in the file, {tuple(own[key].shape)} in "
                             "this model's architecture")  # fmt: skip
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# -- writing -------------------------------------------------------------------------------


def original_unet_key(key: str, layers_per_block: int) -> str:
    """A diffusers UNet key in the original layout: the encoder as the ControlNet's, plus decoder."""
    parts = key.split(".")
    if parts[0] == "conv_norm_out":
        return "out.0." + parts[-1]
    if parts[0] == "conv_out":
        return "out.2." + parts[-1]
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv.<leaf>: after the block's last layer
            return f"output_blocks.{i * (layers_per_block + 1) + layers_per_block}.{{up}}.conv.{parts[-1]}"
        j, rest = int(parts[3]), ".".join(parts[4:])
        block = i * (layers_per_block + 1) + j
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    return original_controlnet_key(key, layers_per_block, hint_blocks=0)


def original_unet_state(unet) -> dict[str, torch.Tensor]:
    lpb = unet.config.layers_per_block
    has_attention = [hasattr(b, "attentions") for b in unet.up_blocks]
    out = {}
    for key, value in unet.state_dict().items():
        name = original_unet_key(key, lpb)
        if "{up}" in name:
            name = name.replace("{up}", "2" if has_attention[int(key.split(".")[1])] else "1")
        out[UNET_PREFIX + name] = value
    return out


def original_vae_state(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        k = key
        for side in ("encoder", "decoder"):
            k = k.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            k = k.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
            k = k.replace(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")
            k = k.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
        for i in range(n):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")  # reversed order
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.")
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in k:
            for new, old in (
                ("group_norm", "norm"),
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ):
                k = k.replace(f".attn_1.{new}.", f".attn_1.{old}.")
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[VAE_PREFIX + k] = value
    return out


def _text_model_keys(text_encoder) -> dict[str, torch.Tensor]:
    """HF CLIP keys with the ``text_model.`` nesting the original layouts use (transformers >= 5.6
    flattens CLIPTextModel)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
            for k, v in text_encoder.state_dict().items()}  # fmt: skip


def openclip_state(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in OpenCLIP's layout (SD 2.x, SDXL's second encoder): q, k and v packed
    into one in_proj, the projection transposed."""
    state = _text_model_keys(text_encoder)
    out = {
        prefix + "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        prefix + "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        prefix + "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    state.pop("text_model.embeddings.position_ids", None)
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat(
                [state.pop(src + f"self_attn.{p}_proj.{leaf}") for p in "qkv"]
            )
            out[dst + f"attn.out_proj.{leaf}"] = state.pop(src + f"self_attn.out_proj.{leaf}")
            out[dst + f"ln_1.{leaf}"] = state.pop(src + f"layer_norm1.{leaf}")
            out[dst + f"ln_2.{leaf}"] = state.pop(src + f"layer_norm2.{leaf}")
            out[dst + f"mlp.c_fc.{leaf}"] = state.pop(src + f"mlp.fc1.{leaf}")
            out[dst + f"mlp.c_proj.{leaf}"] = state.pop(src + f"mlp.fc2.{leaf}")
    if state:
        raise KeyError(f"text encoder weights with no OpenCLIP name: {sorted(state)[:5]}")
    return out


LAYOUTS = ("sd1", "sd2", "sdxl")


def export_base_single_file(
    unet, vae, text_encoder, path: str | Path, dtype: str = "fp32", layout: str = "sd1", text_encoder_2=None
) -> Path:
    """Stable Diffusion as one original-layout ``.safetensors`` file. ``layout``: ``sd1`` (OpenAI
    CLIP text encoder), ``sd2`` (OpenCLIP text encoder), ``sdxl`` (both, as SDXL's conditioner)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {LAYOUTS}")
    state = {**original_unet_state(unet), **original_vae_state(vae)}
    if layout == "sd1":
        state.update({CLIP_PREFIX + k: v for k, v in _text_model_keys(text_encoder).items()})
    elif layout == "sd2":
        state.update(openclip_state(text_encoder, "cond_stage_model.model."))
    else:
        if text_encoder_2 is None:
            raise ValueError("layout=sdxl needs text_encoder_2")
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in _text_model_keys(text_encoder).items()})
        state.update(openclip_state(text_encoder_2, "conditioner.embedders.1.model."))
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "exported_by": "nemo_controlnet"})
    log.info("wrote single-file base %s (%s layout, %d tensors, %s)", path, layout, len(state), dtype)
    return path
