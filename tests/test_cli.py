"""The console commands as a user runs them: Hydra mains with command-line overrides."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
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


# -- a user's mistakes: one line naming the argument, key or path ---------------------------------------------------

SCRIPTS = Path(sys.executable).parent  # the console scripts beside the interpreter (.venv/bin)


def _command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A console script as the user runs it: the installed entry point itself, not ``python -m``."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([str(SCRIPTS / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _error_lines(stderr: str, prog: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]


def test_override_grammar_error_names_the_argument_and_the_quoting_that_works(tmp_path):
    start = time.monotonic()
    proc = _command("controlnet-prep", "source=shards", "source.shards=/data/x-{0..9}.tar", f"out_dir={tmp_path / 'o'}",
                    cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and time.monotonic() - start < 30, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "controlnet-prep: error: source.shards=/data/x-{0..9}.tar: Hydra cannot parse '{' in a value; quote the value "
        """for Hydra inside the shell's quotes: 'source.shards="/data/x-{0..9}.tar"'"""
    )
    assert not (tmp_path / "o").exists()
    # The suggested quoting, typed into bash, gives Hydra the value with its braces.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{SCRIPTS}{os.pathsep}{os.environ['PATH']}"}
    shown = subprocess.run(["bash", "-c", """controlnet-prep source=shards 'source.shards="/data/x-{0..9}.tar"' """
                            "out_dir=/o --cfg job"], cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert shown.returncode == 0 and "shards: /data/x-{0..9}.tar" in shown.stdout, shown.stderr


def test_a_brace_pattern_the_shell_expanded_is_named_not_cut_to_one_shard(tmp_path):
    """Unquoted in bash, data.shards=/d/s-{0..2}.tar becomes three overrides; Hydra would keep the last."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{SCRIPTS}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", "controlnet-train data.shards=/d/s-{0..2}.tar --cfg job"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "data.shards is given 3 times (data.shards=/d/s-0.tar data.shards=/d/s-1.tar" in proc.stderr
    assert proc.stderr.strip().endswith("""the shell expanded an unquoted brace pattern; quote it for Hydra inside """
                                        """the shell's quotes: 'data.shards="/d/s-{0..2}.tar"'"""), proc.stderr
    # Repeated keys that are not an expanded pattern keep Hydra's rule (the last wins): wrappers rely on it.
    proc = subprocess.run(["bash", "-c", "controlnet-train data.batch_size=2 data.batch_size=3 --cfg job"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and "batch_size: 3" in proc.stdout, proc.stderr


def test_override_error_messages():
    from nemo_controlnet.cli import override_error

    assert override_error("data.shards=/d/x.tar") is None
    assert override_error('data.shards="/d/x-{0..9}.tar"') is None
    assert override_error("+trainer.max_steps=5") is None and override_error("optim.lr=1e-5,3e-5") is None
    assert override_error("...").startswith("...: not an override (key=value, +key=value or ~key)")
    assert override_error("x=(1").endswith("""Hydra cannot parse '(' in a value; quote the value for Hydra inside """
                                           """the shell's quotes: 'x="(1"'""")  # fmt: skip
    assert override_error('p=a"{b').endswith("""'p='"'"'a"{b'"'"''""")  # Hydra's single quotes, shell-quoted


def test_misspelled_trainer_key_fails_before_any_data_or_model(tmp_path):
    run = tmp_path / "run"
    start = time.monotonic()
    proc = _command("controlnet-train", "+trainer.max_stpes=5", f"run_dir={run}", cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    message = "trainer.max_stpes: not an argument of lightning.Trainer (did you mean trainer.max_steps?)"
    [line] = _error_lines(proc.stderr, "controlnet-train")
    assert line == f"controlnet-train: error: invalid training config: {message}"
    assert not (run / "data").exists() and not (tmp_path / "data").exists()  # nothing synthesized
    log = (run / "train.log").read_text()
    assert "built " not in log and message in log  # no model built; the message is in the run's log
    assert elapsed < 60  # the imports: about 10 s on 2 busy cores (it used to synthesize and build first)


def test_missing_shards_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    missing = tmp_path / "nowhere" / "shard-000000.tar"
    args = ("controlnet-train", "data=shards", f"data.shards={missing}", f"run_dir={tmp_path / 'run'}")
    proc = _command(*args, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = _error_lines(proc.stderr, "controlnet-train")
    assert "data.shards" in line and str(missing) in line
    assert str(missing) in (tmp_path / "run" / "train.log").read_text()

    proc = _command(*args, "--verbose", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "FileNotFoundError: data.shards" in proc.stderr


def test_output_dir_that_cannot_be_created_is_named_by_its_key(tmp_path):
    (tmp_path / "afile").write_text("")
    proc = _command("controlnet-train", f"run_dir={tmp_path / 'afile' / 'run'}", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert _error_lines(proc.stderr, "controlnet-train") == [
        f"controlnet-train: error: run_dir='{tmp_path / 'afile' / 'run'}': cannot create or write the directory "
        f"({tmp_path / 'afile'} is a file)"
    ]
    proc = _command("controlnet-prep", f"source.root={tmp_path}", f"out_dir={tmp_path / 'afile' / 'o'}", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    [line] = _error_lines(proc.stderr, "controlnet-prep")
    assert f"out_dir='{tmp_path / 'afile' / 'o'}'" in line and "is a file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no logs left in the working directory


def test_output_dirs_are_checked_by_the_config_checks_too(tmp_path):
    from hydra import compose, initialize_config_module

    from nemo_controlnet.config import ConfigError, output_dir_problem, validate_prep_config, validate_train_config
    from tests.conftest import compose_train

    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=r"^invalid training config: run_dir='.*afile/run': cannot create or write "
                                          r"the directory \(.*afile is a file\)$"):  # fmt: skip
        validate_train_config(compose_train([f"run_dir={tmp_path / 'afile' / 'run'}"]))
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        prep = compose(config_name="prep", overrides=[f"source.root={tmp_path}", f"out_dir={tmp_path / 'afile'}"])
        with pytest.raises(ConfigError, match=r"out_dir='.*afile': cannot create .*afile is a file"):
            validate_prep_config(prep)
        with pytest.raises(ConfigError, match=r"out_dir: missing .*required for mode=shards"):
            validate_prep_config(compose(config_name="prep", overrides=[f"source.root={tmp_path}"]))
        with pytest.raises(ConfigError, match=r"hint.low_treshold: not an argument of nemo_controlnet.data.hints.Canny "
                                              r"\(did you mean hint.low_threshold\?\)"):  # fmt: skip
            validate_prep_config(compose(config_name="prep", overrides=[f"source.root={tmp_path}", "out_dir=/o",
                                                                        "+hint.low_treshold=5"]))  # fmt: skip
        validate_prep_config(compose(config_name="prep", overrides=["mode=precompute", f"source.root={tmp_path}"]))
    assert output_dir_problem(tmp_path / "new" / "deeper") is None
    assert output_dir_problem(tmp_path / "afile") == f"{tmp_path / 'afile'} is a file"


def test_user_errors_end_as_one_line_and_others_pass(capsys, monkeypatch):
    import errno

    from nemo_controlnet.cli import user_errors
    from nemo_controlnet.config import ConfigError

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    errors = [ConfigError("x.y=1: expected z"), FileNotFoundError("no such shard /d/a.tar"),
              OSError(errno.ENOSPC, "No space left on device"), PermissionError(13, "Permission denied", "/r")]
    for error in errors:
        with pytest.raises(SystemExit) as exit_:
            with user_errors():
                raise error
        assert exit_.value.code == 1
        assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit):  # a DataLoader worker's error: the worker's own last line
        with user_errors():
            raise FileNotFoundError("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback "
                                    "(most recent call last):\n  File ...\nFileNotFoundError: data.shards: gone")
    assert capsys.readouterr().err.endswith(": error: FileNotFoundError: data.shards: gone\n")
    with pytest.raises(OSError):  # not a user error: the traceback
        with user_errors():
            raise OSError(errno.EIO, "I/O error")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError):  # verbose: the traceback
        with user_errors():
            raise FileNotFoundError("x")


def test_the_default_run_writes_its_data_and_logs_under_its_own_directories(tmp_path):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from nemo_controlnet.training.run import ensure_synthetic_data
    from tests.conftest import compose_train

    run = tmp_path / "run"
    cfg = compose_train([f"run_dir={run}", "data.synthetic.train.num_samples=4", "data.synthetic.train.shard_size=4"])
    OmegaConf.resolve(cfg)
    assert cfg.data.shards == f"{run}/data/shapes/train" and cfg.validation.shards == f"{run}/data/shapes/val"
    ensure_synthetic_data(cfg.data)
    assert len(expand_shards(run / "data" / "shapes" / "train")) == 1 and (run / "data/shapes/val").is_dir()
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        prep = compose(config_name="prep", overrides=["out_dir=/o"], return_hydra_config=True)
        assert prep.hydra.run.dir.startswith("/o/.prep-logs/")
        prep = compose(config_name="prep", overrides=["mode=precompute", "source.root=/p"], return_hydra_config=True)
        assert prep.hydra.run.dir.startswith("/p/.prep-logs/")
        synth = compose(config_name="synth", return_hydra_config=True)  # its own config: no run_dir
        assert synth.dataset.out_dir == "data/shapes/train" and synth.hydra.run.dir == "data/shapes/train/.synth-logs"
