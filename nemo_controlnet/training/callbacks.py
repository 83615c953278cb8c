"""Callbacks at optimizer-step boundaries: step checkpoints kept last-K, the loss row, throughput and
MFU, preemption (checkpoint, then stop or requeue), the step progress bar. Validation: validation.py."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.flop_counter import FlopCounterMode

from nemo_controlnet.training.checkpoint import checkpoint_name, list_checkpoints, remove_checkpoint

log = logging.getLogger(__name__)


class _StepBoundary(L.Callback):
    """Knows whether the batch that just ended finished an optimizer step (with gradient
    accumulation, most batches do not): the only moments a checkpoint is consistent."""

    _step_at_batch_start = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_at_batch_start = trainer.global_step

    def stepped(self, trainer) -> bool:
        return trainer.global_step != self._step_at_batch_start


class EveryNOptimizerSteps(_StepBoundary):
    """Fires right after every N-th optimizer step (never mid-accumulation), and at the end."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._last_fired = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.stepped(trainer) and self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self._fire(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        self._fire(trainer, pl_module, trainer.global_step)

    def _fire(self, trainer, pl_module, step: int) -> None:
        if step != self._last_fired:
            self._last_fired = step
            self.fire(trainer, pl_module, step)

    def fire(self, trainer, pl_module, step: int) -> None:
        raise NotImplementedError


class StepCheckpoint(EveryNOptimizerSteps):
    """``checkpoints/step=NNNNNNN.ckpt`` every N steps and at the end; keeps the newest ``keep_last``.

    Names carry the step so the newest complete checkpoint is found by name alone.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_last: int = 2):
        super().__init__(every_n_steps)
        self.dirpath = Path(dirpath)
        self.keep_last = keep_last

    def fire(self, trainer, pl_module, step: int) -> None:
        if step == 0:
            return
        save_step_checkpoint(trainer, self.dirpath, step)
        if trainer.is_global_zero and self.keep_last > 0:
            for _, old in list_checkpoints(self.dirpath)[: -self.keep_last]:
                remove_checkpoint(old)
                log.info("removed old checkpoint %s", old)


def save_step_checkpoint(trainer, dirpath: Path, step: int) -> bool:
    """``dirpath/step=N.ckpt`` unless it exists. The loggers are flushed first: every row logged up
    to this step is on disk before the checkpoint that covers it, so a kill right after the
    checkpoint loses no row (the resumed run logs from the next step on)."""
    path = dirpath / checkpoint_name(step)
    # Rank 0's answer for every rank: a rank that looked after rank 0 had written the file would skip
    # save_checkpoint, whose barrier the others then wait at forever.
    if trainer.strategy.broadcast(path.exists()):
        return False
    for logger in trainer.loggers:
        logger.save()
    trainer.save_checkpoint(path, weights_only=False)  # every rank calls it; the strategy writes on rank 0
    return True


class StepMetrics(_StepBoundary):
    """Logs ``train/loss`` (the mean over the step's micro-batches) at every ``log_every_n_steps``-th
    optimizer step, under that step's number, from ``on_train_batch_end``: before the checkpoint
    of the same step is written (Lightning would log it only after every callback had run). With an
    auxiliary loss (training/aux_loss.py), its weighted term too, as ``train/<aux_loss>``, in the same sync."""

    def __init__(self, every_n_steps: int):
        self.every = max(1, int(every_n_steps))
        self._losses: list[torch.Tensor] = []
        self._aux: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(loss.detach())
        aux = getattr(pl_module, "aux_loss", None)
        if aux is not None and aux.last is not None:
            self._aux.append(aux.last)  # already detached, on the device: no sync here
            aux.last = None
        if not self.stepped(trainer):
            return
        step, losses, self._losses = trainer.global_step, self._losses, []
        aux_terms, self._aux = self._aux, []
        if step % self.every == 0 and losses and trainer.loggers:
            # Lightning hands over the loss divided by the accumulation count; undo that (not the aux term's).
            means = [torch.stack(losses).float().mean() * trainer.accumulate_grad_batches]
            if aux_terms:
                means.append(torch.stack(aux_terms).float().mean().to(means[0].device))
            values = torch.stack(means).tolist()  # a sync every N steps only
            metrics = {"train/loss": values[0]}
            if aux_terms:
                metrics[f"train/{aux.name}"] = values[1]
            for logger in trainer.loggers:  # every one of report_to's (trainer.logger is only the first)
                logger.log_metrics(metrics, step=step)


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}


def peak_tflops(configured: float | None = None) -> float | None:
    """Dense bf16 peak of this GPU (config wins); None on a CPU or an unknown GPU: no MFU then."""
    if configured:
        return float(configured)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class Throughput(L.Callback):
    """Logs samples/s, the fraction of step time spent waiting for data, peak memory, TFLOP/s and
    MFU. Model FLOPs per sample are counted once (torch.utils.flop_counter on the first batch,
    forward + backward, RNG and gradients left as they were); the first ``warmup_steps`` steps
    (compilation, allocator growth) are not averaged. The device is synchronized once per logging
    window, never per step, so measuring does not slow the step."""

    def __init__(self, warmup_steps: int = 5, log_every_n_steps: int = 10, peak: float | None = None,
                 count_flops: bool = True):  # fmt: skip
        self.warmup_steps, self.every = warmup_steps, max(1, log_every_n_steps)
        self.peak, self.count_flops = peak, count_flops
        self.flops_per_sample: float | None = None
        self._batch_end = self._window_start = None
        self._samples, self._last_logged = 0, -1
        self._busy = self._waiting = 0.0

    def _count(self, trainer, pl_module, batch) -> None:
        # The batch is already on the device and normalized (on_after_batch_transfer ran).
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        # Under the trainer's precision context (autocast), as the real step runs.
        with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
            with trainer.precision_plugin.forward_context():
                loss = pl_module.diffusion_loss(dict(batch))
            loss.backward()
        for p in pl_module.parameters():
            p.grad = None
        self.flops_per_sample = counter.get_total_flops() / len(batch["caption"])
        log.info("model FLOPs per sample (forward + backward): %.3g", self.flops_per_sample)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.count_flops and self.flops_per_sample is None:
            self._count(trainer, pl_module, batch)
        now = time.perf_counter()
        if self._batch_end is not None and self._window_start is not None:
            self._waiting += now - self._batch_end  # the host waited for this batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.warmup_steps and self._window_start is None:
            self._sync(pl_module)  # the window starts after warm-up, with the device caught up
            self._window_start = time.perf_counter()
        elif self._window_start is not None:
            self._samples += len(batch["caption"]) * trainer.world_size
            if step % self.every == 0 and step != self._last_logged:
                self._sync(pl_module)  # one sync a logging window: the device has finished its work
                self._busy = time.perf_counter() - self._window_start
                self._last_logged = step
                metrics = self.metrics(pl_module)
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)
        self._batch_end = time.perf_counter()

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def metrics(self, pl_module) -> dict:
        """Over the window since warm-up: samples/s of wall time, and the share of it the host
        spent waiting for the loader."""
        total = self._busy
        rate = self._samples / total if total else 0.0
        out = {"perf/samples_per_s": rate, "perf/data_wait_fraction": min(1.0, self._waiting / total) if total else 0.0}
        if pl_module.device.type == "cuda":
            out["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if self.flops_per_sample:
            tflops = self.flops_per_sample * rate / 1e12 / max(1, pl_module.trainer.world_size)
            out["perf/tflops_per_device"] = tflops
            peak = peak_tflops(self.peak)
            if peak:
                out["perf/mfu"] = tflops / peak
        return out


class Preemption(_StepBoundary):
    """On SIGUSR1 (SLURM's warning: ``#SBATCH --signal=USR1@120``), SIGTERM or Ctrl-C (SIGINT): finish
    the step, write ``checkpoints/step=N.ckpt``, stop, and requeue the job when under SLURM. The
    requeued job resumes from that checkpoint at the same step. Ranks agree on stopping every
    ``check_every`` steps. A second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint."""

    SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")

    def __init__(self, dirpath: str | Path, check_every: int = 10):
        self.dirpath = Path(dirpath)
        self.check_every = check_every
        self.requested: int | None = None
        self.stopped = False
        self._previous: dict = {}
        self._before_fit: dict = {}

    def setup(self, trainer, pl_module, stage):
        # The process's own handlers, from before Lightning registers its (after the setup hooks).
        import signal

        self._before_fit = {name: signal.getsignal(getattr(signal, name)) for name in self.SIGNALS}

    def on_train_start(self, trainer, pl_module):
        # Installed after Lightning's own SIGTERM handler (registered once fit has set up), in its
        # place: Lightning's would end a DDP run at the next batch with SIGTERMException, before the
        # checkpoint, and a single process at the end without the requeue. A SIGTERM it caught
        # before this point is taken over.
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        if getattr(trainer, "received_sigterm", False):
            trainer.received_sigterm = False
            self._handle(signal.SIGTERM, None)

    def _restore(self) -> None:
        # Put the process's handlers of before the fit back, the ones Lightning restores at teardown
        # too: left in place, ours would swallow a SIGTERM after the run, also in every process forked
        # later (a worker pool's terminate() would then wait forever). Not Lightning's: between here
        # and its teardown a SIGTERM (SLURM ending a requeued job) would run its handler, a broadcast
        # to ranks that may have exited already (a gloo "Connection reset" traceback).
        import signal

        for name, handler in self._previous.items():
            handler = self._before_fit.get(name, handler)
            signal.signal(getattr(signal, name), handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()  # a failed run (a full disk, a bad batch) does not reach on_train_end

    def _handle(self, signum, frame):
        import signal

        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if self.stopped:  # checkpointed and stopping: SLURM ending the requeued job, say
            log.info("signal %s received while stopping", signal.Signals(signum).name)
            return
        self.requested = signum
        log.warning("signal %s received: checkpoint at the end of this step, then stop%s", signal.Signals(signum).name,
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.stepped(trainer):  # mid-accumulation: no optimizer step to save yet
            return
        if trainer.world_size > 1:
            if step % self.check_every:
                return
            stop = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
        else:
            stop = self.requested is not None
        if not stop or self.stopped:
            return
        save_step_checkpoint(trainer, self.dirpath, step)  # already there when the signal came during its write
        trainer.should_stop = True
        self.stopped = True
        log.warning("preempted: checkpoint at step %d written, stopping", step)

    def on_train_end(self, trainer, pl_module):
        import os
        import subprocess

        job = os.environ.get("SLURM_JOB_ID")
        if self.stopped and trainer.is_global_zero and job:
            # Before the handlers go back: the requeue ends this job with a SIGTERM, which ours only logs.
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                log.warning("requeued SLURM job %s", job)
            else:
                log.error("could not requeue SLURM job %s: %s", job, result.stderr.strip())
        self._restore()


class StepProgressBar(TQDMProgressBar):
    """Progress in optimizer steps (``step 30/600``) from where the run (re)started: the training
    stream is endless, so Lightning's per-epoch batch count (``Epoch 0/-2``) means nothing here."""

    @property
    def train_description(self) -> str:  # the bar's name from its creation on
        return "step"

    def on_train_start(self, trainer, *args):
        super().on_train_start(trainer, *args)
        # Here too: a run resumed in mid-epoch gets no on_train_epoch_start (it showed "Training: 5/?").
        self._in_steps(trainer)

    def on_train_epoch_start(self, trainer, *_):  # instead of Lightning's ("Epoch N", a batch count)
        self._in_steps(trainer)

    def _in_steps(self, trainer) -> None:
        bar = self.train_progress_bar  # named "step" at its creation (train_description)
        if bar.total != trainer.max_steps:  # once: the endless stream is one Lightning epoch
            bar.reset(total=trainer.max_steps)
            self._show(bar, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(n, bar.total):
            self._show(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    @staticmethod
    def _show(bar, n: int) -> None:
        if not bar.disable:
            bar.n = n
            bar.refresh()
