"""Training-step throughput: our step against a baseline step written the way diffusers'
``train_controlnet.py`` trains (fp32 ControlNet under autocast, online VAE and text encoding, plain
AdamW, no compile, no channels_last, no TF32), in one process, on the same batch.

    python scripts/bench_train.py --model sd15 --resolution 512 --batch-size 16 --steps 30 --compile   # GPU
    python scripts/bench_train.py --model tiny --resolution 64 --batch-size 4 --steps 3 --warmup 1      # CPU smoke

Prints samples/s, step time, peak memory, TFLOP/s and MFU (model FLOPs per sample counted once with
torch.utils.flop_counter; peak from the GPU model, H100 SXM bf16 dense 989 TFLOP/s) for: baseline,
ours with online encoding, ours with cached latents and text embeddings; and the speed-ups.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from nemo_controlnet.training.callbacks import peak_tflops
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.perf import apply_performance

WORDS = "a red circle on a blue background with soft light and sharp edges".split()


def build(model: str, precision: str, device: torch.device) -> ControlNetModule:
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", "model.proportion_empty_prompts=0.0"])
    torch.manual_seed(0)
    return ControlNetModule(cfg.model, cfg.optim, precision).to(device).train()


def make_batch(module: ControlNetModule, batch_size: int, resolution: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    captions = [" ".join(WORDS[i % len(WORDS) :] + WORDS[: i % len(WORDS)]) for i in range(batch_size)]
    return {
        "image": (torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1).to(device),
        "hint": torch.rand(batch_size, 3, resolution, resolution, generator=g).to(device),
        "caption": captions,
    }


def cache(module: ControlNetModule, batch: dict, autocast) -> dict:
    """The batch as prep would store it: latents and text embeddings instead of image and caption."""
    with torch.no_grad(), autocast():
        latents = module.vae.encode(batch["image"].to(module.locked_dtype)).latent_dist.sample()
        states, pooled = module.encode_prompts(batch["caption"])
    cached = {"latents": latents.float() * module.vae.config.scaling_factor, "text_embeds": states,
              "hint": batch["hint"], "caption": batch["caption"]}  # fmt: skip
    if pooled is not None:
        cached["pooled_text_embeds"] = pooled
    return cached


def run(module, batch, optimizer, autocast, steps: int, warmup: int, device) -> dict:
    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = module.diffusion_loss(dict(batch))
        loss.backward()
        optimizer.step()

    for _ in range(warmup):  # compilation, allocator growth, cuDNN autotuning
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    n = len(batch["caption"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"samples_per_s": n / seconds, "step_ms": seconds * 1e3, "peak_gib": peak}


def flops_per_sample(module, batch, autocast) -> float:
    with torch.random.fork_rng(devices=[module.device] if module.device.type == "cuda" else []):
        with FlopCounterMode(display=False) as counter, autocast():
            module.diffusion_loss(dict(batch)).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch["caption"])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="regional torch.compile in our step")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in our step")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16-mixed" if device.type == "cuda" else "32"
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    peak = peak_tflops(args.peak_tflops)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"model {args.model}, {args.resolution}px, batch {args.batch_size}, {precision}")  # fmt: skip
    rows = []
    for name in ("baseline", "ours online", "ours cached"):
        module = build(args.model, precision, device)
        batch = make_batch(module, args.batch_size, args.resolution, device)
        params = [p for p in module.parameters() if p.requires_grad]
        if name == "baseline":
            optimizer = torch.optim.AdamW(params, lr=1e-5)
        else:
            ckpt = {"controlnet": args.checkpointing, "unet_decoder": args.checkpointing}
            perf = {"channels_last": "auto", "tf32": True, "compile": args.compile, "gradient_checkpointing": ckpt}
            apply_performance(module, OmegaConf.create(perf), device.type)
            optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda" or None)
            if name == "ours cached":
                batch = cache(module, batch, autocast)
            if module.channels_last:
                batch = module.on_after_batch_transfer(batch, 0)
        row = {"config": name, **run(module, batch, optimizer, autocast, args.steps, args.warmup, device)}
        flops = flops_per_sample(module, batch, autocast)
        row["tflops"] = flops * row["samples_per_s"] / 1e12
        row["mfu"] = row["tflops"] / peak if peak else float("nan")
        rows.append(row)
        print(f"{name:>12} | {row['samples_per_s']:8.2f} samples/s | {row['step_ms']:8.1f} ms/step | "
              f"peak {row['peak_gib']:6.2f} GiB | {row['tflops']:7.2f} TFLOP/s | MFU {row['mfu']:.3f}")  # fmt: skip
        del module, optimizer, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["samples_per_s"]
    for row in rows[1:]:
        print(f"{row['config']}: {row['samples_per_s'] / base:.2f}x the baseline")
    return rows


if __name__ == "__main__":
    main()
