"""The benchmark scripts still run (tiny sizes): their numbers are recorded in docs/performance.md."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_data_reports_every_configuration(tmp_path):
    rows = _load("bench_data").main(
        ["--resolution", "64", "--source-size", "96", "72", "--samples", "48", "--per-shard", "12",
         "--batch-size", "4", "--workers", "0", "--dir", str(tmp_path)]
    )  # fmt: skip
    assert [(r["hints"], r["workers"]) for r in rows] == [("precomputed", 0), ("on-the-fly canny", 0)]
    assert all(r["samples_per_s"] > 0 and r["workers_for_target"] >= 1 for r in rows)


def test_bench_train_compares_baseline_and_ours():
    rows = _load("bench_train").main(
        ["--model", "tiny", "--resolution", "64", "--batch-size", "2", "--steps", "2", "--warmup", "1"]
    )
    assert [r["config"] for r in rows] == ["baseline", "ours online", "ours cached"]
    assert all(r["samples_per_s"] > 0 and r["tflops"] > 0 for r in rows)


def test_scaling_counts_the_real_controlnet_and_uses_measured_step_times():
    rows = _load("scaling").main(["--models", "sd15", "--step-ms", "sd15=200"])
    assert [r["gpus"] for r in rows] == [8, 64, 512]
    assert rows[0]["params"] == 361_279_120 and rows[0]["step_s"] == 0.2 and rows[0]["source"] == "measured"
    # 2 bytes per gradient, ring all-reduce over 450 GB/s NVLink, then 40 GB/s InfiniBand
    assert abs(rows[0]["allreduce_s"] - 2 * 7 / 8 * 361_279_120 * 2 / 450e9) < 1e-9
    assert rows[1]["allreduce_s"] > 10 * rows[0]["allreduce_s"]
    assert all(r["no_overlap"] <= r["overlapped"] <= 1 for r in rows) and rows[1]["no_overlap"] < rows[0]["no_overlap"]
    assert 0 < rows[0]["controlnet_forward"] < rows[0]["forward"] < rows[0]["backward"] + rows[0]["forward"]


def test_bench_offload_runs_every_strategy():
    rows = _load("bench_offload").main(["--model", "tiny", "--resolution", "64", "--batch-size", "2", "--steps", "1",
                                        "--warmup", "0"])  # fmt: skip
    assert [(r["offload"], r["storage"]) for r in rows] == [
        ("none", "gpu"), ("accelerate", "gpu"), ("manual_swap", "gpu"), ("manual_swap", "cpu_pinned")
    ]  # fmt: skip
    assert all(r["samples_per_s"] > 0 for r in rows)


def test_bench_threads_times_each_thread_count_idle_and_busy():
    rows = _load("bench_threads").main(["--threads", "1", "2", "--busy", "0", "1", "--steps", "2"])
    assert [(r["busy"], r["threads"]) for r in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(r["s_per_step"] > 0 for r in rows)


def test_bench_resume_seeks_to_the_same_batch_as_an_uninterrupted_run(tmp_path):
    result = _load("bench_resume").main(["--samples", "600", "--per-shard", "50", "--position", "240",
                                         "--stream-position", "80", "--workers", "0", "--dir", str(tmp_path)])  # fmt: skip
    assert result["shards"] == 12 and result["same_batch"] is True
    assert result["indexed_resume_s"] > 0 and result["stream_resume_s"] > 0
    assert len(list(tmp_path.glob("*.tar.idx.npz"))) == 12  # indexed once, beside the shards
