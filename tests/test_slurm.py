"""The shipped SLURM scripts on a real cluster (tests/slurm_cluster.py): the prep array and its merge,
DDP training on one node and on two, preemption by signal with requeue, and the submitit launcher.
The scripts run as users run them: from the repository's scripts/slurm/, the environment's
console scripts on PATH, site values given as sbatch options."""

import ast
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from nemo_controlnet.prep.shards import shard_name
from nemo_controlnet.training.checkpoint import list_checkpoints
from nemo_controlnet.training.run import train

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"
# What a user's shell has when they submit: the environment's console scripts on PATH.
JOB_ENV = {
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    "PYTHONPATH": str(REPO),  # the tests' own hint detector (tests/slurm_jobs.py)
    "HF_HUB_OFFLINE": "1",
}
CPU_TRAINING = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", "--time=20"]  # a CPU cluster's sbatch options
STEPS = 10


def _wait_for(what: str, condition, timeout: float = 240, poll: float = 0.2):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return value


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


# -- prep: the array, the merge, a cancelled task ------------------------------------------------


def test_prep_array_and_merge_cover_every_input_once_and_a_cancelled_task_is_redone_alone(slurm_cluster, tmp_path):
    root, out = tmp_path / "photos", tmp_path / "shards"
    rng = np.random.default_rng(0)
    for i in range(200):
        (root / f"{i // 50}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), np.uint8)).save(root / f"{i // 50}" / f"img{i:03d}.png")
        (root / f"{i // 50}" / f"img{i:03d}.txt").write_text(f"picture {i}")
    command = ["bash", str(SCRIPTS / "submit_prep.sh"), "--array=0-3", "--cpus-per-task=1", "--mem=0", "--",
               f"source.root={root}", f"out_dir={out}", "shard_size=10", "hint._target_=tests.slurm_jobs.SlowCanny"]
    env = {**JOB_ENV, "SLOW_CANNY_SECONDS": "0.25"}  # 2.5 s a shard: task 2 is cancelled mid-run

    first = slurm_cluster.run(*command, env=env, cwd=tmp_path).stdout
    array, merge = re.search(r"prep array (\d+), merge (\d+)", first).groups()
    units = {task: [shard_name("data", i) for i in range(task, 20, 4)] for task in range(4)}  # round-robin
    stats = out / ".prep"
    _wait_for("task 2's first shard", lambda: (stats / f"{units[2][0]}.json").is_file())
    slurm_cluster.run("scancel", f"{array}_2")
    tasks = slurm_cluster.wait(array)
    assert sorted(t["JobState"] for t in tasks) == ["CANCELLED", "COMPLETED", "COMPLETED", "COMPLETED"], tasks
    assert slurm_cluster.wait(merge)[0]["JobState"] == "CANCELLED"  # its dependency can no longer be met
    done = {p.name: p.stat().st_mtime_ns for p in stats.glob("data-*.json")}  # one per complete shard
    missing = [u for u in units[2] if f"{u}.json" not in done]
    assert 0 < len(missing) < 5 and not (out / "manifest.json").exists()

    second = slurm_cluster.run(*command, env=env, cwd=tmp_path).stdout  # the same command again
    array, merge = re.search(r"prep array (\d+), merge (\d+)", second).groups()
    assert slurm_cluster.wait(merge)[0]["JobState"] == "COMPLETED", slurm_cluster.job(array)
    after = {p.name: p.stat().st_mtime_ns for p in stats.glob("data-*.json")}
    assert {k: after[k] for k in done} == done, "complete shards were rewritten"
    assert sorted(set(after) - set(done)) == sorted(f"{u}.json" for u in missing)  # only the missing part
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 20
    sources = []
    for shard in manifest["shards"]:
        for sample in wds.WebDataset(str(out / shard["name"]), shardshuffle=False):
            sources.append(json.loads(sample["json"])["relpath"])
    assert len(sources) == 200 and len(set(sources)) == 200  # every input exactly once


# -- training: one node x 2 tasks, two nodes x 1 task ---------------------------------------------


def _submit_training(cluster, tmp_path: Path, run: Path, shapes: Path, sbatch: list[str], *overrides: str) -> str:
    out = cluster.run("sbatch", "--parsable", *sbatch, *CPU_TRAINING, f"--output={tmp_path}/train-%j.log",
                      str(SCRIPTS / "train.sbatch"), *_training_overrides(run, shapes), *overrides,
                      env=JOB_ENV, cwd=tmp_path).stdout  # fmt: skip
    return out.strip().split(";")[0]


def _training_overrides(run: Path, shapes: Path) -> list[str]:
    return [f"run_dir={run}", f"data.shards={shapes / 'train'}", f"data.validation_shards={shapes / 'val'}",
            "data.synthetic=null", "data.num_workers=1", "data.batch_size=2", "data.shuffle_buffer=16",
            "trainer.accelerator=cpu", "trainer.precision=32", f"trainer.max_steps={STEPS}",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=5",
            "validation.num_samples=0", "logger=csv", "model.proportion_empty_prompts=0.0"]  # fmt: skip


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = []
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        rows += [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(open(path)) if r.get("train/loss")]
    return rows


def _first_keys(log: str, rank: int) -> set[str]:
    """The samples of a rank's first batch in epoch 0 (its slice of global batch 0, as the loader logs it)."""
    line = re.search(rf"rank {rank}/2 worker 0/1, epoch 0: batch 0 of \d+, keys (\[.*?\])", log)
    assert line, f"no first batch logged for rank {rank}"
    return set(ast.literal_eval(line.group(1)))  # the keys, as the loader logged them


@pytest.fixture(scope="module")
def one_node_run(slurm_cluster, shapes_dir, tmp_path_factory) -> Path:
    """train.sbatch on 1 node x 2 tasks (CPU, gloo): Lightning takes ranks and addresses from SLURM."""
    tmp = tmp_path_factory.mktemp("slurm-train")
    run = tmp / "run"
    job = _submit_training(slurm_cluster, tmp, run, shapes_dir, ["--nodes=1", "--ntasks-per-node=2"])
    state = slurm_cluster.wait(job)[0]["JobState"]
    assert state == "COMPLETED", f"{state}: {_read(tmp / f'train-{job}.log')[-3000:]}"
    return run


def test_two_tasks_on_one_node_share_the_data_write_once_and_train_like_one_process(one_node_run, train_cfg,
                                                                                     tmp_path):
    run = one_node_run
    rank0, rank1 = _read(run / "train.log"), _read(run / "train_rank1.log")
    assert "task 0 of 2" in rank0 and "task 1 of 2" in rank1  # each rank logs to its own file
    mine, theirs = _first_keys(rank0, 0), _first_keys(rank1, 1)
    assert len(mine) == len(theirs) == 2 and not mine & theirs  # two halves of one global batch of 2 x 2
    assert rank0.count("checkpoint written") == 2 and "checkpoint written" not in rank1  # one writer
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [5, 10]
    # The same global batch (2 ranks x 2) in one process. Each step sees other samples and noise, so
    # the trajectories agree in distribution (as tests/test_ddp.py states for Lightning's launcher).
    single = tmp_path / "single"
    train(train_cfg(f"run_dir={single}", "data.batch_size=4", f"trainer.max_steps={STEPS}", "validation.num_samples=0",
                    "model.proportion_empty_prompts=0.0"))  # fmt: skip
    ddp, one = [v for _, v in _losses(run)], [v for _, v in _losses(single)]
    assert len(ddp) == len(one) == STEPS
    assert abs(sum(ddp) / STEPS - sum(one) / STEPS) < 0.1 and all(0.5 < x < 2.0 for x in ddp)


def test_two_nodes_rendezvous_across_nodes_and_train_exactly_as_one_node_with_two_tasks(slurm_cluster, one_node_run,
                                                                                      shapes_dir, tmp_path):
    run = tmp_path / "run"
    job = _submit_training(slurm_cluster, tmp_path, run, shapes_dir, ["--nodes=2", "--ntasks-per-node=1"])
    state = slurm_cluster.wait(job)[0]["JobState"]
    assert state == "COMPLETED", f"{state}: {_read(tmp_path / f'train-{job}.log')[-3000:]}"
    assert "on node n1" in _read(run / "train.log") and "on node n2" in _read(run / "train_rank1.log")
    assert "2 node(s) x 1 task(s), rendezvous at 127.0.0.1" in _read(tmp_path / f"train-{job}.log")
    # Same ranks, seeds, shards and data order: the same run as 1 node x 2 tasks, step for step, up to
    # float rounding in gloo's cross-node all-reduce (seen: losses equal to 1e-7, weights to 1.5e-8).
    ours, theirs = _losses(run), _losses(one_node_run)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, STEPS + 1))
    assert ours[0] == theirs[0]  # before any all-reduce: bit for bit
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs, strict=True)) < 1e-5
    mine = torch.load(run / "checkpoints" / "step=0000010.ckpt", weights_only=True)["state_dict"]
    other = torch.load(one_node_run / "checkpoints" / "step=0000010.ckpt", weights_only=True)["state_dict"]
    for name, value in mine.items():
        torch.testing.assert_close(value, other[name], rtol=0, atol=1e-6, msg=name)


# -- preemption: signal, checkpoint, requeue, resume ----------------------------------------------


def test_signals_at_the_time_limit_checkpoint_requeue_and_resume_without_a_gap(slurm_cluster, shapes_dir, tmp_path):
    """scancel --signal does what SLURM does at --signal=USR1@120 (every process of the step gets it,
    the loader workers included), then a SIGTERM the same way on the requeued start."""
    run, steps = tmp_path / "run", 150
    job = _submit_training(slurm_cluster, tmp_path, run, shapes_dir, ["--nodes=1", "--ntasks-per-node=2"],
                           f"trainer.max_steps={steps}", "checkpoint.every_n_steps=0")  # fmt: skip
    log, log1 = run / "train.log", run / "train_rank1.log"
    for restart, signal_name in enumerate(("USR1", "TERM")):
        # Both ranks training (their handlers in place), then the signal to every process of the step.
        _wait_for(f"start {restart} to train",
                  lambda r=restart: _read(log).count("first batch") > r and _read(log1).count("first batch") > r)
        slurm_cluster.run("scancel", f"--signal={signal_name}", job)
        _wait_for(f"the requeued start {restart + 1}", lambda r=restart: f"restart {r + 1}, task 0" in _read(log))
    records = slurm_cluster.wait(job)
    output = _read(tmp_path / f"train-{job}.log")
    assert records[0]["JobState"] == "COMPLETED" and records[0]["Restarts"] == "2", output[-3000:]
    assert "killed by signal" not in output and "Traceback" not in output, output[-3000:]
    text = _read(log)
    assert text.count("preempted: checkpoint at step") == 2 and text.count("requeued SLURM job") == 2
    preempted = [int(s) for s in re.findall(r"preempted: checkpoint at step (\d+) written", text)]
    resumed = re.findall(r"resuming from .*step=(\d+)\.ckpt", text)
    assert [int(s) for s in resumed] == preempted and 0 < preempted[0] < preempted[1] < steps
    assert [s for s, _ in list_checkpoints(run / "checkpoints")][-1] == steps
    logged = [s for s, _ in _losses(run)]
    assert sorted(logged) == list(range(1, steps + 1)), "a loss row missing or repeated across the restarts"


# -- the submitit launcher ------------------------------------------------------------------------


def test_the_submitit_launcher_runs_a_training_on_the_cluster(slurm_cluster, shapes_dir, tmp_path):
    run = tmp_path / "run"
    overrides = [o for o in _training_overrides(run, shapes_dir)
                 if not o.startswith(("trainer.max_steps", "data.num_workers", "checkpoint.every_n_steps"))]
    command = [str(Path(sys.executable).parent / "controlnet-train"), "-m", "hydra/launcher=slurm",
               "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=1",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
               *overrides, "data.num_workers=0", "trainer.max_steps=3", "checkpoint.every_n_steps=0"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env={**slurm_cluster.env, **JOB_ENV}, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [3]
    assert (run / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "SLURM job" in _read(run / "train.log")  # it ran as a SLURM job, not locally
