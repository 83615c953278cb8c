"""The locked Stable Diffusion parts: build them from config, freeze them, place them.

Each component is a Hydra ``_target_`` node: a diffusers/transformers class for a random-init
architecture (seeded, so the same config always gives the same weights) or a ``from_pretrained``
call on a local directory.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import CLIPTokenizer

from nemo_controlnet.config import validate_model_config
from nemo_controlnet.models.formats import verify_weights
from nemo_controlnet.models.single_file import component_from_node, release_checkpoints
from nemo_controlnet.models.tokenizers import byte_level_clip_tokenizer  # noqa: F401  (run configs name it here)

log = logging.getLogger(__name__)

@dataclass
class LockedStack:
    """The parts of Stable Diffusion a ControlNet is trained over."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: CLIPTokenizer
    noise_scheduler: object
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second (projected) text encoder
    tokenizer_2: CLIPTokenizer | None = None

    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_prompts(self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2, captions)


def _token_ids(tokenizer: CLIPTokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def encode_prompts(
    text_encoder: torch.nn.Module,
    tokenizer: CLIPTokenizer,
    text_encoder_2: torch.nn.Module | None,
    tokenizer_2: CLIPTokenizer | None,
    captions: list[str],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder hidden states, pooled embedding or None), on the encoders' device. SDXL, as its
    pipelines do: both encoders' penultimate hidden states side by side, pooled from the second
    (projected) one. Training and ``controlnet-prep mode=encode`` share this."""
    device = next(text_encoder.parameters()).device
    if text_encoder_2 is None:
        return text_encoder(_token_ids(tokenizer, captions, device))[0], None
    states, pooled = [], None
    for encoder, tok in ((text_encoder, tokenizer), (text_encoder_2, tokenizer_2)):
        out = encoder(_token_ids(tok, captions, device), output_hidden_states=True)
        pooled = out[0]
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


def encoder_fingerprint(vae: torch.nn.Module, *text_encoders: torch.nn.Module) -> str:
    """What cached latents and text embeddings depend on: the VAE and the text encoders."""
    return fingerprint(vae, *text_encoders)


def instantiate_seeded(node: DictConfig, seed: int, name: str):
    """A part from its config node; seeding right before each makes its random init independent of the
    others' order."""
    torch.manual_seed(seed)
    obj = instantiate(node)
    if isinstance(obj, torch.nn.Module):
        n = sum(p.numel() for p in obj.parameters())
        log.info("built %s: %s, %.2fM parameters", name, type(obj).__name__, n / 1e6)
    return obj


def build_stack(model_cfg: DictConfig) -> LockedStack:
    """The locked parts: random init (seeded) from the architecture nodes, or ``from_pretrained`` nodes,
    or, with ``model.checkpoint`` set, every part read from that one original-layout file."""
    validate_model_config(OmegaConf.create({"model": model_cfg}))
    seed = int(model_cfg.seed)
    cond = model_cfg.cond_stage_config
    checkpoint = model_cfg.get("checkpoint")

    def part(node, offset: int, name: str):
        if checkpoint:
            return component_from_node(node, checkpoint, name)
        return instantiate_seeded(node, seed + offset, name)

    noise_scheduler = instantiate(model_cfg.scheduler_config)
    if model_cfg.get("prediction_type"):
        noise_scheduler.register_to_config(prediction_type=model_cfg.prediction_type)
    second = cond.get("text_encoder_2")
    if model_cfg.get("path"):  # a diffusers directory; one we exported carries SHA256SUMS
        verify_weights(model_cfg.path)
    # Tokenizers first: a missing vocabulary fails before gigabytes of weights are read.
    tokenizer = instantiate(cond.tokenizer)
    tokenizer_2 = instantiate(cond.tokenizer_2) if second else None
    try:
        return LockedStack(
            unet=part(model_cfg.unet_config, 0, "unet"),
            vae=part(model_cfg.first_stage_config, 1, "vae"),
            text_encoder=part(cond.text_encoder, 2, "text_encoder"),
            tokenizer=tokenizer,
            noise_scheduler=noise_scheduler,
            text_encoder_2=part(second, 3, "text_encoder_2") if second else None,
            tokenizer_2=tokenizer_2,
        )
    finally:
        release_checkpoints()


def freeze(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A locked part: no gradients, eval mode, stored and run in the compute dtype."""
    module.requires_grad_(False)
    module.eval()
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module


def fingerprint(*modules: torch.nn.Module) -> str:
    """A cheap identity of weights (a strided sample of every tensor), to catch a base-model mismatch.

    A ControlNet trained over one base and resumed, sampled or exported over another is the silent
    misalignment this guards against.
    """
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            if not flat.is_meta:  # (a module built on the meta device, for counting: shapes only)
                h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def compute_dtype(precision: str | int) -> torch.dtype:
    """The dtype the locked parts run in, from Lightning's precision string."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float32
