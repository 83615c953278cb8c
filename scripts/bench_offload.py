"""Adapter mode: peak memory and step time with the frozen ControlNet resident, offloaded by
accelerate, or swapped by hand, and its residuals on the device or in pinned host memory.

    python scripts/bench_offload.py --model sd15 --resolution 512 --batch-size 8 --steps 10      # GPU
    python scripts/bench_offload.py --model tiny --resolution 64 --batch-size 2 --steps 2 --warmup 1   # CPU smoke

Random weights at the real architecture's size; a LoRA (rank 16) on the UNet trains under the
ControlNet, bf16 on CUDA. Prints one row per strategy: step time, samples/s, peak device memory. Then, for
the resident ControlNet: the ControlNet forward's time, each residual scale's size and host->device copy time
(on a CPU: a host copy, marked so), and the step with precomputed residuals (controlnet_reroute=precompute:
residuals, latents, timestep and noise read from the batch) beside the on-the-fly one.
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
    channels = int(module.unet.config.in_channels)  # 4 (SD), 3 (the fill50k toy base's pixel autoencoder)
    batch = {"latents": torch.randn(n, channels, res // factor, res // factor, device=device), "text_embeds": states,
             "hint": torch.rand(n, 3, res, res, device=device), "caption": ["a red circle"] * n}  # fmt: skip
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step = timed_steps(module, optimizer, batch, autocast, args, cuda)
    row = {"offload": offload, "storage": storage, "step_s": step, "samples_per_s": n / step,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip
    if offload == "none":
        row.update(residual_costs(module, optimizer, batch, autocast, args, device))
    del module, optimizer, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def timed_steps(module, optimizer, batch, autocast, args, cuda: bool) -> float:
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
    return sum(times) / len(times)


def _timed(fn, cuda: bool, repeat: int = 3) -> float:
    fn()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def residual_costs(module, optimizer, batch, autocast, args, device) -> dict:
    """The resident ControlNet's forward time, per-scale residual size and host->device copy time, and the
    step with the residuals precomputed (in the batch, as data/residuals.py attaches them) vs on the fly."""
    cuda = device.type == "cuda"
    n = len(batch["caption"])
    latents = batch["latents"]
    timesteps = torch.randint(0, 1000, (n,), device=device)
    noise = torch.randn_like(latents)
    noisy = module.noise_scheduler.add_noise(latents, noise, timesteps)
    states = batch["text_embeds"]

    def forward():
        with autocast, torch.no_grad():
            cond = {"encoder_hidden_states": states, "added_cond_kwargs": None}
            return module.residuals(module.family, noisy, timesteps, cond, batch["hint"], 1.0)

    compute_s = _timed(forward, cuda)
    down, mid = forward()
    scales = []
    for name, r in zip([f"down_{i}" for i in range(len(down))] + ["mid"], (*down, mid), strict=True):
        host = r.to("cpu", dtype=torch.float16)
        host = host.pin_memory() if cuda else host
        copy = (lambda h=host: h.to(device, non_blocking=True)) if cuda else (lambda h=host: h.clone())
        kind = "host->device" if cuda else "host copy (no device)"
        scales.append({"scale": name, "shape": tuple(r.shape), "mib": host.numel() * host.element_size() / 2**20,
                       "transfer_s": _timed(copy, cuda), "kind": kind})  # fmt: skip
    stored = {**batch, "residual_state": ["hit"] * n, "residual_latents": latents, "residual_noise": noise,
              "residual_timestep": timesteps, "residual_mid": mid.to(torch.float16),
              **{f"residual_down_{i}": d.to(torch.float16) for i, d in enumerate(down)}}  # fmt: skip
    precomputed = timed_steps(module, optimizer, stored, autocast, args, cuda)
    return {"controlnet_forward_s": compute_s, "scales": scales, "precomputed_step_s": precomputed}


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
        widths = tuple(cfg.model.control_stage_config.conditioning_embedding_out_channels)  # hint pixels -> latent grid
        ControlNetModel.from_unet(
            build_stack(cfg.model).unet, conditioning_embedding_out_channels=widths
        ).save_pretrained(tmp)
        for offload, storage in CONFIGS:
            if storage == "cpu_pinned" and device.type != "cuda" and offload != "manual_swap":
                continue
            rows.append(run(args.model, tmp, offload, storage, args, device))
    print(f"{'offload':<12} {'residuals':<11} {'step ms':>9} {'samples/s':>10} {'peak GiB':>9}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(f"{r['offload']:<12} {r['storage']:<11} {r['step_s'] * 1e3:>9.1f} {r['samples_per_s']:>10.1f} {peak:>9}")
    resident = next((r for r in rows if "scales" in r), None)
    if resident is not None:
        print(f"\nControlNet forward (batch {args.batch_size}): {resident['controlnet_forward_s'] * 1e3:.1f} ms")
        print(f"{'scale':<8} {'shape':<22} {'MiB fp16':>9} {'copy ms':>9}  kind")
        for s in resident["scales"]:
            print(f"{s['scale']:<8} {str(s['shape']):<22} {s['mib']:>9.3f} {s['transfer_s'] * 1e3:>9.3f}  {s['kind']}")
        total = sum(s["transfer_s"] for s in resident["scales"])
        print(f"{'all':<8} {'':<22} {sum(s['mib'] for s in resident['scales']):>9.3f} {total * 1e3:>9.3f}")
        print(f"\n{'residuals':<22} {'step ms':>9} {'samples/s':>10}")
        steps = {"on the fly (always)": resident["step_s"], "precomputed": resident["precomputed_step_s"]}
        for name, step in steps.items():
            print(f"{name:<22} {step * 1e3:>9.1f} {args.batch_size / step:>10.1f}")
    return rows


if __name__ == "__main__":
    main()
