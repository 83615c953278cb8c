"""Adapter mode: peak memory and step time with the frozen ControlNet resident, offloaded by
accelerate, or swapped by hand, and its residuals on the device or in pinned host memory.

    python scripts/bench_offload.py --model sd15 --resolution 512 --batch-size 8 --steps 10      # GPU
    python scripts/bench_offload.py --model tiny --resolution 64 --batch-size 2 --steps 2 --warmup 1   # CPU smoke

Random weights at the real architecture's size; a LoRA (rank 16) on the UNet trains under the
ControlNet, bf16 on CUDA. Prints one row per strategy: step time, samples/s, peak device memory.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import torch
from diffusers import ControlNetModel
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from nemo_controlnet.models.stack import build_stack
from nemo_controlnet.training.module import ControlNetModule

CONFIGS = [("none", "gpu"), ("accelerate", "gpu"), ("manual_swap", "gpu"), ("manual_swap", "cpu_pinned")]


def run(model: str, controlnet_dir: str, offload: str, storage: str, args, device) -> dict:
    cuda = device.type == "cuda"
    overrides = [f"model={model}", "+experiment=lora_frozen_controlnet", f"controlnet.name_or_path={controlnet_dir}",
                 f"controlnet.offload_strategy={offload}", f"controlnet.residual_storage={storage}",
                 f"controlnet.dev_mode={str(not cuda).lower()}", "model.proportion_empty_prompts=0.0"]  # fmt: skip
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    OmegaConf.resolve(cfg)
    precision = "bf16-mixed" if cuda else "32"
    module = ControlNetModule(cfg.model, cfg.optim, precision, adapter_cfg=cfg.adapter, controlnet_cfg=cfg.controlnet)
    module.controlnet.to("cpu")
    for name in ("unet", "vae", "text_encoder"):
        getattr(module, name).to(device)
    module.residuals.place(device)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    n, res = args.batch_size, args.resolution
    factor = 2 ** (len(module.vae.config.block_out_channels) - 1)
    with torch.no_grad():
        states, _ = module.encode_prompts(["a red circle"] * n)
    batch = {"latents": torch.randn(n, 4, res // factor, res // factor, device=device), "text_embeds": states,
             "hint": torch.rand(n, 3, res, res, device=device), "caption": ["a red circle"] * n}  # fmt: skip
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast:
            loss = module.diffusion_loss(dict(batch), drop_captions=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = sum(times) / len(times)
    row = {"offload": offload, "storage": storage, "step_s": step, "samples_per_s": n / step,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip
    del module, optimizer, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={args.model}"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:  # a "pretrained" ControlNet of the base's architecture
        ControlNetModel.from_unet(build_stack(cfg.model).unet).save_pretrained(tmp)
        for offload, storage in CONFIGS:
            if storage == "cpu_pinned" and device.type != "cuda" and offload != "manual_swap":
                continue
            rows.append(run(args.model, tmp, offload, storage, args, device))
    print(f"{'offload':<12} {'residuals':<11} {'step ms':>9} {'samples/s':>10} {'peak GiB':>9}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(f"{r['offload']:<12} {r['storage']:<11} {r['step_s'] * 1e3:>9.1f} {r['samples_per_s']:>10.1f} {peak:>9}")
    return rows


if __name__ == "__main__":
    main()
