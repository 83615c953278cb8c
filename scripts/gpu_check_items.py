"""The checks and benchmarks of scripts/gpu_check.py, one function each, through the package's own code
paths (``apply_performance`` and the ``perf`` / ``trainer`` / ``controlnet`` config keys, ``training.run.train``,
the benchmark scripts' ``main``). Each returns ``{"status": "pass" | "fail" | "skipped: why", "summary": str,
"details": {...}}`` and, for a benchmark, ``"rows"``. A dry run (CPU) uses the tiny models and sizes."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.perf import apply_performance

SCRIPTS = Path(__file__).resolve().parent
TOL = 1e-3  # relative error a speed switch may cause in the loss and in each gradient (fp32, no TF32)


@dataclass
class Context:
    name: str
    dry_run: bool
    out: str
    faults: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def injected(self) -> bool:
        return self.name in self.faults

    def scratch(self) -> Path:
        path = Path(self.out) / "scratch" / self.name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


def run(name: str, cuda_only: bool, ctx: Context) -> dict:
    if torch.cuda._is_in_bad_fork():  # CUDA started in the forkserver: gpu_check.py goes on with spawn
        return {"status": "error", "bad_fork": True, "summary": "CUDA was initialized before the fork"}
    if cuda_only and not torch.cuda.is_available():
        if ctx.dry_run:
            return {"status": "skipped: no CUDA", "summary": "CUDA-only check"}
        return {"status": "fail", "summary": "no CUDA device"}
    if ctx.dry_run:  # a shared CPU: one thread is the robust choice (docs/performance.md, torch threads)
        torch.set_num_threads(1)
    torch.manual_seed(0)
    return ITEMS[name](ctx)


def compose_train(overrides: list[str] = ()):
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def tiny(device: torch.device, precision: str = "32", sd_locked: bool = False, model: str = "tiny"
         ) -> ControlNetModule:  # fmt: skip
    """The tiny model; unlocked, the UNet decoder trains too (gradients beyond the zero convolutions)."""
    cfg = compose_train([f"model={model}", f"model.sd_locked={str(sd_locked).lower()}",
                         "model.proportion_empty_prompts=0.0"])  # fmt: skip
    return ControlNetModule(cfg.model, cfg.optim, precision).to(device).train()


def batch(device: torch.device, n: int = 2, resolution: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": (torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1).to(device),
            "hint": torch.rand(n, 3, resolution, resolution, generator=g).to(device),
            "caption": ["a red circle", "a blue square"][:n]}  # fmt: skip


def loss_and_grads(module: ControlNetModule, data: dict, autocast=contextlib.nullcontext):
    torch.manual_seed(0)  # (all devices): the same noise and timesteps for both modules
    data = module.on_after_batch_transfer(dict(data), 0)
    with autocast():
        loss = module.diffusion_loss(data)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


def exact_fp32() -> None:
    """No TF32 anywhere: the comparisons measure the switch, not TF32's rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def compare(ctx: Context, perf: dict, tol: float = TOL, model: str = "tiny") -> tuple[bool, dict, ControlNetModule]:
    """The tiny model's loss and gradients with the ``perf`` switches against without them."""
    exact_fp32()
    device, data = ctx.device, batch(ctx.device)
    ref_loss, ref_grads = loss_and_grads(tiny(device, model=model), data)
    module = tiny(device, model=model)
    applied = apply_performance(module, OmegaConf.create({"tf32": False, "channels_last": False, **perf}),
                                device.type)  # fmt: skip
    exact_fp32()
    if ctx.injected:  # a real difference the comparison must catch (gpu_check --inject-fault)
        with torch.no_grad():
            module.unet.conv_out.weight.add_(0.05)
    start = time.perf_counter()
    loss, grads = loss_and_grads(module, data)
    first = time.perf_counter() - start
    loss_err = abs(float(loss - ref_loss)) / max(abs(float(ref_loss)), 1e-12)
    grad_err = max((float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items() if g.norm() > 0),
                   default=math.inf) if grads.keys() == ref_grads.keys() else math.inf  # fmt: skip
    details = {"applied": applied, "loss": float(loss), "reference_loss": float(ref_loss),
               "loss_rel_err": loss_err, "max_grad_rel_err": grad_err, "tolerance": tol, "first_step_s": first,
               "device": device.type}  # fmt: skip
    return loss_err < tol and grad_err < tol, details, module


def verdict(ok: bool, summary: str, details: dict, **extra) -> dict:
    return {"status": "pass" if ok else "fail", "summary": summary, "details": details, **extra}


# -- checks -----------------------------------------------------------------------------------------------
def environment(ctx: Context) -> dict:
    machine = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        b = torch.backends.cuda
        machine.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                       memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                       nccl=".".join(map(str, torch.cuda.nccl.version())), bf16=torch.cuda.is_bf16_supported(),
                       sdpa={"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
                             "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()})  # fmt: skip
    ok = torch.cuda.is_available() or ctx.dry_run
    return verdict(ok, f"{machine.get('gpu', 'cpu')}, torch {torch.__version__}, CUDA {torch.version.cuda}",
                   {"machine": machine})  # fmt: skip


def bf16_autocast(ctx: Context) -> dict:
    """bf16 autocast on CUDA: matmuls in bf16, the tiny model's step finite, fp32 master weights and grads."""
    device = ctx.device
    x = torch.randn(8, 64, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = x @ torch.randn(64, 64, device=device)
    module = tiny(device, "bf16-mixed", sd_locked=True)
    loss, grads = loss_and_grads(module, batch(device), lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    trainable = [p for p in module.parameters() if p.requires_grad]
    ok = (y.dtype == torch.bfloat16 and math.isfinite(float(loss)) and module.unet.dtype == torch.bfloat16
          and all(p.dtype == torch.float32 for p in trainable)
          and all(torch.isfinite(g).all() for g in grads.values()))  # fmt: skip
    details = {"matmul_dtype": str(y.dtype), "loss": float(loss), "locked_dtype": str(module.unet.dtype)}
    return verdict(ok, f"matmul -> {y.dtype}, loss {float(loss):.4f}", details)


def _sdpa_op(fn) -> str:
    """Which SDPA implementation ``fn`` ran (the aten op the dispatcher picked)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    ops = [e.key for e in prof.key_averages() if "scaled_dot_product" in e.key]
    for kind in ("flash", "cudnn", "efficient", "math"):
        if any(kind in op for op in ops):
            return kind
    return "unknown: " + ", ".join(ops)


def flash_sdpa(ctx: Context) -> dict:
    """Flash attention on its own (sdpa_kernel(FLASH_ATTENTION), forward and backward) at the head
    sizes of SD 1.5 (40, 80, 160) and SDXL (64); and what the default dispatch and diffusers'
    attention (AttnProcessor2_0, an SD 1.5 block's shape) pick."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    details, ok = {}, True
    for head_dim in (40, 64, 80, 160):
        q, k, v = (torch.randn(2, 8, 1024, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))  # fmt: skip
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v).sum().backward()
            forced = "ok"
        except RuntimeError as e:
            forced, ok = f"failed: {str(e)[:200]}", False
        picked = _sdpa_op(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        ok = ok and picked != "math"
        details[f"head_dim_{head_dim}"] = {"flash_only": forced, "default_picks": picked}
    attn = Attention(query_dim=320, heads=8, dim_head=40).to("cuda", torch.bfloat16)
    hidden = torch.randn(2, 4096, 320, device="cuda", dtype=torch.bfloat16)
    details["diffusers_attention"] = _sdpa_op(lambda: attn(hidden))
    ok = ok and details["diffusers_attention"] != "math"
    picks = sorted({d["default_picks"] for d in details.values() if isinstance(d, dict)})
    failed = [k for k, d in details.items() if isinstance(d, dict) and d["flash_only"] != "ok"]
    return verdict(ok, f"flash-only {'failed at ' + ', '.join(failed) if failed else 'ok at 40/64/80/160'}; "
                       f"default picks {picks}; diffusers' attention {details['diffusers_attention']}",
                   details)  # fmt: skip


def activation_checkpointing(ctx: Context) -> dict:
    ok, details, _ = compare(ctx, {"gradient_checkpointing": {"controlnet": True, "unet_decoder": True}})
    ok = ok and details["applied"].get("checkpointed_controlnet_blocks", 0) > 0
    ok = ok and details["applied"].get("checkpointed_unet_decoder_blocks", 0) > 0
    return verdict(ok, f"loss err {details['loss_rel_err']:.1e}, grad err {details['max_grad_rel_err']:.1e}", details)


def channels_last(ctx: Context) -> dict:
    ok, details, module = compare(ctx, {"channels_last": True})
    conv = module.controlnet.conv_in.weight
    ok = ok and module.channels_last and conv.is_contiguous(memory_format=torch.channels_last)
    return verdict(ok, f"loss err {details['loss_rel_err']:.1e}, grad err {details['max_grad_rel_err']:.1e}", details)


def regional_compile(ctx: Context) -> dict:
    """Regional compile (inductor on CUDA; eager in a dry run, which tests the wrapping, not inductor)."""
    backend = "inductor" if torch.cuda.is_available() else "eager"
    ok, details, module = compare(ctx, {"compile": True, "compile_backend": backend}, tol=5e-3)
    start = time.perf_counter()
    loss_and_grads(module, batch(ctx.device))
    details.update(backend=backend, second_step_s=time.perf_counter() - start)
    ok = ok and details["applied"].get("compiled_blocks", 0) > 0
    return verdict(ok, f"{backend}: {details['applied'].get('compiled_blocks')} blocks, first step "
                       f"{details['first_step_s']:.1f} s, then {details['second_step_s']:.2f} s, grad err "
                       f"{details['max_grad_rel_err']:.1e}", details)  # fmt: skip


def transformer_families(ctx: Context) -> dict:
    """SD3 and Flux (tiny_sd3, tiny_flux) on the device: a bf16-mixed step (locked parts in bf16, trainable
    weights and gradients fp32 and finite), and activation checkpointing of ControlNet and transformer blocks
    against the plain step in fp32."""
    device = ctx.device
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    details, ok = {}, True
    for model in ("tiny_sd3", "tiny_flux"):
        module = tiny(device, "bf16-mixed", sd_locked=True, model=model)
        loss, grads = loss_and_grads(module, batch(device), autocast)
        trainable = [p for p in module.parameters() if p.requires_grad]
        bf16_ok = (math.isfinite(float(loss)) and module.unet.dtype == torch.bfloat16 and bool(grads)
                   and all(p.dtype == torch.float32 for p in trainable)
                   and all(torch.isfinite(g).all() for g in grads.values()))  # fmt: skip
        ckpt_ok, compared, _ = compare(ctx, {"gradient_checkpointing": {"controlnet": True, "unet_decoder": True}},
                                       model=model)  # fmt: skip
        applied = compared["applied"]
        ckpt_ok = ckpt_ok and applied.get("checkpointed_controlnet_blocks", 0) > 0
        ckpt_ok = ckpt_ok and applied.get("checkpointed_unet_decoder_blocks", 0) > 0
        details[model] = {"bf16_loss": float(loss), "bf16_ok": bf16_ok, "checkpointing_ok": ckpt_ok,
                          "loss_rel_err": compared["loss_rel_err"], "max_grad_rel_err": compared["max_grad_rel_err"],
                          "applied": applied}  # fmt: skip
        ok = ok and bf16_ok and ckpt_ok
    return verdict(ok, "; ".join(f"{m}: bf16 {'ok' if d['bf16_ok'] else 'FAILED'}, checkpointing grad err "
                                 f"{d['max_grad_rel_err']:.1e}" for m, d in details.items()), details)  # fmt: skip


def flux_block_memory(ctx: Context) -> dict:
    """docs/scaling.md's Flux memory estimate against the GPU: one real-width double and one single block in
    bf16 at 1024 px (4096 image + 512 text tokens); the memory the forward leaves allocated for backward
    against scripts/flux_memory.py's CPU measurement at 576 tokens scaled linearly (within 30%)."""
    flux_memory = load_script("flux_memory")
    _, stack, _ = flux_memory.counts("flux")
    t = stack.unet
    dim = t.config.num_attention_heads * t.config.attention_head_dim
    img, txt = 4096, 512
    estimates = flux_memory.block_estimates(t, img, txt, 576)  # as docs/scaling.md's table
    details, ok = {}, True
    blocks = (("double", t.transformer_blocks[0]), ("single", t.single_transformer_blocks[0]))
    for (kind, block), estimate in zip(blocks, estimates, strict=True):
        measured = flux_memory.allocated_bytes(block, img, txt, dim)
        ratio = measured / estimate
        details[kind] = {"estimate_gib": estimate / 2**30, "measured_gib": measured / 2**30, "ratio": ratio}
        ok = ok and 0.7 <= ratio <= 1.3
        torch.cuda.empty_cache()
    return verdict(ok, "; ".join(f"{k} block {d['measured_gib']:.3f} GiB measured vs {d['estimate_gib']:.3f} "
                                 f"estimated (x{d['ratio']:.2f})" for k, d in details.items()), details)  # fmt: skip


def fused_adamw(ctx: Context) -> dict:
    """The optimizer configure_optimizers makes on CUDA is the fused AdamW, and its step equals torch's
    for-loop AdamW's on the same weights and gradients."""
    module = tiny(ctx.device, "bf16-mixed", sd_locked=True)
    module._trainer = SimpleNamespace(max_steps=10)  # what configure_optimizers reads of the trainer
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for g in optimizer.param_groups:  # (the warm-up schedule starts at 0: a step would change nothing)
        g["lr"] = 1e-3
    for p in params:
        p.grad = torch.randn_like(p)
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    group = {k: v for k, v in optimizer.param_groups[0].items() if k in ("lr", "betas", "eps", "weight_decay")}
    reference = torch.optim.AdamW(copies, foreach=False, **group)
    optimizer.step()
    reference.step()
    err = max(float((p - c).detach().abs().max()) for p, c in zip(params, copies))
    ok = optimizer.defaults.get("fused") is True and err < 1e-6
    return verdict(ok, f"fused={optimizer.defaults.get('fused')}, max diff to for-loop AdamW {err:.1e}",
                   {"fused": optimizer.defaults.get("fused"), "max_abs_diff": err, **group})  # fmt: skip


def fsdp_one_gpu(ctx: Context) -> dict:
    """trainer=fsdp on one GPU (world size 1): Lightning's FSDP strategy through training.run.train, a few
    steps, a checkpoint with every trainable weight at full size, the ControlNet exported whole. (At world
    size 1 torch's FSDP shards nothing (NO_SHARD); this checks the path: wrapping, the ignored locked parts,
    the bf16 mixed precision, gathering for the checkpoint and the export.)"""
    from nemo_controlnet.training.distributed import is_fsdp
    from nemo_controlnet.training.run import train

    run_dir = ctx.scratch()
    with socket.socket() as s:  # a free port for the one-process group on localhost
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    cfg = compose_train([f"run_dir={run_dir}", "trainer=fsdp", "trainer.devices=1", "trainer.max_steps=6",
                         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
                         "trainer.enable_model_summary=false", "data.batch_size=4", "data.num_workers=0",
                         "data.synthetic.train.num_samples=64", "data.synthetic.train.shard_size=32",
                         "data.synthetic.val.num_samples=2", "data.synthetic.val.shard_size=2",
                         "checkpoint.every_n_steps=3", "validation.every_n_steps=0", "validation.num_samples=0",
                         "logger=csv"])  # fmt: skip
    trainer, module = train(cfg)
    rows = list(csv.DictReader(open(next(run_dir.glob("logs/version_*/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    ckpt = torch.load(sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1], weights_only=True, map_location="cpu")
    expected = {k: tuple(v.shape) for k, v in module.trainable_named_parameters().items()}
    full = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()} == expected  # gathered, not one shard
    ok = (is_fsdp(trainer.strategy) and trainer.world_size == 1 and trainer.global_step == 6 and len(losses) == 6
          and all(math.isfinite(x) for x in losses) and full
          and (run_dir / "controlnet" / "config.json").exists())  # fmt: skip
    details = {"losses": losses, "strategy": type(trainer.strategy).__name__, "checkpoint_full": full}
    return verdict(ok, f"{trainer.global_step} steps, losses {losses[0]:.3f} -> {losses[-1]:.3f}, checkpoint "
                       f"{'full' if full else 'NOT full'}", details)  # fmt: skip


def manual_swap_offload(ctx: Context) -> dict:
    """Adapter mode with the frozen ControlNet swapped in per forward (controlnet.offload_strategy=
    manual_swap) and its residuals in pinned host memory: the same loss as resident, and between steps
    the ControlNet's weights back on the host, pinned, not on the GPU."""
    from diffusers import ControlNetModel

    from nemo_controlnet.models.stack import build_stack

    device, where = ctx.device, ctx.scratch()
    ControlNetModel.from_unet(build_stack(compose_train(["model=tiny"]).model).unet).save_pretrained(where)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    results = {}
    for offload, storage in (("none", "gpu"), ("manual_swap", "cpu_pinned")):
        cfg = compose_train(["+experiment=lora_frozen_controlnet", f"controlnet.name_or_path={where}",
                             f"controlnet.offload_strategy={offload}", f"controlnet.residual_storage={storage}",
                             "model.proportion_empty_prompts=0.0"])  # fmt: skip
        OmegaConf.resolve(cfg)
        module = ControlNetModule(cfg.model, cfg.optim, "bf16-mixed", adapter_cfg=cfg.adapter,
                                  controlnet_cfg=cfg.controlnet)  # fmt: skip
        module.controlnet.to("cpu")
        for name in ("unet", "vae", "text_encoder"):
            getattr(module, name).to(device)
        module.residuals.place(device)
        loss, grads = loss_and_grads(module, batch(device), autocast)
        weights = list(module.controlnet.parameters())
        results[offload] = {"loss": float(loss), "lora_grads": sum(float(g.abs().sum()) for g in grads.values()),
                            "controlnet_on": sorted({p.device.type for p in weights}),
                            "pinned": all(p.is_pinned() for p in weights)}  # fmt: skip
        del module
    swap, resident = results["manual_swap"], results["none"]
    ok = (abs(swap["loss"] - resident["loss"]) <= 1e-2 * abs(resident["loss"]) and swap["controlnet_on"] == ["cpu"]
          and swap["pinned"] and swap["lora_grads"] > 0)  # fmt: skip
    return verdict(ok, f"loss {swap['loss']:.4f} vs resident {resident['loss']:.4f}; weights on "
                       f"{swap['controlnet_on']} pinned={swap['pinned']}", results)  # fmt: skip


# -- benchmarks -------------------------------------------------------------------------------------------
def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark(script: str, argv: list[str], summary) -> dict:
    rows = load_script(script).main(argv)
    ok = bool(rows) and all(r.get("samples_per_s", 0) > 0 for r in rows)
    return verdict(ok, summary(rows) if rows else "no rows", {"argv": argv}, rows=rows)


def train_summary(rows: list[dict]) -> str:
    parts = []
    for b in sorted({r["batch_size"] for r in rows}):
        by = {r["config"]: r for r in rows if r["batch_size"] == b}
        parts.append(f"b{b}: cached {by['ours cached']['speedup']:.2f}x, online {by['ours online']['speedup']:.2f}x"
                     f" (baseline {by['baseline']['samples_per_s']:.1f}/s)")  # fmt: skip
    return "; ".join(parts)


def bench_train_sd15_512(ctx: Context) -> dict:
    size = ["--model", "tiny", "--resolution", "64", "--batch-size", "1", "2", "4"] if ctx.dry_run else \
        ["--model", "sd15", "--resolution", "512", "--batch-size", "8", "16", "32"]  # fmt: skip
    steps = ["--steps", "1", "--warmup", "0"] if ctx.dry_run else ["--steps", "6", "--warmup", "2"]
    return benchmark("bench_train", size + steps, train_summary)


def bench_train_sdxl_1024_b4(ctx: Context) -> dict:
    size = ["--model", "tiny_sdxl", "--resolution", "64", "--batch-size", "1"] if ctx.dry_run else \
        ["--model", "sdxl", "--resolution", "1024", "--batch-size", "4"]  # fmt: skip
    steps = ["--steps", "1", "--warmup", "0"] if ctx.dry_run else ["--steps", "5", "--warmup", "2"]
    return benchmark("bench_train", size + steps, train_summary)


def bench_offload_sd15_512(ctx: Context) -> dict:
    argv = ["--model", "tiny", "--resolution", "64", "--batch-size", "2", "--steps", "1", "--warmup", "0"] \
        if ctx.dry_run else ["--model", "sd15", "--resolution", "512", "--batch-size", "8", "--steps", "3",
                             "--warmup", "1"]  # fmt: skip
    return benchmark("bench_offload", argv, lambda rows: "; ".join(
        f"{r['offload']}/{r['storage']} {r['samples_per_s']:.1f}/s" for r in rows))  # fmt: skip


def bench_data(ctx: Context) -> dict:
    where = str(ctx.scratch())
    argv = ["--resolution", "64", "--source-size", "96", "72", "--samples", "24", "--per-shard", "12",
            "--batch-size", "4", "--workers", "0", "--split-samples", "12", "--decoder-sizes"] if ctx.dry_run else \
        ["--samples", "180", "--per-shard", "60", "--workers", "0", "4", "--split-samples", "60",
         "--decoder-sizes", "768x576"]  # fmt: skip
    argv += ["--pin-memory", "--dir", where]
    result = benchmark("bench_data", argv, lambda rows: "; ".join(
        f"{r['hints']} w{r['workers']}{' pinned' if r.get('pin_memory') else ''} {r['samples_per_s']:.0f}/s"
        for r in rows))  # fmt: skip
    shutil.rmtree(where, ignore_errors=True)
    return result


ITEMS = {f.__name__: f for f in (
    environment, bf16_autocast, flash_sdpa, activation_checkpointing, channels_last, regional_compile,
    transformer_families, flux_block_memory, fused_adamw, fsdp_one_gpu, manual_swap_offload,
    bench_train_sd15_512, bench_train_sdxl_1024_b4, bench_data, bench_offload_sd15_512,
)}  # fmt: skip
