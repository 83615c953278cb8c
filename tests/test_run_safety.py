"""What a long run must survive: altered and rotten checkpoints, killed writers, a second run on the
same directory, a full disk, signals to the whole process group; and what it must leave right:
file modes under the umask, log rows up to every checkpoint, a progress bar in steps, threads."""

import csv
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from omegaconf import OmegaConf

from nemo_controlnet.data.datamodule import worker_init
from nemo_controlnet.inference.generate import load_sampler
from nemo_controlnet.io import ChecksumMismatch, DirectoryBusy, NoSpaceError, atomic_path, current_umask
from nemo_controlnet.models.formats import export_controlnet, export_original_controlnet, load_original_controlnet
from nemo_controlnet.prep.job import run_prep
from nemo_controlnet.models.stack import build_stack
from nemo_controlnet.training.checkpoint import UnsafeCheckpoint, latest_checkpoint, list_checkpoints
from nemo_controlnet.training.perf import configure_threads
from nemo_controlnet.training.run import train
from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _command(cfg, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "nemo_controlnet.cli.train", f"run_dir={cfg.run_dir}",
            f"data.shards={cfg.data.shards}", f"data.validation_shards={cfg.data.validation_shards}",
            "data.synthetic=null", "data.batch_size=2",
            "trainer.max_steps=100000", "validation.num_samples=0", "trainer.enable_progress_bar=false",
            *overrides]  # fmt: skip


def _wait_for(proc, condition, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early: {proc.stderr.read().decode()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _log(run: Path) -> str:
    return (run / "train.log").read_text() if (run / "train.log").exists() else ""


def _loss_rows(run: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every logged row, over every segment (a resumed run logs a new version)."""
    rows = []
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        rows += [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(open(path)) if r.get("train/loss")]
    return rows


def _two_checkpoints(train_cfg) -> tuple[Path, Path]:
    cfg = train_cfg("validation.num_samples=0", "export.enabled=false")
    train(cfg)
    (_, older), (_, newest) = list_checkpoints(Path(cfg.run_dir) / "checkpoints")
    return older, newest


def test_an_altered_checkpoint_stops_the_run_naming_it_unless_told_to_skip(train_cfg, tmp_path, caplog):
    older, newest = _two_checkpoints(train_cfg)

    class Planted:  # what a tampered file holds: an object whose unpickling would run a command
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    state = torch.load(newest, weights_only=True)
    state["planted"] = Planted()
    torch.save(state, newest)
    with pytest.raises(UnsafeCheckpoint, match=r"step=0000004\.ckpt: refused by safe loading \(.*GLOBAL posix.system"):
        latest_checkpoint(newest.parent)
    with pytest.raises(UnsafeCheckpoint, match="checkpoint.skip_unsafe=true"):  # the run refuses to start
        train(train_cfg("validation.num_samples=0", "trainer.max_steps=6"))
    with caplog.at_level("ERROR"):
        assert latest_checkpoint(newest.parent, skip_unsafe=True) == older
    assert "skipped (checkpoint.skip_unsafe=true)" in caplog.text
    # A torn file is not tampering: it is skipped for the previous one, as before.
    newest.write_bytes(b"")
    assert latest_checkpoint(newest.parent) == older


def _flip_a_tensor_byte(path: Path) -> None:
    """Change one byte inside a tensor's data, keeping the zip index intact (torch does not check
    the members' CRCs, so the file still loads)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    local_extra = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + len(info.filename.encode()) + local_extra  # the local header's size
    raw[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_rotten_checkpoint_is_detected_by_its_checksum_and_resume_falls_back(train_cfg, caplog):
    older, newest = _two_checkpoints(train_cfg)
    assert Path(f"{newest}.sha256").read_text().split()[1] == newest.name  # sha256sum -c format
    _flip_a_tensor_byte(newest)
    torch.load(newest, weights_only=True)  # still loads: nothing but the checksum can tell
    with caplog.at_level("ERROR"):
        assert latest_checkpoint(newest.parent) == older
    assert f"{newest}: checksum mismatch" in caplog.text and "resuming from an older checkpoint" in caplog.text
    trainer, _ = train(train_cfg("validation.num_samples=0", "trainer.max_steps=5", "export.enabled=false"))
    assert trainer.global_step == 5  # resumed from step 2, not from the rotten step 4


def test_exports_carry_checksums_that_loading_checks(train_cfg, tmp_path):
    cfg = train_cfg("validation.num_samples=0", "trainer.max_steps=2")
    train(cfg)
    run = Path(cfg.run_dir)
    sums = (run / "controlnet" / "SHA256SUMS").read_text()
    assert "diffusion_pytorch_model.safetensors" in sums and "README.md" not in sums  # weights, not the card
    original = run / f"control_{run.name}.safetensors"
    assert Path(f"{original}.sha256").is_file()
    gen = OmegaConf.create({"controlnet": str(run), "model": None, "device": "cpu", "sampler": "unipc"})
    load_sampler(gen)  # verified and loaded
    config = dict(ControlNetModel.load_config(run / "controlnet"))
    load_original_controlnet(original, config)
    for path in (run / "controlnet" / "diffusion_pytorch_model.safetensors", original):
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 0x01  # a flipped bit in the last tensor's data
        path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatch, match="diffusion_pytorch_model.safetensors: checksum mismatch"):
        load_sampler(gen)
    with pytest.raises(ChecksumMismatch, match=f"{original.name}: checksum mismatch"):
        load_original_controlnet(original, config)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_get_the_mode_the_umask_gives(mask, tmp_path):
    stack = build_stack(compose_train().model)
    controlnet = ControlNetModel.from_unet(stack.unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    previous = os.umask(mask)
    try:
        assert current_umask() == mask
        out = export_controlnet(controlnet, tmp_path / "controlnet", {"x": 1})
        single = export_original_controlnet(
            ControlNetModel.from_unet(stack.unet), tmp_path / "control_run.safetensors", "fp16"
        )
        with atomic_path(tmp_path / "plain.bin") as tmp:
            tmp.write_bytes(b"1")
    finally:
        os.umask(previous)
    files = [*out.iterdir(), single, Path(f"{single}.sha256"), tmp_path / "plain.bin"]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, (path, oct(path.stat().st_mode))
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_second_run_on_the_same_directory_is_refused_and_a_killed_run_loses_nothing(train_cfg, tmp_path):
    """One run holds run_dir; a kill -9 frees it; what the killed writer left is swept; every loss
    row up to the newest checkpoint survives, and the resumed run's loss curve is the uninterrupted
    run's, row for row."""
    same = ("data.num_workers=0", "data.batch_size=2", "data.shuffle_buffer=16", "checkpoint.every_n_steps=3",
            "checkpoint.keep_last=0", "trainer.log_every_n_steps=1", "logger=csv", "validation.num_samples=0")
    cfg = train_cfg(*same)
    run = Path(cfg.run_dir)
    proc = subprocess.Popen(_command(cfg, *same), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for(proc, lambda: len(list_checkpoints(run / "checkpoints")) >= 2, "two checkpoints")
        with pytest.raises(DirectoryBusy, match=rf"in use by another training \(pid {proc.pid} on host "):
            train(train_cfg(*same))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpts = run / "checkpoints"
    newest_step, newest = list_checkpoints(ckpts)[-1]
    killed = _loss_rows(run)
    assert set(range(1, newest_step + 1)) <= {step for step, _ in killed}, (newest_step, killed)
    stale = ckpts / f".{newest.name}.tmp-{proc.pid}"  # what a kill during torch.save leaves
    stale.write_bytes(newest.read_bytes()[:1000])
    final = newest_step + 4
    trainer, _ = train(train_cfg(*same, f"trainer.max_steps={final}"))
    assert trainer.global_step == final
    assert not stale.exists(), "the dead writer's temp file is swept at start"
    assert not (run / ".lock").read_text(), "the lock is released (and its holder cleared) at the end"
    train(train_cfg(*same, f"trainer.max_steps={final}", f"run_dir={tmp_path / 'straight'}"))
    straight = dict(_loss_rows(tmp_path / "straight"))
    rows = _loss_rows(run)  # the killed segment's (some re-logged after the resume) and the resumed ones
    assert {step for step, _ in rows} == set(range(1, final + 1))
    assert all(loss == straight[step] for step, loss in rows), [(s, v, straight[s]) for s, v in rows]


def test_signals_to_the_whole_process_group_checkpoint_and_exit_cleanly(train_cfg):
    """Ctrl-C, scancel and SLURM's time limit signal every process of the job, the loader's workers
    included: they must leave it to the main process, which checkpoints and exits 0."""
    cfg = train_cfg()
    run = Path(cfg.run_dir)
    steps = []
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        proc = subprocess.Popen(_command(cfg, "data.num_workers=2", "checkpoint.every_n_steps=0", "logger=none",
                                         "validation.every_n_steps=2", "validation.num_samples=2",
                                         "validation.num_inference_steps=4"),
                                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)  # fmt: skip
        try:
            started = _log(run).count("first batch")
            _wait_for(proc, lambda n=started: _log(run).count("first batch") > n, "training to start")
            # Once validation grids are being drawn: the signal lands in a step or during validation.
            grids = 2 + 2 * len(steps)
            _wait_for(proc, lambda n=grids: len(list((run / "samples").glob("step_*.png"))) >= n, "grids")
            os.killpg(proc.pid, signum)
            assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        stderr = proc.stderr.read().decode()
        assert "killed by signal" not in stderr and "Traceback" not in stderr, stderr[-3000:]
        assert "preempted: checkpoint at step" in _log(run)
        # fit returned normally (no SIGTERMException from Lightning's own handler): the requeue and
        # the rest of the run's end happen for SIGTERM too.
        assert _log(run).count("export skipped (the requeued run exports at the end)") == len(steps) + 1
        steps.append(list_checkpoints(run / "checkpoints")[-1][0])
    assert 0 < steps[0] < steps[1] < steps[2], steps  # each run resumed from the one before


def test_workers_leave_signals_to_the_main_process_and_run_one_thread():
    code = (
        "import os, signal, cv2, torch\n"
        "from nemo_controlnet.data.datamodule import sequential_opencv, worker_init\n"
        "cv2.Canny(__import__('numpy').zeros((512, 512), 'uint8'), 1, 2)\n"  # the parent's pool has run
        "sequential_opencv()\n"
        "if os.fork() == 0:\n"
        "    torch.set_num_threads(1)\n"  # what torch's worker loop does first
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT})\n"
        "    worker_init(0)\n"
        "    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT): os.kill(os.getpid(), s)\n"
        "    cv2.Canny(__import__('numpy').zeros((512, 512), 'uint8'), 1, 2)\n"
        "    print(torch.get_num_threads(), cv2.getNumThreads(), signal.pthread_sigmask(signal.SIG_BLOCK, set()))\n"
        "    os._exit(0)\n"
        "os.wait()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    torch_threads, cv2_threads, blocked = out.stdout.split(" ", 2)
    assert torch_threads == "1" and cv2_threads in ("0", "1"), out.stdout
    assert "SIGTERM" not in blocked and "SIGINT" not in blocked  # survived all three, then unblocked
    assert worker_init  # imported here too: the function the DataLoader runs


def test_torch_threads_follow_the_cpus_this_process_may_use(monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0))
    try:
        with caplog.at_level("INFO"):
            assert configure_threads("auto", 1) == max(1, cpus - 1)
        assert torch.get_num_threads() == max(1, cpus - 1)
        assert f"{cpus} available CPU(s) - 1 loader worker(s)" in caplog.text
        assert configure_threads(3, 0) == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert configure_threads("auto", 0) == 2  # the user's choice wins
    finally:
        torch.set_num_threads(before)
    # Affinity, not the machine's count: a process pinned to one CPU gets one thread.
    code = ("import os; os.sched_setaffinity(0, {0}); from nemo_controlnet.training.perf import configure_threads; "
            "print(configure_threads('auto', 0))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.stdout.strip() == "1", out.stderr


def test_the_progress_bar_counts_steps(train_cfg, capfd):
    train(train_cfg("trainer.enable_progress_bar=true", "validation.num_samples=0", "export.enabled=false"))
    captured = capfd.readouterr()
    bar = captured.out + captured.err
    assert "step: 100%" in bar and "4/4" in bar, bar[-2000:]
    assert "Epoch" not in bar
    # Resumed at step 4 of 6: the bar starts at 4 and counts to 6, in steps too.
    train(train_cfg("trainer.enable_progress_bar=true", "validation.num_samples=0", "export.enabled=false",
                    "trainer.max_steps=6"))  # fmt: skip
    captured = capfd.readouterr()
    bar = captured.out + captured.err
    assert "Training" not in bar and "step:  67%" in bar and "4/6" in bar, bar[-2000:]  # from where it resumed
    assert bar.rstrip().rsplit("\r", 1)[-1].startswith("step: 100%") and "6/6" in bar, bar[-2000:]


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 3 MB (tmpfs; needs root, as CI and this machine have)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=False)  # lazy: a handle still open must not keep it


def test_a_full_disk_is_named_with_the_space_and_nothing_half_written_stays(small_disk):
    big = {"w": torch.zeros(1_000_000)}  # 4 MB on a 3 MB disk
    with pytest.raises(NoSpaceError) as raised:
        with atomic_path(small_disk / "step=1.ckpt", expected_bytes=4_000_000) as tmp:
            torch.save(big, tmp)  # torch reports it as "unexpected pos" / iostream errors
    message = str(raised.value)
    assert f"no space left on device writing {small_disk / 'step=1.ckpt'}" in message
    assert "free in" in message and "it needs about 4.0 MB" in message
    assert list(small_disk.iterdir()) == []  # the temp file is gone: the space is back


def test_a_run_warns_before_a_checkpoint_will_not_fit_fails_clearly_and_resumes_with_room(train_cfg, small_disk,
                                                                                         tmp_path, caplog):
    overrides = ("validation.num_samples=0", "export.enabled=false", "checkpoint.every_n_steps=1")
    train(train_cfg(*overrides, f"run_dir={tmp_path / 'sizing'}", "trainer.max_steps=1"))
    size = list_checkpoints(tmp_path / "sizing" / "checkpoints")[-1][1].stat().st_size
    # Room for one checkpoint, not for the next beside it (old ones are removed after a write).
    subprocess.run(["mount", "-o", f"remount,size={int(size * 1.5)}", str(small_disk)], check=True)
    cfg = train_cfg(*overrides, "trainer.max_steps=3", "checkpoint.keep_last=1")
    ckpts = Path(cfg.run_dir) / "checkpoints"
    ckpts.parent.mkdir(parents=True)
    ckpts.symlink_to(small_disk, target_is_directory=True)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with caplog.at_level("WARNING"), pytest.raises(NoSpaceError) as raised:
        train(cfg)
    # A run that failed puts the process's signal handlers back too (else SIGTERM is swallowed later).
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert "the next checkpoint (about" in caplog.text and "will not fit" in caplog.text  # warned at step 1
    message = str(raised.value)
    assert f"writing {ckpts / 'step=0000002.ckpt'}" in message and "it needs about" in message, message
    assert sorted(p.name for p in small_disk.iterdir()) == ["step=0000001.ckpt", "step=0000001.ckpt.sha256"]
    subprocess.run(["mount", "-o", f"remount,size={int(size * 3)}", str(small_disk)], check=True)
    trainer, _ = train(cfg)  # space freed: resumes from step 1
    assert trainer.global_step == 3
    assert [s for s, _ in list_checkpoints(small_disk)] == [3]


def test_prep_checks_the_space_for_the_next_shard_before_writing_it(small_disk, tmp_path):
    from tests.test_prep import prep_cfg, save

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(6):  # noise: incompressible, so every shard is about the same size
        save(root / f"img{i}.png", rng.integers(0, 256, (192, 192, 3), np.uint8)).with_suffix(".txt").write_text("x")
    run_prep(prep_cfg(f"source.root={root}", f"out_dir={tmp_path / 'sizing'}", "shard_size=2", "workers=0"))
    size = max(p.stat().st_size for p in (tmp_path / "sizing").glob("*.tar"))
    # Room for the first shard and its bookkeeping, not for the second beside it.
    subprocess.run(["mount", "-o", f"remount,size={int(size * 1.6)}", str(small_disk)], check=True)
    out = small_disk / "shards"
    with pytest.raises(NoSpaceError) as raised:
        run_prep(prep_cfg(f"source.root={root}", f"out_dir={out}", "shard_size=2", "workers=0"))
    message = str(raised.value)
    assert "no space left on device writing" in message and str(out) in message and "it needs about" in message
    assert not [p for p in out.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]  # no half shard left
