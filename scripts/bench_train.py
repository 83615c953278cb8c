"""Training-step throughput: our step against the step of diffusers' ``examples/controlnet/train_controlnet.py``
(``train_controlnet_sdxl.py`` for SDXL) at that script's default arguments, over the same networks, in one process.

    python scripts/bench_train.py --model sd15 --resolution 512 --batch-size 8 16 32 --steps 20     # GPU
    python scripts/bench_train.py --model sdxl --resolution 1024 --batch-size 4 --steps 10         # GPU
    python scripts/bench_train.py --model sd15 --resolution 512 --batch-size 16 --ablate           # + one row per point
    python scripts/bench_train.py --model tiny --resolution 64 --batch-size 2 --steps 2 --warmup 1  # CPU smoke

Rows per batch size: baseline (the script's step), ours online (VAE and text encoders in the step), ours
cached (latents and text embeddings from prep). Each: samples/s, step time, peak memory, TFLOP/s and MFU
(model FLOPs per sample counted once with torch.utils.flop_counter; peak from the GPU model, H100/H200 bf16
dense 989 TFLOP/s); and the speed-up over the baseline. Random weights at the real architecture's size.

The baseline does what the script does by default on each point below; the flag beside a point switches
that point back to this benchmark's first baseline, so runs with and without it give that point's share of
the ratio (--old-baseline: all of them; --ablate: one extra baseline row per point):
  (a) --autocast-whole-step   script: autocast wraps only the ControlNet forward (accelerate's prepare); VAE,
                              text encoder(s) and UNet run as plain bf16 weights (weight_dtype)
  (b) --tokenize-in-step      script: captions tokenized in the dataset transform, not in the step
  (c) --sdxl-encode-in-step   script (SDXL): text embeddings of both encoders computed once before training;
                              VAE kept in fp32 (no --pretrained_vae_model_name_or_path)
  (d) --no-data-loading       script: every batch decoded with PIL in the main process (dataloader_num_workers=0):
                              Resize, CenterCrop, ToTensor, Normalize, from in-memory JPEG (image) / PNG (hint)
  (e) --no-clip               script: clip_grad_norm_(controlnet.parameters(), max_grad_norm=1.0) every step
  (f) --grads-to-none         script: optimizer.zero_grad(set_to_none=False) (--set_grads_to_none is off)
  (g) --no-sync               script: loss.detach().item() and a log dict every step (a host sync)
  (h) --no-fp32-outputs       script: accelerate converts the ControlNet's outputs to fp32; cast to bf16 for the UNet
Ours runs with the production defaults: the perf config, the optim config (fused AdamW on CUDA, its scheduler),
gradient clipping at trainer.gradient_clip_val, zero_grad(set_to_none=True) and a loss read every step (the
default progress bar), Lightning's bf16-mixed autocast over the step; batches ready on the device (our loader
runs in worker processes: scripts/bench_data.py measures it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import convert_outputs_to_fp32
from diffusers.optimization import get_scheduler
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from nemo_controlnet.training.callbacks import peak_tflops
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.perf import apply_performance

WORDS = "a red circle on a blue background with soft light and sharp edges".split()
# point: (argparse dest of the flag that switches it back, the script's default, the old behaviour)
POINTS = {
    "a": ("autocast_whole_step", "autocast around the ControlNet forward only", "autocast over the whole step"),
    "b": ("tokenize_in_step", "captions tokenized in the dataset", "captions tokenized in the step"),
    "c": ("sdxl_encode_in_step", "SDXL: embeddings precomputed, VAE fp32", "SDXL: text encoders every step, VAE bf16"),
    "d": ("no_data_loading", "PIL decode + transforms in the main process each step", "a ready batch on the device"),
    "e": ("no_clip", "clip_grad_norm_ at 1.0", "no clipping"),
    "f": ("grads_to_none", "zero_grad(set_to_none=False)", "zero_grad(set_to_none=True)"),
    "g": ("no_sync", "loss.item() every step", "no per-step sync"),
    "h": ("no_fp32_outputs", "ControlNet outputs converted to fp32", "ControlNet outputs left as autocast made them"),
}  # fmt: skip
SCRIPT_OPTIM = {"lr": 5e-6, "betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}  # the script's defaults
MAX_GRAD_NORM = 1.0


def build(model: str, precision: str, device: torch.device, overrides: list[str] = ()):
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", "model.proportion_empty_prompts=0.0",
                                                      *overrides])  # fmt: skip
    torch.manual_seed(0)
    if device.type == "cuda":
        try:  # random init on the GPU: seconds, where SDXL's 4.5B parameters take a minute on the host
            with torch.device(device):
                return ControlNetModule(cfg.model, cfg.optim, precision).to(device).train(), cfg
        except Exception as e:  # noqa: BLE001  (any failure: the host build below is the known path)
            print(f"building on {device} failed ({type(e).__name__}: {e}); building on the host", flush=True)
            free()
    return ControlNetModule(cfg.model, cfg.optim, precision).to(device).train(), cfg


def captions(n: int) -> list[str]:
    return [" ".join(WORDS[i % len(WORDS) :] + WORDS[: i % len(WORDS)]) for i in range(n)]


def make_batch(module: ControlNetModule, batch_size: int, resolution: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": (torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1).to(device),
        "hint": torch.rand(batch_size, 3, resolution, resolution, generator=g).to(device),
        "caption": captions(batch_size),
    }


def cache(module: ControlNetModule, batch: dict, autocast) -> dict:
    """The batch as prep would store it: latents and text embeddings instead of image and caption."""
    with torch.no_grad(), autocast():
        latents = module.vae.encode(batch["image"].to(module.vae.dtype)).latent_dist.sample()
        states, pooled = module.encode_prompts(batch["caption"])
    cached = {"latents": latents.float() * module.vae.config.scaling_factor, "text_embeds": states,
              "hint": batch["hint"], "caption": batch["caption"]}  # fmt: skip
    if pooled is not None:
        cached["pooled_text_embeds"] = pooled
    return cached


# -- the script's data: an image dataset decoded in the main process -------------------------------------
def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """Gradients, discs and sensor-like noise: JPEG decode cost like a photo's."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([x * rng.uniform(80, 200), y * rng.uniform(80, 200), np.full_like(x, rng.uniform(30, 120))], 2)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, 1, 3) * (1, 1, 0.3)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encoded_rows(n: int, resolution: int) -> list[dict]:
    """n dataset rows at the benchmark size: JPEG q95 image, PNG edge-like hint, caption."""
    rng, rows = np.random.default_rng(0), []
    for caption in captions(n):
        image, hint = io.BytesIO(), io.BytesIO()
        photo_like(rng, resolution).save(image, format="JPEG", quality=95)
        edges = np.zeros((resolution, resolution, 3), np.uint8)
        edges[rng.integers(0, resolution, 8), :] = 255
        edges[:, rng.integers(0, resolution, 8)] = 255
        Image.fromarray(edges).save(hint, format="PNG")
        rows.append({"image": image.getvalue(), "conditioning_image": hint.getvalue(), "text": caption})
    return rows


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size, BILINEAR) then CenterCrop(size), on a PIL image."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    img = img.resize(new, Image.BILINEAR)  # (a copy when the size is already right, as torchvision's)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor: HWC uint8 -> CHW float in [0, 1]."""
    return torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)


class ScriptDataset(torch.utils.data.Dataset):
    """``dataset.with_transform(preprocess_train)``: each index decoded and transformed when read."""

    def __init__(self, rows: list[dict], resolution: int, tokenizers=(), embeddings: list[dict] | None = None):
        self.rows, self.resolution, self.tokenizers, self.embeddings = rows, resolution, tokenizers, embeddings
        self.decoded = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row, size = self.rows[i], self.resolution
        self.decoded += 1
        image = resize_center_crop(Image.open(io.BytesIO(row["image"])).convert("RGB"), size)
        hint = resize_center_crop(Image.open(io.BytesIO(row["conditioning_image"])).convert("RGB"), size)
        example = {"pixel_values": (to_tensor(image) - 0.5) / 0.5, "conditioning_pixel_values": to_tensor(hint)}
        for key, tok in zip(("input_ids", "input_ids_2"), self.tokenizers):  # the script's tokenize_captions
            example[key] = token_ids(tok, [row["text"]])[0]
        if self.embeddings is not None:  # SDXL: the row's precomputed columns, read back as Python lists
            example.update(self.embeddings[i])
        if not self.tokenizers and self.embeddings is None:
            example["caption"] = row["text"]
        return example


def collate(examples: list[dict]) -> dict:
    """The script's collate_fn."""
    batch = {}
    for key in ("pixel_values", "conditioning_pixel_values"):
        batch[key] = torch.stack([e[key] for e in examples]).to(memory_format=torch.contiguous_format).float()
    for key in ("input_ids", "input_ids_2"):
        if key in examples[0]:
            batch[key] = torch.stack([e[key] for e in examples])
    if "prompt_embeds" in examples[0]:
        batch["prompt_ids"] = torch.stack([torch.tensor(e["prompt_embeds"]) for e in examples])
        batch["unet_added_conditions"] = {k: torch.stack([torch.tensor(e[k]) for e in examples])
                                          for k in ("text_embeds", "time_ids")}  # fmt: skip
    if "caption" in examples[0]:
        batch["caption"] = [e["caption"] for e in examples]
    return batch


def to_device(batch, device: torch.device):
    """accelerate's send_to_device, as its prepared DataLoader does for every batch."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids  # fmt: skip


# -- the script's step ------------------------------------------------------------------------------------
class ScriptStep:
    """The training step of train_controlnet.py (train_controlnet_sdxl.py for SDXL) at its defaults,
    over ``module``'s networks, with the points of ``faithful`` that are False done the old way."""

    def __init__(self, module: ControlNetModule, faithful: dict, device: torch.device, weight_dtype: torch.dtype):
        self.m, self.f, self.device, self.dtype = module, faithful, device, weight_dtype
        self.sdxl = module.text_encoder_2 is not None
        self.mixed = weight_dtype != torch.float32
        self.precomputed = self.sdxl and faithful["c"]
        if self.precomputed:  # "The VAE is in float32 to avoid NaN losses."
            module.vae.to(torch.float32)
        controlnet = module.controlnet
        forward = controlnet.forward
        if self.mixed and faithful["a"]:  # accelerate's prepare_model: autocast around the forward
            forward = torch.autocast(device.type, dtype=weight_dtype)(forward)
        if self.mixed and faithful["h"]:  # ... and convert_outputs_to_fp32 around that
            forward = convert_outputs_to_fp32(forward)
        controlnet.forward = forward
        self.params = [p for p in controlnet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, **SCRIPT_OPTIM)
        self.scheduler = get_scheduler("constant", self.optimizer, num_warmup_steps=500, num_training_steps=10**6)
        self.source = self.dataset = self.logs = self.grad_norm = None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.mixed else contextlib.nullcontext()

    def prepare(self, batch_size: int, resolution: int) -> None:
        """The data for one batch size: the script's dataset and loader (d), or a batch on the device."""
        m, n = self.m, 2 * batch_size
        rows = encoded_rows(n, resolution)
        embeddings = None
        if self.precomputed:  # the script's train_dataset.map(compute_embeddings), before training
            with torch.no_grad():
                states, pooled = m.encode_prompts([r["text"] for r in rows])
            ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
            embeddings = [{"prompt_embeds": s.float().cpu().tolist(), "text_embeds": p.float().cpu().tolist(),
                           "time_ids": ids.tolist()} for s, p in zip(states, pooled)]  # fmt: skip
        tokenizers = () if self.precomputed or not self.f["b"] else (m.tokenizer, m.tokenizer_2)[: 1 + self.sdxl]
        self.dataset = ScriptDataset(rows, resolution, tokenizers, embeddings)
        loader = torch.utils.data.DataLoader(self.dataset, shuffle=True, collate_fn=collate, batch_size=batch_size,
                                             num_workers=0)  # fmt: skip
        if self.f["d"]:
            stream = itertools.chain.from_iterable(itertools.repeat(loader))  # epochs, one after another
            self.source = lambda: to_device(next(stream), self.device)
        else:
            fixed = to_device(next(iter(loader)), self.device)
            self.source = lambda: fixed

    def text(self, batch: dict) -> tuple[torch.Tensor, dict | None]:
        m = self.m
        if "prompt_ids" in batch:
            # Read back as float32 (torch.tensor over the stored lists); a float32 cross-attention input
            # fails against bf16 UNet weights (F.linear dtype error), hence the cast.
            return batch["prompt_ids"].to(self.dtype), batch["unet_added_conditions"]
        tokenizers = (m.tokenizer, m.tokenizer_2)[: 1 + self.sdxl]
        ids = [batch.get(key) for key in ("input_ids", "input_ids_2")[: 1 + self.sdxl]]
        if ids[0] is None:  # (b) old: tokenized here
            ids = [token_ids(tok, batch["caption"]).to(self.device) for tok in tokenizers]
        if not self.sdxl:
            return m.text_encoder(ids[0])[0], None
        states, pooled = [], None
        for encoder, input_ids in zip((m.text_encoder, m.text_encoder_2), ids):
            out = encoder(input_ids, output_hidden_states=True)
            pooled = out[0]
            states.append(out.hidden_states[-2])
        h, w = batch["pixel_values"].shape[-2:]
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=pooled.dtype).repeat(len(pooled), 1)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

    def loss(self, batch: dict) -> torch.Tensor:
        with contextlib.nullcontext() if self.f["a"] else self.autocast():
            return self._loss(batch)

    def _loss(self, batch: dict) -> torch.Tensor:
        m, dtype = self.m, self.dtype
        with torch.no_grad():  # (the script's frozen modules have requires_grad False: no graph either way)
            pixels = batch["pixel_values"] if self.precomputed else batch["pixel_values"].to(dtype)
            latents = m.vae.encode(pixels).latent_dist.sample() * m.vae.config.scaling_factor
            latents = latents.to(dtype)
        noise = torch.randn_like(latents)
        scheduler = m.noise_scheduler
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps.long())
        with torch.no_grad():
            states, added = self.text(batch)
        down, mid = m.controlnet(noisy, timesteps, encoder_hidden_states=states, added_cond_kwargs=added,
                                 controlnet_cond=batch["conditioning_pixel_values"].to(dtype),
                                 return_dict=False)  # fmt: skip
        pred = m.unet(noisy, timesteps, encoder_hidden_states=states, added_cond_kwargs=added,
                      down_block_additional_residuals=[d.to(dtype) for d in down],
                      mid_block_additional_residual=mid.to(dtype)).sample  # fmt: skip
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = scheduler.get_velocity(latents, noise, timesteps)
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    def step(self) -> None:
        loss = self.loss(self.source())
        loss.backward()
        if self.f["e"]:  # accelerator.clip_grad_norm_: bf16 has no scaler to unscale first
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self.f["f"])
        if self.f["g"]:
            self.logs = {"loss": loss.detach().item(), "lr": self.scheduler.get_last_lr()[0]}

    def probe(self) -> dict:
        """One untimed step, observed: what each point changed (for the report and the tests)."""
        m, seen, hooks = self.m, {"text_encoder_calls": 0}, []

        def flag(name):
            def hook(mod, args):  # (a pre-hook's return value would replace the inputs)
                seen.setdefault(name, torch.is_autocast_enabled(self.device.type))

            return hook

        def count(*_):
            seen["text_encoder_calls"] += 1

        def residuals(mod, args, out):
            seen["residual_dtype"] = str(out[1].dtype).replace("torch.", "")

        hooks += [m.vae.encoder.register_forward_pre_hook(flag("vae_autocast")),
                  m.unet.register_forward_pre_hook(flag("unet_autocast")),
                  m.controlnet.conv_in.register_forward_pre_hook(flag("controlnet_autocast")),
                  m.controlnet.register_forward_hook(residuals)]  # fmt: skip
        hooks += [e.register_forward_pre_hook(count) for e in (m.text_encoder, m.text_encoder_2) if e is not None]
        source, decoded = self.source, self.dataset.decoded

        def observed():
            batch = source()
            seen["step_input"] = sorted(batch)
            return batch

        self.source, self.logs, self.grad_norm = observed, None, None
        try:
            self.step()
        finally:
            self.source = source
            for h in hooks:
                h.remove()
        grads = [p.grad for p in self.params]
        seen["grads_after_step"] = "none" if all(g is None for g in grads) else "zeros"
        seen["samples_decoded"] = self.dataset.decoded - decoded
        seen["vae_dtype"] = str(m.vae.dtype).replace("torch.", "")
        seen["loss_read"] = self.logs is not None
        seen["grad_norm_before_clip"] = None if self.grad_norm is None else float(self.grad_norm)
        return seen


# -- measuring --------------------------------------------------------------------------------------------
def measure(step, samples: int, steps: int, warmup: int, device: torch.device) -> dict:
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
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"samples_per_s": samples / seconds, "step_ms": seconds * 1e3, "peak_gib": peak}


def count_flops(loss_fn, batch: dict, samples: int, device: torch.device, params) -> float:
    """Model FLOPs per sample of one forward + backward (RNG and gradients left as they were)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with FlopCounterMode(display=False) as counter:
            loss_fn(batch).backward()
    for p in params:
        p.grad = None
    return counter.get_total_flops() / samples


def faithful_points(args) -> dict:
    return {p: not (args.old_baseline or getattr(args, dest)) for p, (dest, _, _) in POINTS.items()}


def applies(point: str, sdxl: bool, mixed: bool, faithful: dict) -> bool:
    """Points that change nothing here: c without SDXL; b with SDXL's precomputed embeddings; a and h
    without mixed precision (no autocast, nothing to convert)."""
    return not ((point == "c" and not sdxl) or (point == "b" and sdxl and faithful["c"])
                or (point in "ah" and not mixed))  # fmt: skip


def run_baseline(name, args, faithful, device, precision, weight_dtype, peak) -> list[dict]:
    module, _ = build(args.model, precision, device)
    script = ScriptStep(module, faithful, device, weight_dtype)
    rows, flops = [], None
    for batch_size in args.batch_size:
        script.prepare(batch_size, args.resolution)
        row = {"config": name, "batch_size": batch_size,
               **measure(script.step, batch_size, args.steps, args.warmup, device)}  # fmt: skip
        row["observed"] = script.probe()
        if flops is None:
            flops = count_flops(script.loss, script.source(), batch_size, device, script.params)
        rows.append(finish(row, flops, peak))
    return rows


def run_ours(args, cfg_overrides, device, precision, autocast, peak) -> list[dict]:
    module, cfg = build(args.model, precision, device, cfg_overrides)
    perf = OmegaConf.merge(cfg.perf, {"compile": args.compile, "gradient_checkpointing": {
        "controlnet": args.checkpointing, "unet_decoder": args.checkpointing}})  # fmt: skip
    apply_performance(module, perf, device.type)
    module._trainer = SimpleNamespace(max_steps=10**6)  # what configure_optimizers reads of the trainer
    clip = cfg.trainer.get("gradient_clip_val")
    rows, flops = [], {}
    for batch_size in args.batch_size:
        online = make_batch(module, batch_size, args.resolution, device)
        for name in ("ours online", "ours cached"):
            batch = online if name == "ours online" else cache(module, online, autocast)
            if module.channels_last:
                batch = module.on_after_batch_transfer(dict(batch), 0)
            opt = module.configure_optimizers()
            optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
            params = [p for g in optimizer.param_groups for p in g["params"]]

            def step(batch=batch, optimizer=optimizer, scheduler=scheduler, params=params):
                with autocast():  # Lightning's bf16-mixed: autocast over the training step
                    loss = module.diffusion_loss(dict(batch))
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss.detach().item()  # the progress bar reads the logged loss every step

            row = {"config": name, "batch_size": batch_size,
                   **measure(step, batch_size, args.steps, args.warmup, device)}  # fmt: skip
            if name not in flops:
                with autocast():
                    flops[name] = count_flops(module.diffusion_loss, dict(batch), batch_size, device, params)
            rows.append(finish(row, flops[name], peak))
            del optimizer, scheduler, opt
    return rows


def finish(row: dict, flops: float, peak: float | None) -> dict:
    row["tflops"] = flops * row["samples_per_s"] / 1e12
    row["mfu"] = row["tflops"] / peak if peak else float("nan")
    return row


def free() -> None:
    """Memory of the finished configuration back (its module is gone with its function's frame)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_row(row: dict) -> None:
    print(f"{row['config']:>14} | batch {row['batch_size']:3d} | {row['samples_per_s']:8.2f} samples/s | "
          f"{row['step_ms']:8.1f} ms/step | peak {row['peak_gib']:6.2f} GiB | {row['tflops']:7.2f} TFLOP/s | "
          f"MFU {row['mfu']:.3f}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["auto", "bf16", "32"], default="auto",
                        help="auto: bf16 mixed on CUDA, fp32 on a CPU")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="regional torch.compile in our step")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in our step")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--baseline-only", action="store_true", help="no rows of ours")
    for point, (dest, script, old) in POINTS.items():
        parser.add_argument("--" + dest.replace("_", "-"), action="store_true",
                            help=f"({point}) baseline: {old} (default, as the script: {script})")  # fmt: skip
    parser.add_argument("--old-baseline", action="store_true", help="every point (a)-(h) done the old way")
    parser.add_argument("--ablate", action="store_true", help="one more baseline row per point switched back")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    precision, weight_dtype = ("bf16-mixed", torch.bfloat16) if bf16 else ("32", torch.float32)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    peak = peak_tflops(args.peak_tflops)
    sdxl = bool(build_cfg(args.model).model.cond_stage_config.get("text_encoder_2"))
    faithful = faithful_points(args)
    shown = {p: faithful[p] if applies(p, sdxl, bf16, faithful) else None for p in POINTS}
    marks = " ".join(p + {True: "+", False: "-", None: "=n/a"}[v] for p, v in shown.items())
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"model {args.model}, {args.resolution}px, batch {args.batch_size}, {precision}")  # fmt: skip
    print(f"baseline points (+ as diffusers' script by default, - the old way): {marks}")
    if device.type == "cuda":  # the script's default: --allow_tf32 off (torch's defaults)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    runs = [("baseline", faithful)]
    if args.ablate:  # the same baseline with one point done the old way
        runs += [(f"baseline -{p}", {**faithful, p: False}) for p, on in shown.items() if on]
    rows = []
    for name, points in runs:
        for row in run_baseline(name, args, points, device, precision, weight_dtype, peak):
            row["faithful"] = {p: points[p] if on is not None else None for p, on in shown.items()}
            rows.append(row)
            print_row(row)
        free()
    if not args.baseline_only:
        for row in run_ours(args, [], device, precision, autocast, peak):
            rows.append(row)
            print_row(row)
        free()
    base = {r["batch_size"]: r["samples_per_s"] for r in rows if r["config"] == "baseline"}
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base[row["batch_size"]]
        if row["config"] != "baseline":
            print(f"{row['config']} (batch {row['batch_size']}): {row['speedup']:.2f}x the baseline")
    return rows


def build_cfg(model: str):
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[f"model={model}"])


if __name__ == "__main__":
    main()
