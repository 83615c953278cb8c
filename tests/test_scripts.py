"""The benchmark scripts still run (tiny sizes): their numbers are recorded in docs/performance.md."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_data_reports_every_configuration(tmp_path, capsys):
    import numpy as np
    import torch

    photos = tmp_path / "photos"
    photos.mkdir()
    bench = _load("bench_data")
    for i in range(2):
        bench.photo_like(np.random.default_rng(i), 80, 60).save(photos / f"{i}.png")
    rows = bench.main(
        ["--resolution", "64", "--source-size", "96", "72", "--samples", "48", "--per-shard", "12",
         "--batch-size", "4", "--workers", "0", "1", "--pin-memory", "--split-samples", "12",
         "--decoder-sizes", "200x150", "--interp-check", str(photos), "--dir", str(tmp_path)]
    )  # fmt: skip
    assert [(r["hints"], r["workers"]) for r in rows] == [
        (hints, workers) for hints in ("precomputed", "on-the-fly canny") for workers in (0, 0, 1, 1)
    ]
    assert all(r["samples_per_s"] > 0 and r["workers_for_target"] >= 1 and r["main_cpu_ms"] > 0 for r in rows)
    assert all(r["worker_cpu_ms"] > 0 for r in rows if r["workers"])
    # pin_memory: on where torch has an accelerator, else said to be ignored
    assert all(r["pin_memory"] == torch.cuda.is_available() for r in rows[1::2])
    # the time split, measured on the real code path: Canny only when on the fly
    precomputed, on_the_fly = rows[0]["split_ms"], rows[-1]["split_ms"]
    assert precomputed["hint"] == 0 < on_the_fly["hint"] and precomputed["samples"] == 12
    assert all(split[k] > 0 for split in (precomputed, on_the_fly) for k in ("read", "decode", "augment", "collate"))
    out = capsys.readouterr().out
    # 200x150 for a 64 px target: the reduced DCT scale (1/2) is timed with the full decodes
    for decoder in ("PIL draft (1/2)", "simplejpeg 1/2 (the loader)", "cv2.imdecode REDUCED_2", "PyTurboJPEG"):
        assert decoder in out
    assert "scale 0.67: bilinear" in out and "(2 photos)" in out


def test_bench_train_compares_baseline_and_ours():
    """The baseline is diffusers' train_controlnet(_sdxl).py step at its defaults, and each point's flag
    brings back the old behaviour; what the step did is observed (hooks), not taken from the flags."""
    bench = _load("bench_train")
    tiny = ["--resolution", "64", "--steps", "1", "--warmup", "0", "--precision", "bf16"]
    rows = bench.main(["--model", "tiny", "--batch-size", "1", "2", *tiny])
    assert [(r["config"], r["batch_size"]) for r in rows] == [
        ("baseline", 1), ("baseline", 2), ("ours online", 1), ("ours cached", 1), ("ours online", 2),
        ("ours cached", 2),
    ]  # fmt: skip
    assert all(r["samples_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    assert rows[0]["faithful"] == {"a": True, "b": True, "c": None, "d": True, "e": True, "f": True, "g": True,
                                   "h": True}  # fmt: skip
    seen = rows[1]["observed"]
    # (a) autocast around the ControlNet only, (h) its outputs back in fp32, (b) token ids from the
    # dataset, (d) the batch decoded in the step, (f) gradients zeroed not freed, (g) the loss read.
    assert seen["controlnet_autocast"] and not seen["vae_autocast"] and not seen["unet_autocast"]
    assert seen["residual_dtype"] == "float32" and seen["vae_dtype"] == "bfloat16"
    assert "input_ids" in seen["step_input"] and "caption" not in seen["step_input"]
    assert seen["text_encoder_calls"] == 1 and seen["samples_decoded"] == 2
    assert seen["grads_after_step"] == "zeros" and seen["loss_read"] and seen["grad_norm_before_clip"] > 0

    # SDXL: embeddings precomputed (no text encoder in the step), VAE in fp32; every point's flag flips it.
    xl = {r["config"]: r for r in bench.main(["--model", "tiny_sdxl", "--batch-size", "2", "--baseline-only",
                                              *tiny])}  # fmt: skip
    seen = xl["baseline"]["observed"]
    assert seen["text_encoder_calls"] == 0 and "prompt_ids" in seen["step_input"] and seen["vae_dtype"] == "float32"
    flags = [f"--{dest.replace('_', '-')}" for dest, _, _ in bench.POINTS.values()]
    old = bench.main(["--model", "tiny_sdxl", "--batch-size", "2", "--baseline-only", *flags, *tiny])[0]
    assert set(old["faithful"].values()) == {False}  # (b applies again: SDXL tokenizes in the step)
    seen = old["observed"]
    assert seen["vae_autocast"] and seen["unet_autocast"] and seen["residual_dtype"] == "bfloat16"
    assert seen["text_encoder_calls"] == 2 and seen["vae_dtype"] == "bfloat16" and "caption" in seen["step_input"]
    assert seen["samples_decoded"] == 0 and seen["grads_after_step"] == "none" and not seen["loss_read"]
    assert seen["grad_norm_before_clip"] is None


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
    args = ["--samples", "600", "--per-shard", "50", "--position", "240", "--stream-position", "80", "--workers", "0"]
    result = _load("bench_resume").main([*args, "--dir", str(tmp_path)])
    assert result["shards"] == 12 and result["same_batch"] is True
    assert result["indexed_resume_s"] > 0 and result["stream_resume_s"] > 0
    assert len(list(tmp_path.glob("*.tar.idx.npz"))) == 12  # indexed once, beside the shards
