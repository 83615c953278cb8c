"""scripts/gpu_check.sh, the GPU day's one command, on the CPU: the dry run goes through every check and
benchmark (CUDA-only checks reported as skipped, not passed) into one JSON file and one markdown table; a
check that sees a real difference, or hangs past its limit, makes the run exit non-zero."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from gpu_check import ITEMS  # noqa: E402

CUDA_ONLY = {name for name, _, _, cuda_only in ITEMS if cuda_only}


def gpu_check(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def items(out: Path) -> dict:
    return {i["name"]: i for i in json.loads((out / "gpu_check.json").read_text())["items"]}


def test_dry_run_reports_every_check_and_benchmark(tmp_path):
    done = gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [i["name"] for i in report["items"]] == [name for name, *_ in ITEMS]
    for item in report["items"]:
        expected = "skipped: no CUDA" if item["name"] in CUDA_ONLY else "pass"
        assert item["status"] == expected, (item["name"], item)
    machine = report["machine"]
    assert machine["git_commit"] and machine["date"] and machine["torch"] and machine["dry_run"] is True
    assert machine["packages"]["diffusers"]

    by = items(tmp_path)
    for name in ("activation_checkpointing", "channels_last", "regional_compile"):
        assert by[name]["details"]["loss_rel_err"] < 1e-3, name  # compared, not only run
    assert by["activation_checkpointing"]["details"]["applied"]["checkpointed_unet_decoder_blocks"] > 0
    rows = by["bench_train_sd15_512"]["rows"]
    assert [(r["config"], r["batch_size"]) for r in rows if r["config"] == "baseline"] == [
        ("baseline", 1), ("baseline", 2), ("baseline", 4)
    ]  # fmt: skip
    assert {r["config"] for r in rows} == {"baseline", "ours online", "ours cached"}
    assert all(v is not False for v in rows[0]["faithful"].values())  # the faithful baseline by default
    assert by["bench_train_sdxl_1024_b4"]["rows"][0]["observed"]["vae_dtype"] == "float32"  # SDXL's path
    assert [r["offload"] for r in by["bench_offload_sd15_512"]["rows"]][:3] == ["none", "accelerate", "manual_swap"]
    assert by["bench_data"]["rows"] and not list((tmp_path / "scratch" / "bench_data").glob("*.tar"))

    table = (tmp_path / "gpu_check.md").read_text()
    for name, kind, *_ in ITEMS:
        assert f"| {name} | {kind} | " in table
    assert "## bench_train_sd15_512" in table and "| ours cached | 4 |" in table
    assert (tmp_path / "logs" / "regional_compile.log").exists()


def test_a_failing_or_hanging_check_fails_the_run(tmp_path):
    """A perturbed weight in the checkpointed model (a real difference, found by the real comparison)
    and a check that hangs (killed at its limit): exit 1, each named, the healthy check still passing."""
    done = gpu_check(tmp_path, "--only", "environment", "activation_checkpointing", "channels_last",
                     "--inject-fault", "activation_checkpointing", "environment:hang",
                     "--limit", "environment=4")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    by = items(tmp_path)
    assert by["environment"]["status"] == "timeout" and by["environment"]["seconds"] < 30
    failed = by["activation_checkpointing"]
    assert failed["status"] == "fail" and failed["details"]["loss_rel_err"] > failed["details"]["tolerance"]
    assert by["channels_last"]["status"] == "pass"
    assert by["bench_data"]["status"] == "skipped: not selected"
    assert "FAILED: environment, activation_checkpointing" in done.stdout
    assert "| activation_checkpointing | check | fail |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_wheels_are_the_installed_versions(tmp_path):
    from importlib.metadata import version

    done = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--dry-run", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    command = done.stdout.split()
    assert command[1:5] == ["-m", "pip", "wheel", "--no-deps"]
    for package in ("diffusers", "hydra-core", "omegaconf", "antlr4-python3-runtime", "webdataset", "braceexpand"):
        assert f"{package}=={version(package)}" in command
