"""Memory per GPU of a Flux.1 ControlNet training step (model=flux, trainer=fsdp): an estimate.

    python scripts/flux_memory.py                                  # the table in docs/scaling.md
    python scripts/flux_memory.py --gpus 16 --resolution 512 --batch 4 --measure-tokens 576

What is counted and what is measured:
- Parameters: the real architectures of ``model=flux`` built on the meta device (no memory, no weights).
- The locked parts (transformer, T5-XXL, CLIP-L, VAE) are bf16 copies on every GPU (FSDP ignores them,
  training/distributed.py); the ControlNet's fp32 weights, gradients and AdamW moments (16 bytes a
  parameter) are sharded over ``--gpus`` (FULL_SHARD), plus two gathered bf16 units (one running, one
  prefetched).
- Activations: the bytes autograd saves for backward in one double and one single block of Flux's real
  width (3072), measured on this CPU in bf16 at ``--measure-tokens`` tokens and scaled linearly to the
  step's tokens (SDPA's flash kernels save O(tokens); every other saved tensor is per token). Weights
  that autograd saves are not counted (they are the parameters). Gradients reach the ControlNet through
  every base block after its first residual, so the base's activations are kept too.
  With ``perf.gradient_checkpointing`` (controlnet and unet_decoder, which for Flux is every block) only
  each block's inputs stay, plus one block's saved tensors while it is recomputed.
- Training on cached text embeddings (controlnet-prep mode=encode) releases T5 and CLIP before the first
  step (perf.release_text_encoders): the last total leaves them out.
- Not modelled: the CUDA context and allocator fragmentation (add a few GiB), the VAE and T5 running
  in the step (their activations, without grad, are freed at once; cache them with controlnet-prep
  mode=encode and they do not run), NCCL buffers.
"""

from __future__ import annotations

import argparse
import copy

import torch
from hydra import compose, initialize_config_module

from nemo_controlnet.models.families import family_for

GIB = 2**30


def counts(model: str) -> tuple[dict, object, object]:
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}"])
    family = family_for(cfg.model)
    with torch.device("meta"):
        stack = family.build_stack(cfg.model)
        controlnet = family.make_controlnet(cfg.model, stack)

    def n(m):
        return sum(p.numel() for p in m.parameters())

    sizes = {"transformer": n(stack.unet), "t5": n(stack.text_encoder_2), "clip": n(stack.text_encoder),
             "vae": n(stack.vae), "controlnet": n(controlnet)}  # fmt: skip
    return sizes, stack, controlnet


def block_and_inputs(block: torch.nn.Module, tokens_img: int, tokens_txt: int, dim: int, device="cpu"):
    """A real-size copy of a (meta) Flux block in bf16 on ``device``, random weights that do not train
    (locked or not, the saved activations are the same), and its inputs at these token counts."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    block = copy.deepcopy(block).to_empty(device=device)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_(False)
    block = block.to(torch.bfloat16)
    ids = torch.zeros(tokens_txt + tokens_img, 3)
    ids[tokens_txt:, 1] = torch.arange(tokens_img) // 64
    ids[tokens_txt:, 2] = torch.arange(tokens_img) % 64
    rope = tuple(r.to(device) for r in FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids))
    inputs = {
        "hidden_states": torch.randn(1, tokens_img, dim, dtype=torch.bfloat16, device=device, requires_grad=True),
        "encoder_hidden_states": torch.randn(1, tokens_txt, dim, dtype=torch.bfloat16, device=device,
                                             requires_grad=True),  # fmt: skip
        "temb": torch.randn(1, dim, dtype=torch.bfloat16, device=device),
        "image_rotary_emb": rope,
    }
    return block, inputs


def allocated_bytes(block: torch.nn.Module, tokens_img: int, tokens_txt: int, dim: int) -> int:
    """On CUDA: the memory one block's forward leaves allocated for its backward (its outputs excluded)."""
    block, inputs = block_and_inputs(block, tokens_img, tokens_txt, dim, "cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = block(**inputs)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    outputs = sum(o.untyped_storage().nbytes() for o in (out if isinstance(out, tuple) else (out,)))
    return after - before - outputs


def saved_bytes(block: torch.nn.Module, tokens_img: int, tokens_txt: int, dim: int, heads: int) -> int:
    """Bytes autograd saves for one block's backward (weights excluded), bf16 on the CPU."""
    block, inputs = block_and_inputs(block, tokens_img, tokens_txt, dim)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(**inputs)
    return sum(seen.values())


def block_estimates(transformer, img_tokens: int, text_tokens: int, measure_tokens: int) -> tuple[float, float]:
    """Saved bytes per sample of one double and one single block at ``img_tokens + text_tokens``: measured on
    the CPU at ``measure_tokens`` (image and text in the step's proportion), scaled linearly."""
    t = transformer
    dim, heads = t.config.num_attention_heads * t.config.attention_head_dim, t.config.num_attention_heads
    tokens = img_tokens + text_tokens
    m_txt = max(1, measure_tokens * text_tokens // tokens)
    scale = tokens / measure_tokens
    return tuple(saved_bytes(block, measure_tokens - m_txt, m_txt, dim, heads) * scale
                 for block in (t.transformer_blocks[0], t.single_transformer_blocks[0]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="flux")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="per GPU")
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (model.family.max_sequence_length)")
    parser.add_argument("--measure-tokens", type=int, default=576, help="image+text tokens of the CPU measurement")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    sizes, stack, controlnet = counts(args.model)
    t = stack.unet
    dim = t.config.num_attention_heads * t.config.attention_head_dim
    img_tokens = (args.resolution // 16) ** 2  # 8x VAE, then 2x2 packing
    tokens = img_tokens + args.text_tokens
    scale = tokens / args.measure_tokens
    double, single = block_estimates(t, img_tokens, args.text_tokens, args.measure_tokens)
    n_double = len(t.transformer_blocks) + len(controlnet.transformer_blocks)
    n_single = len(t.single_transformer_blocks) + len(controlnet.single_transformer_blocks)
    full = n_double * double + n_single * single
    boundary = (n_double + n_single) * tokens * dim * 2  # each checkpointed block's inputs, bf16
    checkpointed = boundary + max(double, single)

    locked = 2 * (sizes["transformer"] + sizes["t5"] + sizes["clip"] + sizes["vae"])
    text = 2 * (sizes["t5"] + sizes["clip"])  # perf.release_text_encoders drops them on cached embeddings
    state = 16 * sizes["controlnet"] / args.gpus
    unit = max(sum(p.numel() for p in b.parameters()) for b in [*controlnet.transformer_blocks,
                                                                 *controlnet.single_transformer_blocks])  # fmt: skip
    gathered = 2 * 2 * unit
    print(f"model={args.model}: transformer {sizes['transformer'] / 1e6:.2f}M, "
          f"ControlNet {sizes['controlnet'] / 1e6:.2f}M "
          f"({len(controlnet.transformer_blocks)} double, {len(controlnet.single_transformer_blocks)} single blocks), "
          f"T5 {sizes['t5'] / 1e6:.2f}M, CLIP {sizes['clip'] / 1e6:.2f}M, VAE {sizes['vae'] / 1e6:.2f}M")  # fmt: skip
    print(f"{args.resolution} px: {img_tokens} image + {args.text_tokens} text tokens; batch {args.batch} per GPU, "
          f"{args.gpus} GPUs (FULL_SHARD)")  # fmt: skip
    print(f"measured saved activations per block per sample: double {double / GIB:.3f} GiB, single "
          f"{single / GIB:.3f} GiB (at {args.measure_tokens} tokens on the CPU, scaled x{scale:.2f})")  # fmt: skip
    rows = [
        ("locked parts, bf16, replicated", locked),
        ("  of which the text encoders, T5-XXL and CLIP-L (released on cached text embeddings)", text),
        (f"ControlNet weights + grads + AdamW (fp32), / {args.gpus}", state),
        ("two gathered ControlNet units (bf16)", gathered),
        ("activations, no checkpointing", full * args.batch),
        ("activations, every block checkpointed", checkpointed * args.batch),
    ]
    print("| | GiB |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value / GIB:.1f} |")
    base = locked + state + gathered
    print(f"| **total per GPU, no checkpointing** | **{(base + full * args.batch) / GIB:.1f}** |")
    print(f"| **total per GPU, checkpointed** | **{(base + checkpointed * args.batch) / GIB:.1f}** |")
    print(f"| **total per GPU, checkpointed, cached text embeddings** | "
          f"**{(base - text + checkpointed * args.batch) / GIB:.1f}** |")  # fmt: skip


if __name__ == "__main__":
    main()
