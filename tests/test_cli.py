"""The console commands as a user runs them: Hydra mains with command-line overrides."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from nemo_controlnet.data.webdataset import expand_shards
from nemo_controlnet.training.run import train

REPO = Path(__file__).resolve().parents[1]


def _run(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", f"nemo_controlnet.cli.{module}", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_synth_and_generate_from_images_with_canny(train_cfg, tmp_path):
    _run(
        "synth",
        f"dataset.out_dir={tmp_path / 'synth'}",
        "dataset.num_samples=6",
        "dataset.shard_size=4",
        "dataset.resolution=32",
        cwd=tmp_path,
    )
    assert len(expand_shards(tmp_path / "synth")) == 2

    cfg = train_cfg("trainer.max_steps=1", "validation.num_samples=0")
    train(cfg)
    photo = np.zeros((80, 120, 3), np.uint8)
    photo[20:60, 40:80] = (200, 30, 30)  # a red square: canny finds its outline
    Image.fromarray(photo).save(tmp_path / "photo.jpg")
    out = tmp_path / "gen"
    _run(
        "generate",
        f"controlnet={cfg.run_dir}",
        f"images=[{tmp_path / 'photo.jpg'}]",
        "hint=canny",
        "prompts=[red square]",
        "num_inference_steps=2",
        f"out_dir={out}",
        cwd=tmp_path,
    )
    assert Image.open(out / "00000.png").size == (64, 64)
    grid = np.asarray(Image.open(out / "grid.png"))
    hint = grid[:, :64]
    assert hint.max() == 255 and (hint > 0).mean() < 0.2  # an edge map of the resized, cropped photo

    _run("export", f"run_dir={cfg.run_dir}", cwd=tmp_path)
    assert (Path(cfg.run_dir) / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


def test_bad_override_names_the_key(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_controlnet.cli.train",
            f"run_dir={tmp_path / 'r'}",
            "data.synthetic=null",
            f"data.shards={tmp_path}",
            "optim.lr=-1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "optim.lr=-1" in proc.stderr


def test_slurm_launcher_config_renders_one_task_per_gpu_with_preemption_signal(tmp_path, monkeypatch):
    """hydra/launcher=slurm, through hydra-submitit-launcher's parameter mapping into the sbatch
    script submitit would submit (a stub srun on PATH stands in for the cluster)."""
    import submitit
    from hydra import compose, initialize_config_module
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    overrides = ["hydra/launcher=slurm", "trainer=ddp_bf16", "trainer.num_nodes=4", f"run_dir={tmp_path / 'run'}",
                 "hydra.launcher.partition=gpu"]  # fmt: skip
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher") and params["max_num_timeout"] == 0
    # The launcher's own mapping (hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher.launch).
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm", slurm_max_num_timeout=0)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")})  # fmt: skip
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR1@120", "--partition=gpu",
                 f"--output={tmp_path / 'run' / 'submitit'}"):  # fmt: skip
        assert f"#SBATCH {line}" in script, line
    assert "export NCCL_ASYNC_ERROR_HANDLING=1" in script and "USR2" not in script  # one signal: ours
