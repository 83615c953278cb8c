"""controlnet-ui's backends without the page: training runs as real ``controlnet-train`` processes on the
tiny default model (start, read back, stop with a checkpoint, resume), the UI's fields as config keys,
and generation that gives controlnet-generate's images."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from nemo_controlnet.inference.generate import generate
from nemo_controlnet.prep.synthetic import write_shapes_dataset
from nemo_controlnet.ui.generation import Generator
from nemo_controlnet.ui.overrides import ProblemsError, format_override, run_overrides
from nemo_controlnet.ui.runs import LAUNCH_HEADER, PROCESS_LOG, RECORD, RunManager

# A small run of the embedded default: little generated data, no loader workers, cheap validation.
SMALL = [
    "data.synthetic.train.num_samples=64",
    "data.synthetic.train.shard_size=32",
    "data.synthetic.val.num_samples=2",
    "data.synthetic.val.shard_size=2",
    "validation.num_samples=2",
    "validation.num_inference_steps=2",
    "data.num_workers=0",
    "trainer.log_every_n_steps=2",
    "trainer.enable_model_summary=false",
    "perf.count_flops=false",
]
RUN_TIMEOUT_S = 300


def compose_config(name: str, overrides: list[str]):
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def small_run(steps: int, checkpoint_every: int, validate_every: int) -> list[str]:
    overrides, problems = run_overrides("tiny", steps, 4, 1e-4, "32", checkpoint_every,
                                        validate_every=validate_every, extra=SMALL)  # fmt: skip
    assert problems == {}
    return overrides


@pytest.fixture(scope="module")
def manager(tmp_path_factory) -> RunManager:
    return RunManager(tmp_path_factory.mktemp("runs"), env={"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def finished(manager) -> str:
    """A 20-step run, started through the manager and run to its end (export included)."""
    manager.start("short", small_run(20, 10, 10))
    info = manager.wait("short", timeout=RUN_TIMEOUT_S)
    assert info.state == "finished", info.log_tail
    return "short"


# ---- the UI's fields -------------------------------------------------------------------------------------


def test_fields_become_the_config_keys_training_reads(tmp_path):
    overrides, problems = run_overrides("tiny", 123.0, "3", "2e-4", "bf16-mixed", 0, validate_every=25,
                                        extra=["seed=7"])  # fmt: skip
    assert problems == {}
    cfg = compose_config("train", overrides)
    assert (cfg.trainer.max_steps, cfg.data.batch_size, cfg.optim.lr) == (123, 3, 2e-4)
    assert (cfg.trainer.precision, cfg.checkpoint.every_n_steps, cfg.validation.every_n_steps) == ("bf16-mixed", 0, 25)
    assert cfg.seed == 7 and cfg.model.name == "tiny"

    # Paths that Hydra's grammar would split, retype or unquote reach the config character for character.
    awkward = tmp_path / "sd [v1], it's" / "x=1 true"
    (awkward / "unet").mkdir(parents=True)
    (awkward / "model_index.json").write_text("{}")
    shards = write_shapes_dataset(tmp_path / "shards 1", num_samples=4, shard_size=4)
    overrides, problems = run_overrides(str(awkward), 10, 1, 1e-5, "32", 5, dataset=shards)
    assert problems == {}
    cfg = compose_config("train", overrides)
    assert cfg.model.name == "local_diffusers" and cfg.model.path == str(awkward)
    assert cfg.data.shards == str(shards / "manifest.json") and cfg.data.synthetic is None
    for text in ("true", "123", "a,b", "back\\", "q'uote\\'", "[1]", "x=y", " lead"):
        assert compose_config("train", [format_override("run_dir", text)]).run_dir == text

    folder = tmp_path / "photos"
    (folder / "canny").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    overrides, problems = run_overrides("tiny", 10, 1, 1e-5, "32", 5, dataset=folder)
    assert problems == {} and compose_config("train", overrides).data.folder.root == str(folder)
    (folder / "canny").rmdir()  # no precomputed hints: refused unless they are computed on the fly
    assert set(run_overrides("tiny", 10, 1, 1e-5, "32", 5, dataset=folder)[1]) == {"dataset"}
    assert run_overrides("tiny", 10, 1, 1e-5, "32", 5, dataset=folder, extra=["data.hint.on_the_fly=true"])[1] == {}


def test_bad_names_and_values_are_refused_before_anything_starts(tmp_path):
    manager = RunManager(tmp_path / "runs")
    for name in ("../x", "a/b", "", ".hidden", "..", "a\\b"):
        with pytest.raises(ProblemsError) as refused:
            manager.start(name, small_run(5, 5, 5))
        assert set(refused.value.problems) == {"name"}, name

    _, problems = run_overrides("tiny", 0, 4, -1, "fp7", 10)
    assert set(problems) == {"steps", "learning_rate", "precision"}
    _, problems = run_overrides("tiny7", 5, 2.5, 1.0, "32", -1, validate_every=True, extra=["a=[", "run_dir=/x"])
    assert set(problems) == {"model", "batch_size", "learning_rate", "checkpoint_every", "validate_every", "extra"}

    # Typed overrides get the command's own config checks, keyed by the field that sets the key.
    with pytest.raises(ProblemsError) as refused:
        manager.start("bad", ["trainer.precision=fp7", "trainer.max_steps=0", "optim.lr=-1"])
    assert set(refused.value.problems) == {"precision", "steps", "learning_rate"}
    assert "fp7" in refused.value.problems["precision"]
    cases = {"model": {"model": "nope"}, "steps": ["trainer.max_steps=[1"], "config": ["trainer.nope=1"]}
    for field, overrides in cases.items():
        with pytest.raises(ProblemsError) as refused:
            manager.start("bad", overrides)
        assert set(refused.value.problems) == {field}, refused.value.problems
    with pytest.raises(ProblemsError) as refused:  # model.path: ??? unset would fail in the process
        manager.start("bad", ["model=local_diffusers"])
    assert set(refused.value.problems) == {"model"}
    assert not (tmp_path / "runs").exists() and manager._procs == {}  # nothing written, nothing launched


# ---- runs ------------------------------------------------------------------------------------------------


def test_finished_run_reads_back_from_its_directory(manager, finished):
    info = manager.status(finished)
    assert (info.state, info.returncode, info.checkpoint_step, info.max_steps, info.step) == ("finished", 0, 20, 20, 20)
    assert info.grid.name == "step_0000020.png" and info.grid.is_file()
    assert (info.exported / "config.json").is_file()
    assert "`max_steps=20` reached" in info.log_tail
    record = json.loads((info.run_dir / RECORD).read_text())
    assert record["pid"] == info.pid and record["overrides"] == small_run(20, 10, 10)
    assert record["command"][1:3] == ["-m", "nemo_controlnet.cli.train"]

    curve = manager.loss_curve(finished)
    steps = [s for s, _ in curve]
    assert len(curve) >= 2 and steps == sorted(set(steps)) and steps[-1] == 20
    assert all(math.isfinite(v) and v > 0 for _, v in curve)
    rows = manager.metrics(finished)
    assert [r["step"] for r in rows] == [0, 10, 20] and all(0 <= r["edge_f1"] <= 1 for r in rows)

    # A UI started afresh (no process handle) reads the same from the files.
    again = RunManager(manager.runs_root).status(finished)
    assert (again.state, again.returncode, again.checkpoint_step) == ("finished", None, 20)
    assert [r.name for r in RunManager(manager.runs_root).list_runs()][:1] == [finished]


def test_stop_writes_a_checkpoint_and_resume_continues_from_it(manager, finished):
    name = "long"
    original = small_run(60, 10, 0)
    manager.start(name, original)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (info := manager.status(name)).checkpoint_step is None:  # the first checkpoint: training is underway
        assert info.state == "running" and time.monotonic() < deadline, info.log_tail
        time.sleep(0.2)

    # Found by pid from the record by a UI started afresh; in a session of its own, away from ours.
    assert RunManager(manager.runs_root).status(name).state == "running"
    assert os.getsid(info.pid) == info.pid != os.getsid(0)
    with pytest.raises(ProblemsError, match="running"):
        manager.start(name, original)

    began = time.monotonic()
    stopped = manager.stop(name, timeout=120)
    assert time.monotonic() - began < 60
    assert (stopped.state, stopped.returncode) == ("stopped", 0), stopped.log_tail
    step = int(re.search(r"preempted: checkpoint at step (\d+) written", stopped.log_tail).group(1))
    assert 10 <= step < 60 and stopped.checkpoint_step == step
    assert (stopped.run_dir / "checkpoints" / f"step={step:07d}.ckpt").is_file()
    assert stopped.exported is None  # a stopped run exports when it finishes
    assert RunManager(manager.runs_root).status(name).state == "stopped"

    manager.resume(name)
    assert json.loads((stopped.run_dir / RECORD).read_text())["overrides"] == [*original, "resume=true"]
    done = manager.wait(name, timeout=RUN_TIMEOUT_S)
    assert (done.state, done.checkpoint_step) == ("finished", 60), done.log_tail
    launch = (done.run_dir / PROCESS_LOG).read_text().rpartition(LAUNCH_HEADER)[2]
    assert f"resuming from {done.run_dir}/checkpoints/step={step:07d}.ckpt" in launch
    steps = [s for s, _ in manager.loss_curve(name)]  # both launches' event files, one curve
    assert steps == sorted(set(steps)) and steps[0] < step < steps[-1] == 60


def test_state_comes_from_the_files_when_the_pid_is_not_a_training(tmp_path):
    """A recorded pid now used by another process (here: pytest itself) is not the run."""
    manager = RunManager(tmp_path)
    for name, log in {
        "crashed": 'Traceback (most recent call last):\n  File "x", line 1\nRuntimeError: CUDA out of memory\n',
        "killed": "step:  30%|███       | 30/100 [00:10<00:20, 3.0it/s]",
    }.items():
        (tmp_path / name).mkdir()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "overrides": [], "started": time.time()}
        (tmp_path / name / RECORD).write_text(json.dumps(record))
        (tmp_path / name / PROCESS_LOG).write_text(f"{LAUNCH_HEADER}earlier\npreempted: checkpoint at step 5 "
                                                   f"written, stopping\n{LAUNCH_HEADER}now\n{log}")  # fmt: skip
    crashed, killed = manager.status("crashed"), manager.status("killed")
    assert (crashed.state, crashed.message) == ("failed", "RuntimeError: CUDA out of memory")
    assert (killed.state, killed.step) == ("unknown", 30)  # the earlier launch's stop is not this one's

    # Files being written right now: a metrics line or a CSV row without its end is left out.
    (tmp_path / "killed" / "samples").mkdir()
    (tmp_path / "killed" / "samples" / "metrics.jsonl").write_text('{"step": 10, "ssim": 0.5}\n{"step": 0, "ssim"')
    assert manager.metrics("killed") == [{"step": 10, "ssim": 0.5}]
    (tmp_path / "killed" / "logs" / "version_0").mkdir(parents=True)
    (tmp_path / "killed" / "logs" / "version_0" / "metrics.csv").write_text("epoch,step,train/loss\n0,2,1.5\n"
                                                                            "0,4,\n0,6,1.25\n0,8,1.")  # fmt: skip
    assert manager.loss_curve("killed") == [(2, 1.5), (6, 1.25)]


# ---- generation ------------------------------------------------------------------------------------------


def test_generator_gives_controlnet_generates_images(manager, finished, tmp_path):
    run_dir = manager.runs_root / finished
    picture = np.full((80, 96, 3), 30, np.uint8)  # not square, not the training size: crop and resize
    cv2.circle(picture, (50, 40), 22, (200, 40, 40), -1)
    cv2.rectangle(picture, (5, 5), (30, 70), (40, 200, 90), 3)
    cv2.rectangle(picture, (74, 30), (90, 70), (60, 60, 60), -1)  # faint: an edge at 40/120, not at 100/200
    Image.fromarray(picture).save(tmp_path / "picture.png")
    generator = Generator(device="cpu")
    result = generator.generate(str(run_dir), "red circle", image=picture, canny={"low_threshold": 40,
                                "high_threshold": 120}, negative_prompt="blurry", control_scale=0.8,
                                guidance_scale=5.0, steps=3, seed=11, num_images=2)  # fmt: skip

    common = [f"controlnet={run_dir}", "prompts=[red circle]", "negative_prompt=blurry", "control_scale=0.8",
              "guidance_scale=5.0", "num_inference_steps=3", "seed=11", "device=cpu"]  # fmt: skip
    images = f"images=[{tmp_path / 'picture.png'},{tmp_path / 'picture.png'}]"
    cfg = compose_config("generate", [*common, images, "hint=canny", "hint.low_threshold=40",
                                      "hint.high_threshold=120", f"out_dir={tmp_path / 'cli'}"])  # fmt: skip
    written = generate(cfg)
    assert len(result.images) == len(written) == 2
    for mine, path in zip(result.images, written):
        assert np.array_equal(mine, np.asarray(Image.open(path)))
    assert not np.array_equal(result.images[0], result.images[1])  # two draws, as the command makes them
    grid = np.asarray(Image.open(tmp_path / "cli" / "grid.png"))  # rows of hint | image
    assert result.hint.shape == (64, 64, 3) and np.array_equal(result.hint, grid[:64, :64])
    assert 0 < (result.hint > 0).mean() < 0.5  # edges, with the thresholds given (not the defaults)
    defaults = generator.generate(str(run_dir), "red circle", image=picture, steps=1)
    assert not np.array_equal(defaults.hint, result.hint)

    # A hint as given, through the exported directory: the same loaded models, the command's images.
    Image.fromarray(result.hint).save(tmp_path / "hint.png")
    loaded = generator.load(run_dir)
    from_hint = generator.generate(str(run_dir / "controlnet"), "", hint=result.hint, steps=3, seed=4)
    assert generator.load(run_dir / "controlnet") is loaded and len(generator._loaded) == 1
    hints = [f"controlnet={run_dir}", f"hints=[{tmp_path / 'hint.png'}]", "num_inference_steps=3", "seed=4"]
    cfg = compose_config("generate", [*hints, "device=cpu", f"out_dir={tmp_path / 'h'}"])
    assert np.array_equal(from_hint.images[0], np.asarray(Image.open(generate(cfg)[0])))
    assert np.array_equal(from_hint.hint, result.hint)

    weights = run_dir / "controlnet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # exported again: loaded again
    assert generator.load(run_dir) is not loaded and len(generator._loaded) == 1

    for bad, fields in (
        ({"hint": result.hint, "image": picture}, {"hint"}),
        ({}, {"hint"}),
        ({"image": picture, "canny": {"low_threshold": 200, "high_threshold": 100}}, {"high_threshold"}),
        ({"image": picture, "canny": {"low": 1}}, {"low"}),
        ({"hint": result.hint, "num_images": 0, "steps": 0}, {"num_images", "steps"}),
    ):
        with pytest.raises(ProblemsError) as refused:
            generator.generate(str(run_dir), "x", **bad)
        assert set(refused.value.problems) == fields
