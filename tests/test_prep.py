"""controlnet-prep: every source layout, every bad-input class, crash-resume, SLURM slices, precompute."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from nemo_controlnet.data.hints import Canny
from nemo_controlnet.prep.job import run_prep
from nemo_controlnet.prep.shards import resolve_task, task_units

REPO = Path(__file__).resolve().parents[1]


class ExitAfter(Canny):
    """Canny that kills its process, as kill -9 would (no cleanup), after CRASH_AFTER calls."""

    calls = 0

    def __call__(self, image, conditioning=None, rng=None):
        ExitAfter.calls += 1
        if ExitAfter.calls > int(os.environ.get("CRASH_AFTER", 1 << 30)):
            os._exit(137)
        return super().__call__(image, conditioning, rng)


class SignalProbe(Canny):
    """Canny that refuses to run where SIGTERM would not kill the process (a Python handler in place)."""

    def __call__(self, image, conditioning=None, rng=None):
        import signal

        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            raise RuntimeError(f"SIGTERM handled by {signal.getsignal(signal.SIGTERM)!r} in a prep worker")
        return super().__call__(image, conditioning, rng)


def prep_cfg(*overrides: str):
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="prep", overrides=["workers=1", *overrides])
    OmegaConf.set_struct(cfg, False)
    return cfg


def picture(seed: int, size=(48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), rng.integers(0, 80, 3), np.uint8)
    x, y = rng.integers(4, 20, 2)
    arr[y : y + 14, x : x + 18] = rng.integers(150, 255, 3)
    return arr


def save(path: Path, arr: np.ndarray, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def read_out(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for shard in manifest["shards"]:
        for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False):
            assert s["__key__"] not in samples
            samples[s["__key__"]] = s
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(samples)
    return samples


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_image_folder_with_sidecar_captions(tmp_path):
    root = tmp_path / "photos"
    for i in range(5):
        path = save(root / ("sub" if i % 2 else "") / f"img{i}.{'png' if i == 4 else 'jpg'}", picture(i))
        if i != 3:
            path.with_suffix(".txt").write_text(f"square number {i}\n")
    summary = run_prep(prep_cfg(f"source.root={root}", f"out_dir={tmp_path / 'out'}", "shard_size=2"))
    assert summary["written"] == 4 and summary["skipped"] == {"missing_caption": 1} and summary["complete"]
    samples = read_out(tmp_path / "out")
    by_source = {json.loads(s["json"])["relpath"]: s for s in samples.values()}
    assert sorted(by_source) == ["img0.jpg", "img2.jpg", "img4.png", "sub/img1.jpg"]
    s = by_source["img4.png"]
    assert s["txt"] == b"square number 4"
    # The hint is Canny of the decoded source image, and recorded with its parameters.
    expected, params = Canny()(Image.open(root / "img4.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), np.asarray(expected))  # one channel
    assert json.loads(s["json"])["hint"] == params


def test_image_folder_with_fixed_caption_and_resize(tmp_path):
    root = tmp_path / "photos"
    for i in range(3):
        save(root / f"{i}.jpg", picture(i, size=(192, 128)))
    run_prep(prep_cfg(f"source.root={root}", "source.caption=a photo", f"out_dir={tmp_path / 'out'}", "resolution=64"))
    samples = read_out(tmp_path / "out")
    assert len(samples) == 3 and {s["txt"] for s in samples.values()} == {b"a photo"}
    meta = json.loads(next(iter(samples.values()))["json"])
    assert meta["original_size"] == [192, 128] and meta["size"] == [96, 64]
    assert decode(next(iter(samples.values()))["png"]).shape == (64, 96, 3)  # hint at the resized size


def test_metadata_jsonl_with_given_hints_and_custom_columns(tmp_path):
    root = tmp_path / "ds"
    rows = []
    for i in range(3):
        save(root / "images" / f"{i}.png", picture(i))
        save(root / "cond" / f"{i}.png", 255 - picture(i))
        rows.append({"file": f"images/{i}.png", "hint_file": f"cond/{i}.png", "prompt": f"p{i}"})
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"prompt": "no image column"})]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_prep(prep_cfg(
        "source=metadata_jsonl", f"source.root={root}", "source.image_column=file",
        "source.conditioning_column=hint_file", "source.caption_column=prompt", "hint=given",
        f"out_dir={tmp_path / 'out'}", "image_key=target.png",
    ))  # fmt: skip
    assert summary["skipped"] == {"bad_metadata": 2}  # counted, not fatal
    samples = read_out(tmp_path / "out")
    assert len(samples) == 3
    for i, s in enumerate(sorted(samples.values(), key=lambda s: s["__key__"])):
        assert np.array_equal(decode(s["target.png"]), picture(i))  # lossless target
        assert np.array_equal(decode(s["png"]), 255 - picture(i))  # the given hint, untouched
        assert s["txt"] == f"p{i}".encode()


def test_original_controlnet_layout_with_bad_pairs(tmp_path):
    root = tmp_path / "fill"
    lines = []
    for i in range(4):
        save(root / "target" / f"{i}.png", picture(i))
        if i != 1:  # 1: its source file is missing
            save(root / "source" / f"{i}.png", 255 - picture(i, size=(48, 40) if i != 2 else (40, 40)))
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"c{i}"}))
    (root / "prompt.json").write_text("\n".join(lines))
    summary = run_prep(prep_cfg("source=prompt_json", f"source.root={root}", "hint=given", f"out_dir={tmp_path / 'o'}"))
    assert summary["written"] == 2
    assert summary["skipped"] == {"missing_conditioning": 1, "size_mismatch": 1}
    assert sorted(s["txt"] for s in read_out(tmp_path / "o").values()) == [b"c0", b"c3"]


def test_existing_shards_get_hints_and_keep_keys(tmp_path):
    src = tmp_path / "img2dataset"
    src.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(src / f"{shard:05d}.tar")) as sink:
            for j in range(3):
                buf = io.BytesIO()
                Image.fromarray(picture(shard * 3 + j)).save(buf, format="JPEG")
                sink.write({"__key__": f"{shard:05d}{j:04d}", "jpg": buf.getvalue(), "txt": "cap",
                            "json": {"url": f"http://x/{j}"}})  # fmt: skip
    run_prep(prep_cfg("source=shards", f"source.shards={src}", f"out_dir={tmp_path / 'out'}"))
    samples = read_out(tmp_path / "out")
    assert sorted(samples) == [f"{s:05d}{j:04d}" for s in range(2) for j in range(3)]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3]  # one output shard per input shard
    s = samples["000010002"]
    assert decode(s["png"]).shape == (40, 48, 3)
    assert json.loads(s["json"])["source_json"] == {"url": "http://x/2"}


def test_bad_inputs_are_converted_or_skipped_never_crash(tmp_path):
    root = tmp_path / "bad"
    good = save(root / "good.jpg", picture(0))
    (root / "corrupt.jpg").write_bytes(os.urandom(500))
    (root / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    Image.fromarray(picture(1)).convert("CMYK").save(root / "cmyk.jpg")
    gray16 = np.zeros((40, 48), np.uint16)
    gray16[10:20, 10:30] = 65535
    Image.fromarray(gray16).save(root / "gray16.png")
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[5:15, 5:15] = (255, 0, 0, 255)  # opaque red square, the rest transparent
    save(root / "rgba.png", rgba)
    save(root / "gray.png", picture(2)[:, :, 0])
    save(root / "latin1.jpg", picture(3))
    for path in root.iterdir():
        path.with_suffix(".txt").write_bytes("caf\xe9".encode("latin-1") if path.stem == "latin1" else b"ok")
    save(root / "nocaption.jpg", picture(4))
    summary = run_prep(prep_cfg(f"source.root={root}", f"out_dir={tmp_path / 'out'}", "shard_size=3", "workers=2"))
    assert summary["skipped"] == {"corrupt_image": 2, "empty_image": 1, "caption_not_utf8": 1, "missing_caption": 1}
    assert summary["converted"] == {"CMYK->RGB": 1, "I;16->RGB": 1, "RGBA->RGB": 1, "L->RGB": 1}
    samples = {json.loads(s["json"])["relpath"]: s for s in read_out(tmp_path / "out").values()}
    assert sorted(samples) == ["cmyk.jpg", "good.jpg", "gray.png", "gray16.png", "rgba.png"]
    rgba_out = decode(samples["rgba.png"]["jpg"]).astype(int)
    assert np.abs(rgba_out[10, 10] - (255, 0, 0)).max() < 40 and rgba_out[30, 40].min() > 220  # alpha -> white
    assert decode(samples["gray16.png"]["jpg"])[15, 20].min() > 240  # 16-bit full scale -> 255
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == summary["skipped"] and manifest["num_samples"] == 5


def test_parallel_prep_finishes_when_the_parent_swallows_sigterm(tmp_path):
    """A parent with a Python SIGTERM handler (a training run's preemption handler, say): the forked
    workers must not inherit it, or the pool's terminate() can wait on one forever (it happened)."""
    import signal

    for i in range(4):
        save(tmp_path / "src" / f"{i}.jpg", picture(i))
        (tmp_path / "src" / f"{i}.txt").write_text("ok")

    def timeout(signum, frame):
        raise TimeoutError("prep's worker pool did not shut down")

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGALRM)}
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    try:
        cfg = prep_cfg(f"source.root={tmp_path / 'src'}", f"out_dir={tmp_path / 'out'}", "shard_size=1",
                       "workers=2", "hint._target_=tests.test_prep.SignalProbe")  # fmt: skip
        summary = run_prep(cfg)
    finally:
        signal.alarm(0)
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert summary["written"] == 4 and summary["complete"] and not summary["skipped"]  # each worker: SIG_DFL


def test_killed_prep_resumes_without_partial_shards(tmp_path):
    root = tmp_path / "photos"
    for i in range(12):
        save(root / f"{i:02d}.jpg", picture(i)).with_suffix(".txt").write_text("x")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "nemo_controlnet.cli.prep", f"source.root={root}", f"out_dir={out}",
            "shard_size=2", "workers=1", "hint._target_=tests.test_prep.ExitAfter"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env={**os.environ, "CRASH_AFTER": "7"}, capture_output=True, timeout=120)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    # Killed in the middle of shard 3 (sample 8 of 12): shards 0-2 complete, shard 3 only a temp file.
    assert sorted(p.name for p in out.glob("data-*.tar")) == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    assert list(out.glob(".data-000003.tar.tmp-*"))
    done = {p: p.stat().st_mtime_ns for p in out.glob("data-*.tar")}

    summary = run_prep(prep_cfg(f"source.root={root}", f"out_dir={out}", "shard_size=2",
                                "hint._target_=tests.test_prep.ExitAfter"))  # fmt: skip
    assert summary["written"] == 6 and summary["complete"]  # only the 3 missing shards redone
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert len(read_out(out)) == 12


def test_rerun_with_other_parameters_needs_overwrite(tmp_path):
    root = tmp_path / "photos"
    save(root / "a.jpg", picture(0)).with_suffix(".txt").write_text("a")
    run_prep(prep_cfg(f"source.root={root}", f"out_dir={tmp_path / 'out'}"))
    with pytest.raises(ValueError, match="other parameters.*hint"):
        run_prep(prep_cfg(f"source.root={root}", f"out_dir={tmp_path / 'out'}", "hint.low_threshold=10"))
    summary = run_prep(prep_cfg(f"source.root={root}", f"out_dir={tmp_path / 'out'}", "hint.low_threshold=10",
                                "overwrite=true"))  # fmt: skip
    assert summary["written"] == 1


def test_slurm_array_slices_cover_every_input_exactly_once(tmp_path, monkeypatch):
    for n, tasks in [(10, 3), (2, 5), (7, 1), (0, 2)]:
        slices = [task_units(n, t, tasks) for t in range(tasks)]
        assert sorted(i for s in slices for i in s) == list(range(n))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert resolve_task(None, None) == (1, 3)
    with pytest.raises(ValueError, match="task_index=3"):
        resolve_task(3, 3)

    root = tmp_path / "photos"
    for i in range(9):
        save(root / f"{i}.jpg", picture(i)).with_suffix(".txt").write_text(str(i))
    out = tmp_path / "out"
    for task in (2, 0, 1):
        summary = run_prep(prep_cfg(f"source.root={root}", f"out_dir={out}", "shard_size=2", f"task_index={task}"))
        assert "manifest" not in summary  # array tasks leave the manifest to the merge step
    assert not (out / "manifest.json").exists()
    manifest = run_prep(prep_cfg(f"out_dir={out}", "mode=merge"))
    assert manifest["complete"] and manifest["num_shards"] == 5
    assert sorted(s["txt"].decode() for s in read_out(out).values()) == [str(i) for i in range(9)]


def test_precompute_hints_beside_a_folder(tmp_path):
    root = tmp_path / "datasets" / "mine"
    for i in range(3):
        save(root / ("a" if i else "") / f"{i}.jpg", picture(i))
    summary = run_prep(prep_cfg("mode=precompute", f"source.root={root}", "workers=2"))
    hints = sorted(p.relative_to(root) for p in (root / "canny").rglob("*.png"))
    assert [str(h) for h in hints] == ["canny/0_canny.png", "canny/a/1_canny.png", "canny/a/2_canny.png"]
    assert summary["written"] == 3 and summary["num_hints"] == 3
    expected, _ = Canny()(Image.open(root / "a" / "1.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(root / "canny" / "a" / "1_canny.png")), np.asarray(expected))
    mtime = (root / "canny" / "0_canny.png").stat().st_mtime_ns
    again = run_prep(prep_cfg("mode=precompute", f"source.root={root}"))
    assert again["written"] == 0 and again["present"] == 3
    assert (root / "canny" / "0_canny.png").stat().st_mtime_ns == mtime
    assert json.loads((root / "canny" / "manifest.json").read_text())["num_hints"] == 3
