"""Two CPU processes over gloo, launched through the real command. DDP (gradients all-reduced in
bf16: trainer=ddp_bf16): the same loss trajectory as one process with the same global batch,
checkpoints from rank 0 only, and they resume on one process. FSDP (trainer=fsdp): the same
steps as DDP with the ControlNet sharded, full checkpoints and export."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from nemo_controlnet.training.checkpoint import list_checkpoints
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.run import train
from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[1]
STEPS = 10


def _losses(run: Path) -> list[float]:
    rows = []
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(path)) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in rows]


def _launch(run: Path, shapes_dir: Path, *overrides: str) -> None:
    """Two CPU processes through the real command, as a user launches them."""
    args = [
        sys.executable, "-m", "nemo_controlnet.cli.train", f"run_dir={run}", f"data.shards={shapes_dir / 'train'}",
        "data.synthetic=null", "data.num_workers=0", "data.batch_size=2", "trainer.accelerator=cpu",
        "trainer.precision=32", "trainer.devices=2", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=5", f"validation.shards={shapes_dir / 'val'}",
        "validation.num_samples=3", "validation.num_inference_steps=2", "validation.every_n_steps=0", "logger=csv",
        "model.proportion_empty_prompts=0.0", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [5, 10]
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 keeps its own log


@pytest.fixture(scope="module")
def ddp_run(shapes_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    _launch(run, shapes_dir, "trainer=ddp_bf16")
    return run


def test_two_process_ddp_matches_one_process_and_resumes_on_one(train_cfg, ddp_run, tmp_path):
    single_run = tmp_path / "single"
    _, _ = train(train_cfg(f"run_dir={single_run}", "data.batch_size=4", f"trainer.max_steps={STEPS}",
                           "checkpoint.every_n_steps=5", "validation.num_samples=3", "validation.every_n_steps=0",
                           "model.proportion_empty_prompts=0.0"))  # fmt: skip
    # Validation split across the two ranks (2 + 1 samples) and gathered: the untrained grid is the
    # one a single process draws, sample by sample (up to batch-size-dependent rounding).
    ddp_grid = np.asarray(Image.open(ddp_run / "samples" / "step_0000000.png")).astype(int)
    single_grid = np.asarray(Image.open(single_run / "samples" / "step_0000000.png")).astype(int)
    assert ddp_grid.shape == single_grid.shape == (3 * 64, 128, 3)
    assert np.abs(ddp_grid - single_grid).max() <= 2
    ddp, single = _losses(ddp_run), _losses(single_run)
    assert len(ddp) == len(single) == STEPS
    # Rank 0's loss over its own batch of 2 against one process's batch of 4: different samples and
    # noise each step, so the trajectories agree in distribution (seen: means 1.167 vs 1.126); a
    # diverging or NaN run fails the bounds below. Checkpoints and resume are the exact checks.
    assert abs(sum(ddp) / STEPS - sum(single) / STEPS) < 0.1
    assert all(0.5 < x < 2.0 for x in ddp)

    trainer, module = train(train_cfg(f"run_dir={ddp_run}", "data.batch_size=2", f"trainer.max_steps={STEPS + 2}",
                                      "checkpoint.every_n_steps=5", "validation.num_samples=0"))  # fmt: skip
    assert trainer.global_step == STEPS + 2 and trainer.world_size == 1


def test_fsdp_shards_the_controlnet_like_ddp_trains_it_and_exports_it_whole(train_cfg, shapes_dir, ddp_run, tmp_path):
    """trainer=fsdp (on CPU through a test-only strategy subclass, see cpu_fsdp.py): the same steps as
    DDP, a full checkpoint that resumes on one process, the whole ControlNet exported."""
    run = tmp_path / "fsdp"
    _launch(run, shapes_dir, "trainer=fsdp", "trainer.strategy._target_=tests.cpu_fsdp.CPUFSDPStrategy",
            "validation.every_n_steps=5")  # fmt: skip
    log = (run / "train.log").read_text()
    assert "FSDP: sharding the ControlNet in units" in log
    # Same data, seeds and noise per rank as DDP: the same loss trajectory up to DDP's bf16 gradients.
    fsdp, ddp = _losses(run), _losses(ddp_run)[:STEPS]  # (the DDP test may have resumed that run)
    assert len(fsdp) == STEPS and abs(fsdp[0] - ddp[0]) < 1e-5
    assert max(abs(a - b) for a, b in zip(fsdp, ddp, strict=True)) < 0.02

    # The checkpoint holds every trainable weight at full size (gathered, not one rank's shard).
    cfg = compose_train()
    expected = {k: v.shape for k, v in ControlNetModule(cfg.model, cfg.optim).trainable_named_parameters().items()}
    ckpt = torch.load(run / "checkpoints" / "step=0000010.ckpt", weights_only=True, map_location="cpu")
    assert {k: v.shape for k, v in ckpt["state_dict"].items()} == expected
    ddp_ckpt = torch.load(ddp_run / "checkpoints" / "step=0000010.ckpt", weights_only=True, map_location="cpu")
    for name, value in ckpt["state_dict"].items():
        torch.testing.assert_close(value, ddp_ckpt["state_dict"][name], atol=5e-3, rtol=0, msg=name)

    # Exported whole, equal to the checkpoint; validation grids drawn while sharded.
    exported = ControlNetModel.from_pretrained(run / "controlnet")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][f"controlnet.{name}"]), name
    assert [p.name for p in sorted((run / "samples").glob("*.png"))] == [
        "step_0000000.png",
        "step_0000005.png",
        "step_0000010.png",
    ]
    trainer, _ = train(train_cfg(f"run_dir={run}", "data.batch_size=2", f"trainer.max_steps={STEPS + 2}",
                                 "checkpoint.every_n_steps=5", "validation.num_samples=0"))  # fmt: skip
    assert trainer.global_step == STEPS + 2


def test_flux_fsdp_experiment_shards_the_flux_controlnet_and_exports_it_whole(shapes_dir, tmp_path):
    """+experiment=flux_fsdp on tiny Flux, two CPU processes: the ControlNet's double and single blocks are
    the FSDP units, every block is activation-checkpointed, and the export is the whole ControlNet."""
    from diffusers import FluxControlNetModel

    run = tmp_path / "flux"
    _launch(run, shapes_dir, "model=tiny_flux", "+experiment=flux_fsdp", "data.resolution=64", "data.batch_size=2",
            "trainer.strategy._target_=tests.cpu_fsdp.CPUFSDPStrategy", "validation.num_inference_steps=2")  # fmt: skip
    log = (run / "train.log").read_text()
    assert "FSDP: sharding the ControlNet in units ['FluxControlNetModel', 'FluxSingleTransformerBlock', " \
           "'FluxTransformerBlock']" in log  # fmt: skip
    assert "'checkpointed_controlnet_blocks': 1" in log and "'checkpointed_unet_decoder_blocks': 1" in log
    assert len(_losses(run)) == STEPS
    ckpt = torch.load(run / "checkpoints" / "step=0000010.ckpt", weights_only=True, map_location="cpu")
    exported = FluxControlNetModel.from_pretrained(run / "controlnet")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][f"controlnet.{name}"]), name
