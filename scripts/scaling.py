"""Data-parallel scaling estimate for ControlNet training: gradient bytes, all-reduce time on NVLink
and on InfiniBand, and scaling efficiency at 8, 64 and 512 GPUs.

    python scripts/scaling.py                                   # estimates from counted FLOPs
    python scripts/scaling.py --step-ms sd15=210 sdxl=900       # with step times measured on the GPU

What is counted and what is assumed:
- Trainable parameters and model FLOPs per sample (forward and backward counted separately with
  torch.utils.flop_counter) come from the real architectures, built on the meta device (no
  memory, no weights), with cached latents (the VAE encoder and text encoders are not in the step).
- The step time is ``--step-ms`` when given (measure it with scripts/bench_train.py); otherwise it
  is FLOPs x batch / (MFU x peak): an estimate, labelled as such in the output.
- All-reduce: ring, 2 (N-1)/N x bytes / bus bandwidth. Bus bandwidths are assumptions (flags):
  NVLink within a node, one 400 Gb/s InfiniBand NIC per GPU across nodes.
- Overlap: DDP reduces gradient buckets while backward runs. ControlNet gradients appear only
  during the ControlNet's own backward (about twice its forward FLOPs; the UNet decoder's backward
  comes first and produces none), so at most that long is hidden. The table shows that case and
  the no-overlap bound.
"""

from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_module
from torch.utils.flop_counter import FlopCounterMode

from nemo_controlnet.training.module import ControlNetModule

MODELS = {"sd15": 512, "sdxl": 1024}
GPUS = (8, 64, 512)


def count(model: str, resolution: int) -> dict:
    """Trainable parameters and forward/backward FLOPs per sample of one training step (meta device)."""
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", "model.proportion_empty_prompts=0.0"])
    with torch.device("meta"):
        module = ControlNetModule(cfg.model, cfg.optim)  # fp32: FLOPs do not depend on the dtype
        latent = resolution // 8
        text = module.unet.config.cross_attention_dim
        batch = {
            "latents": torch.randn(1, 4, latent, latent),
            "text_embeds": torch.randn(1, 77, text),
            "hint": torch.rand(1, 3, resolution, resolution),
            "caption": ["x"],
        }
        if module.text_encoder_2 is not None:
            batch["pooled_text_embeds"] = torch.randn(1, module.text_encoder_2.config.projection_dim)
            batch["original_size"] = torch.tensor([[resolution, resolution]])
            batch["crop_top_left"] = torch.tensor([[0, 0]])
        with FlopCounterMode(display=False) as forward:
            loss = module.diffusion_loss(batch, drop_captions=False)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    params = sum(p.numel() for p in module.controlnet.parameters() if p.requires_grad)
    controlnet = sum(forward.get_flop_counts()[type(module.controlnet).__name__].values())
    return {"params": params, "forward": forward.get_total_flops(), "backward": backward.get_total_flops(),
            "controlnet_forward": controlnet}  # fmt: skip


def allreduce_s(num_bytes: float, gpus: int, busbw_gbs: float) -> float:
    return 2 * (gpus - 1) / gpus * num_bytes / (busbw_gbs * 1e9)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", nargs="+", default=["sd15=16", "sdxl=8"], help="per-GPU batch, model=N")
    parser.add_argument("--step-ms", nargs="*", default=[], help="measured step times, model=ms")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed MFU for estimated step times")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    parser.add_argument("--nvlink-gbs", type=float, default=450.0, help="NCCL all-reduce bus bandwidth in a node")
    parser.add_argument("--ib-gbs", type=float, default=40.0, help="bus bandwidth across nodes (400 Gb/s per GPU)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--grad-bytes", type=int, default=2, help="2: bf16 all-reduce (trainer=ddp_bf16); 4: fp32")
    args = parser.parse_args(argv)
    batch = {k: int(v) for k, v in (s.split("=") for s in args.batch)}
    measured = {k: float(v) / 1e3 for k, v in (s.split("=") for s in args.step_ms)}
    rows = []
    for model in args.models:
        resolution = MODELS[model]
        c = count(model, resolution)
        flops = c["forward"] + c["backward"]
        n = batch[model]
        if model in measured:
            step, source = measured[model], "measured"
        else:
            step, source = flops * n / (args.mfu * args.peak_tflops * 1e12), f"estimated at {args.mfu:.0%} MFU"
        # Gradients to reduce appear only while the ControlNet's backward runs (about twice its
        # forward); the UNet decoder's backward before it produces no gradient to reduce.
        backward_s = step * 2 * c["controlnet_forward"] / flops
        grad_bytes = c["params"] * args.grad_bytes
        print(f"\n{model} at {resolution}px, batch {n}/GPU: ControlNet {c['params'] / 1e6:.2f}M trainable, "
              f"gradients {grad_bytes / 2**30:.2f} GiB per step ({args.grad_bytes} bytes each); "
              f"{flops / 1e12:.2f} TFLOP per sample (forward {c['forward'] / 1e12:.2f}, backward "
              f"{c['backward'] / 1e12:.2f}); step {step * 1e3:.0f} ms ({source}), "
              f"ControlNet backward {backward_s * 1e3:.0f} ms")  # fmt: skip
        print("| GPUs | link | all-reduce ms | efficiency, no overlap | efficiency, overlapped with backward |")
        print("| --- | --- | --- | --- | --- |")
        for gpus in GPUS:
            link, busbw = ("NVLink", args.nvlink_gbs) if gpus <= args.gpus_per_node else ("InfiniBand", args.ib_gbs)
            t = allreduce_s(grad_bytes, gpus, busbw)
            no_overlap = step / (step + t)
            overlapped = step / (step + max(0.0, t - backward_s))
            print(f"| {gpus} | {link} | {t * 1e3:.1f} | {no_overlap:.1%} | {overlapped:.1%} |")
            rows.append({"model": model, "gpus": gpus, "allreduce_s": t, "step_s": step, "source": source,
                         "no_overlap": no_overlap, "overlapped": overlapped, **c})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
