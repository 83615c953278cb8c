"""The LightningModule, the same for every training mode and model family: the step (latents, text,
noise, the mode's control residuals, the family's prediction, the loss), the optimizer from the
mode's parameter groups, checkpoints that record the mode and refuse another on resume."""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.data.transforms import normalize_batch
from nemo_controlnet.inference.pipeline import sampling_precision
from nemo_controlnet.models.families import family_for
from nemo_controlnet.models.stack import compute_dtype, encoder_fingerprint, fingerprint, freeze
from nemo_controlnet.training.aux_loss import make_aux_loss
from nemo_controlnet.training.distributed import clean_name, is_fsdp
from nemo_controlnet.training.modes import TrainingMode, make_mode
from nemo_controlnet.training.schedule import check_roles, parse_schedule

log = logging.getLogger(__name__)

CHECKPOINT_META = "nemo_controlnet"


class ControlNetModule(L.LightningModule):
    def __init__(
        self,
        model_cfg: DictConfig,
        optim_cfg: DictConfig,
        precision: str | int = 32,
        seed: int = 0,
        adapter_cfg: DictConfig | None = None,
        controlnet_cfg: DictConfig | None = None,
        mode: TrainingMode | DictConfig | str | None = None,
        research: DictConfig | None = None,
    ):
        super().__init__()
        self.model_cfg, self.optim_cfg = model_cfg, optim_cfg
        self.sd_locked = bool(model_cfg.sd_locked)
        self.control_key = model_cfg.control_key
        self.control_scale = float(model_cfg.control_scale)
        self.proportion_empty_prompts = float(model_cfg.proportion_empty_prompts)
        self.locked_dtype = compute_dtype(precision)
        self.training_mode = make_mode(mode, model_cfg, adapter_cfg, controlnet_cfg)
        # control_training_schedule, schedule, controlnet_reroute, residuals (training/run.py research_options)
        self.research = research if research is not None else OmegaConf.create({})
        self.reroute = str(self.research.get("controlnet_reroute") or "always")
        self.schedule = parse_schedule(self.research)  # before anything loads: a bad key fails in seconds
        self.aux_loss = make_aux_loss(controlnet_cfg)  # None: controlnet.aux_loss=none
        self.family = family_for(model_cfg)
        self.training_mode.check_family(self.family)  # before the base loads
        if self.reroute == "precompute" and not self.family.residual_precompute:
            raise ValueError(f"controlnet_reroute=precompute: the residual store holds SD UNet residuals, not the "
                             f"{self.family.name} family's; use controlnet_reroute=always")  # fmt: skip

        stack = self.family.build_stack(model_cfg)
        self.unet, self.vae, self.text_encoder = stack.unet, stack.vae, stack.text_encoder
        self.tokenizer, self.noise_scheduler = stack.tokenizer, stack.noise_scheduler
        self.text_encoder_2, self.tokenizer_2 = stack.text_encoder_2, stack.tokenizer_2
        # Identity of the base as built from config, before any of it trains.
        self.base_fingerprint = fingerprint(self.unet, self.vae, *stack.text_encoders())
        self.encoder_fingerprint = encoder_fingerprint(self.vae, *stack.text_encoders())  # cached latents' check
        self.controlnet = None  # built by the modes that have one
        self.residuals = None  # a frozen ControlNet's residuals, where the mode keeps them apart (adapter)
        self.training_mode.build(self)
        for module in self.locked_modules():
            freeze(module, self.locked_dtype)
        self.training_mode.unlock(self)
        log.info("mode %s (%s family): locked parts in %s; trainable: %s", self.training_mode.name, self.family.name,
                 self.locked_dtype, self.training_mode.describe(self))  # fmt: skip
        if not self.schedule.standard:
            check_roles(self.schedule, self.training_mode.param_groups(self, optim_cfg), self.training_mode.name)
            log.info("control_training_schedule=%s: phases %s, %d optimizer step(s) each", self.schedule.kind,
                     list(self.schedule.phases), self.schedule.period)  # fmt: skip
        self._phase_logged: int | None = None  # the phase of the last optimizer step (logged when it changes)
        # Checkpoints hold only the trainable weights; the locked ones come from the config.
        self.strict_loading = False
        self.data_position: tuple[int, int] = (0, -1)
        self._first_batch_logged = False
        self._empty_prompt = None  # the empty caption's embeddings, for dropout with cached embeddings
        self._prompt_embeds: dict[str, dict[str, torch.Tensor]] | None = None  # release_text_encoders
        self.seed = seed
        self.channels_last = False  # set by training.perf.apply_performance
        self.lr_scale = 1.0  # optim.scale_lr: the effective batch

    def on_fit_start(self) -> None:
        self.training_mode.on_fit_start(self)

    # -- parameters ------------------------------------------------------------------------
    def locked_modules(self) -> list[torch.nn.Module]:
        return self.training_mode.locked_modules(self)

    def trainable_named_parameters(self) -> dict[str, torch.nn.Parameter]:
        # Names as checkpoints store them, also when FSDP or checkpointing wrappers sit in the path.
        return {clean_name(n): p for n, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode; the locked parts stay in eval.
        super().train(mode)
        for module in self.locked_modules():
            module.eval()
        self.training_mode.set_train(self, mode)
        return self

    # -- the step --------------------------------------------------------------------------
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.text_encoder is None:
            raise RuntimeError(f"the text encoders were released (perf.release_text_encoders: the shards carry cached "
                               f"text embeddings), but {captions!r} came to be encoded")  # fmt: skip
        return self.family.encode_text(self, captions)

    @torch.no_grad()
    def release_text_encoders(self, device: torch.device, prompts: list[str]) -> int:
        """Training on cached text embeddings never runs the text encoders in the step: what still needs
        them is encoded once, on ``device`` in the precision the step and sampling use, and they are dropped.
        That is the empty prompt (``empty_prompt``: caption dropout, the residual store's shape check) and the
        validation ``prompts`` as the sampling pipeline encodes them (``validation_text``). Returns the bytes
        released."""
        encoders = [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]
        size = sum(t.numel() * t.element_size() for m in encoders for t in (*m.parameters(), *m.buffers()))
        for module in encoders:
            module.to(device)
        with sampling_precision(device, self.locked_dtype):
            self.empty_prompt()  # kept on the device: the step swaps it in without a copy
            self._prompt_embeds = {}
            if prompts:
                pipe = self.family.pipeline(self, self.controlnet)
                unique = list(dict.fromkeys(prompts))
                embeds = self.family.prompt_embeds(pipe, unique, device)
                for i, prompt in enumerate(unique):
                    self._prompt_embeds[prompt] = {k: v[i : i + 1].cpu() for k, v in embeds.items()}
        self.text_encoder = self.text_encoder_2 = None
        for module in encoders:
            module.to("cpu")  # a caller's reference (a stack) keeps them in host memory, not on the device
        del encoders
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return size

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The empty caption's embeddings (and pooled ones), encoded once and kept: also after the text
        encoders are released."""
        if self._empty_prompt is None:
            self._empty_prompt = self.encode_prompts([""])
        return self._empty_prompt

    def validation_text(self, prompts: list[str]) -> dict[str, torch.Tensor] | None:
        """The sampling pipeline's text inputs for these prompts, encoded by ``release_text_encoders``; None
        while the text encoders are kept (the pipeline encodes the prompts itself)."""
        if self._prompt_embeds is None or not prompts:
            return None
        missing = [p for p in prompts if p not in self._prompt_embeds]
        if missing:
            raise KeyError(f"validation prompts {missing} were not encoded before the text encoders were released")
        return {k: torch.cat([self._prompt_embeds[p][k] for p in prompts]) for k in self._prompt_embeds[prompts[0]]}

    def cached_prompts(self, batch: dict, drop_captions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cached text embeddings, with caption dropout done by swapping in the empty prompt's."""
        # Stored in float16: run in the locked parts' dtype, as freshly encoded ones would be.
        states, pooled = batch["text_embeds"].to(self.locked_dtype), batch.get("pooled_text_embeds")
        pooled = pooled.to(self.locked_dtype) if pooled is not None else None
        if drop_captions and self.proportion_empty_prompts > 0:
            drop_cpu = torch.rand(states.shape[0]) < self.proportion_empty_prompts  # decided on the host: no sync
            if drop_cpu.any():
                drop = drop_cpu.to(states.device)
                empty_states, empty_pooled = self.empty_prompt()
                states = torch.where(drop[:, None, None], empty_states.to(states.dtype), states)
                if pooled is not None:
                    pooled = torch.where(drop[:, None], empty_pooled.to(pooled.dtype), pooled)
        return states, pooled

    def text_conditioning(self, batch: dict, drop_captions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's text embeddings (and SDXL's pooled ones): cached in the batch, or encoded now."""
        if "text_embeds" in batch:  # cached: the text encoders are not run
            return self.cached_prompts(batch, drop_captions)
        captions = self.drop_captions(batch["caption"]) if drop_captions else list(batch["caption"])
        return self.encode_prompts(captions)

    @torch.no_grad()
    def compute_control_residuals(self, batch: dict, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                                  cond: dict | None = None):  # fmt: skip
        """The mode's control residuals for this step, detached (None: the mode has no ControlNet).
        ``cond``: the step's conditioning (caption dropout applied); without it, the batch's captions
        as they are."""
        if cond is None:
            text = self.text_conditioning(batch, drop_captions=False)
            cond = self.family.conditioning(self, batch, text, noisy_latents)
        return self.training_mode.control_residuals(self, batch, noisy_latents, timesteps, cond)

    def drop_captions(self, captions: list[str]) -> list[str]:
        if self.proportion_empty_prompts <= 0:
            return list(captions)
        drop = torch.rand(len(captions)) < self.proportion_empty_prompts
        return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]

    def diffusion_loss(self, batch: dict, drop_captions: bool = True) -> torch.Tensor:
        """The family's objective on the mode's controlled prediction: MSE to the target."""
        with torch.no_grad():
            latents = self.training_mode.latents(self, batch)
            drop_captions = drop_captions and self.training_mode.drops_captions(batch)
            cond = self.family.conditioning(self, batch, self.text_conditioning(batch, drop_captions), latents)
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            latents = latents.contiguous(memory_format=layout)
        noisy, timesteps, target = self.training_mode.noise(self, batch, latents)
        residuals = self.training_mode.control_residuals(self, batch, noisy, timesteps, cond)
        pred = self.family.denoise(self.unet, noisy, timesteps, cond, residuals)
        weights = self.family.loss_weighting(self, timesteps, pred.ndim)  # None: plain MSE
        if weights is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:  # as diffusers' SD3 scripts: the weighted squared error, averaged
            loss = (weights.to(pred.device) * (pred.float() - target.float()) ** 2).mean()
        if self.aux_loss is not None:
            loss = loss + self.aux_loss(self, batch, latents, noisy, timesteps, pred, target)
        return loss

    def on_train_start(self) -> None:
        # Every rank was seeded alike (the same random init everywhere); noise must differ per
        # rank. Rank 0 keeps its stream, so a single-process resume stays exact.
        if self.global_rank > 0:
            torch.manual_seed(self.seed + 7919 * self.global_rank + self.trainer.global_step)
        for name in ("controlnet", "unet", "vae", "text_encoder"):
            module = getattr(self, name)
            if module is not None:
                log.info("%s on %s in %s", name, module.device, module.dtype)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # The loader sends uint8; the floats of the contract are made here, on the device.
        batch = normalize_batch(batch, self.control_key)
        if self.channels_last:
            for key in ("image", self.control_key, "latents", "latent_dist", "hint_latent_dist"):
                if key in batch:
                    batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if not self._first_batch_logged:
            self._first_batch_logged = True
            log.info(
                "first batch: %s",
                ", ".join(f"{k} {tuple(v.shape)} {v.dtype} {v.device}" for k, v in batch.items() if torch.is_tensor(v)),
            )
            probes = self._probe_control_tensors(batch) if log.isEnabledFor(logging.DEBUG) else []
            try:
                loss = self.diffusion_loss(batch)
            finally:
                for handle in probes:
                    handle.remove()
        else:
            loss = self.diffusion_loss(batch)
        self.data_position = tuple(batch["data_position"])
        # Rank 0's loss: averaging over ranks would cost an all-reduce every step. The progress bar
        # shows it here; callbacks.StepMetrics logs it, before the step's checkpoint is written.
        self.log("train/loss", loss, prog_bar=True, logger=False, batch_size=len(batch["caption"]))
        return loss

    def _probe_control_tensors(self, batch: dict) -> list:
        """DEBUG, first batch: where the control tensors live. The hint as the step gets it, the ControlNet's
        residuals as it returns them and the residuals as the UNet receives them (hooks, removed after)."""
        log.debug("control: hint %s (control_key %s, controlnet_reroute=%s)", _tensors(batch.get(self.control_key)),
                  self.control_key, self.reroute)  # fmt: skip
        handles = []
        if self.controlnet is not None:
            handles.append(self.controlnet.register_forward_hook(
                lambda m, args, out: log.debug("control: the ControlNet's residuals %s", _tensors(out))))  # fmt: skip

        def unet_inputs(m, args, kwargs):
            residuals = [kwargs.get("down_block_additional_residuals"), kwargs.get("mid_block_additional_residual")]
            received = [r for r in residuals if r is not None]
            log.debug("control: the UNet receives residuals %s", _tensors(received) if received else "none")

        handles.append(self.unet.register_forward_pre_hook(unet_inputs, with_kwargs=True))
        return handles

    # -- optimizer -------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        groups = self.training_mode.param_groups(self, o)
        for group in groups:
            group["lr"] = group["lr"] * self.lr_scale
        if o.get("use_8bit_adam"):
            optimizer, kind = adamw_8bit(groups, o, self.device), "AdamW8bit (bitsandbytes)"
        else:
            fused = bool(o.fused) and self.device.type == "cuda"
            optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(o.betas), eps=o.eps,
                                          weight_decay=o.weight_decay, fused=fused or None)  # fmt: skip
            kind = "AdamW (fused)" if fused else "AdamW"
        log.info(
            "%s: %s",
            kind,
            ", ".join(f"{g['name']} {sum(p.numel() for p in g['params']) / 1e6:.2f}M lr={g['lr']}" for g in groups),
        )
        # diffusers' --lr_scheduler, --lr_num_cycles and --lr_power (each scheduler ignores what it has no use for);
        # polynomial decays to 1e-7 relative to the optimizer's default lr: the first group's, as in diffusers
        scheduler = get_scheduler(
            o.lr_scheduler, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=self.trainer.max_steps,
            num_cycles=int(o.get("lr_num_cycles", 1)), power=float(o.get("lr_power", 1.0)),
        )  # fmt: skip
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        # control_training_schedule: the groups whose role rests this step lose their gradients, so AdamW
        # neither moves nor decays them (it skips a parameter without a gradient; its moments wait). Once per
        # optimizer step, after the accumulated backward passes and before clipping (whose norm then covers
        # only what trains); global_step counts optimizer steps, so the phase survives accumulation and resume.
        if self.schedule.standard:
            return
        step = self.trainer.global_step
        for group in optimizer.param_groups:
            if not self.schedule.active(group.get("role"), step):
                for p in group["params"]:
                    p.grad = None
        self._log_phase(step)

    def _log_phase(self, step: int) -> None:
        """The phase to the loggers under the step's number (as StepMetrics logs train/loss: after this
        optimizer step global_step is step + 1), before any callback writes that step's checkpoint; a host
        integer, no device sync."""
        index = self.schedule.phase_index(step)
        for logger in self.trainer.loggers:
            logger.log_metrics({"train/phase": float(index)}, step=step + 1)
        if index != self._phase_logged:
            self._phase_logged = index
            level = logging.DEBUG if self.schedule.kind == "alternate" else logging.INFO
            log.log(level, "optimizer step %d: phase %d (%s trains)", step + 1, index, self.schedule.phases[index])

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        # optim.set_grads_to_none (diffusers' --set_grads_to_none): None frees the gradients' memory between
        # steps (torch's default); false keeps zero-filled tensors
        optimizer.zero_grad(set_to_none=bool(self.optim_cfg.get("set_grads_to_none", True)))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's FSDP precision refuses norm clipping; FSDP's own clip computes the norm over
        # all shards (a plain per-rank clip would use each rank's partial norm).
        if gradient_clip_val and is_fsdp(self.trainer.strategy) and gradient_clip_algorithm in (None, "norm"):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trainable_named_parameters())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CHECKPOINT_META] = {
            "mode": self.training_mode.name,
            "family": self.family.name,
            "base_fingerprint": self.base_fingerprint,
            "sd_locked": self.sd_locked,
            **self.training_mode.checkpoint_meta(self),
            "schedule": self.schedule.record(),
            "reroute": self.reroute,
            "data_position": list(self.data_position),
            # Noise, timesteps and caption dropout continue where they were instead of replaying
            # the draws of step 0 (this rank's generator; ranks are seeded alike).
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CHECKPOINT_META, {})
        mode = self.training_mode.name
        if meta.get("mode") not in (None, mode):  # (None: written before modes were recorded)
            raise RuntimeError(
                f"checkpoint was written in mode {meta['mode']!r}, but this run trains in mode {mode!r}: "
                f"resume with the run's own config (training_mode={meta['mode']}), or start over with resume=false"
            )
        if meta.get("base_fingerprint") not in (None, self.base_fingerprint):
            raise RuntimeError(
                f"checkpoint was trained over base model {meta['base_fingerprint']}, but this config builds "
                f"{self.base_fingerprint}: resume with the run's own model config, or start over with resume=false"
            )
        self._refuse_other_options(meta)
        missing = sorted(set(self.trainable_named_parameters()) - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trainable weight(s), first: {missing[0]} "
                f"(was it written with another sd_locked? it says sd_locked={meta.get('sd_locked')})"
            )
        self.data_position = tuple(meta.get("data_position", (0, -1)))
        if meta.get("torch_rng") is not None:
            torch.set_rng_state(meta["torch_rng"])
        if meta.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(meta["cuda_rng"], self.device)

    def _refuse_other_options(self, meta: dict) -> None:
        """A resume under another adapter type, schedule or residual routing is refused, naming the key and
        both values. A key the checkpoint lacks (written before it was recorded) is not compared."""
        schedule, recorded = self.schedule.record(), meta.get("schedule") or {}
        adapter = self.training_mode.checkpoint_meta(self).get("adapter")
        checks = [  # (key, recorded?, the checkpoint's value, this run's)
            ("adapter.type", "adapter" in meta, meta.get("adapter"), adapter),
            ("control_training_schedule", "kind" in recorded, recorded.get("kind"), schedule["kind"]),
            ("schedule.period", "period" in recorded, recorded.get("period"), schedule["period"]),
            ("schedule.phases", "phases" in recorded, recorded.get("phases"), schedule["phases"]),
            ("controlnet_reroute", "reroute" in meta, meta.get("reroute"), self.reroute),
        ]  # fmt: skip
        for key, present, theirs, ours in checks:
            if present and theirs != ours:
                raise RuntimeError(
                    f"checkpoint was written with {key}={theirs!r}, but this run has {key}={ours!r}: resume with "
                    "the run's own config, or start over with resume=false"
                )


def _tensors(value) -> str:
    """'N tensor(s) on <devices> in <dtypes>' for a tensor or any nesting of them (tuples, lists, outputs)."""
    found = []

    def walk(v):
        if torch.is_tensor(v):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(value)
    if not found:
        return "none"
    devices = sorted({str(t.device) for t in found})
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in found})
    return f"{len(found)} tensor(s) on {', '.join(devices)} in {', '.join(dtypes)}"


def adamw_8bit(groups: list[dict], o: DictConfig, device: torch.device):
    """bitsandbytes' AdamW8bit (diffusers' --use_8bit_adam): optimizer states in 8 bits, CUDA only."""
    if device.type != "cuda":
        raise RuntimeError(f"optim.use_8bit_adam=true: 8-bit Adam needs CUDA; the module is on {device}")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError("optim.use_8bit_adam=true: bitsandbytes is not installed (pip install bitsandbytes)") from e
    return bnb.optim.AdamW8bit(groups, lr=groups[0]["lr"], betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
