"""What controlnet-ui needs from prep, driven through the same APIs as controlnet-prep: field checks
(the UI and the command refuse the same values), the preview (the hint prep writes, byte for byte), the
scan and the skipped-file lists, and the folder layout's manifest across a cancel and a resume."""

import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from nemo_controlnet.config import (
    ConfigError,
    canny_problems,
    control_size_problem,
    dataset_name_problem,
    readable_path_problem,
    validate_prep_config,
)
from nemo_controlnet.data.decode import BadSample
from nemo_controlnet.data.folder import FolderSource
from nemo_controlnet.prep.job import PrepJob
from nemo_controlnet.prep.preview import SourcePreview
from nemo_controlnet.prep.shards import skipped_files
from tests.test_prep import picture, prep_cfg, read_out, save

CANNY = "nemo_controlnet.data.hints.Canny"


def canny(low: int, high: int, blur: int = 0) -> dict:
    return {"_target_": CANNY, "low_threshold": low, "high_threshold": high, "blur": blur}


def noise(seed: int, size=(128, 96)) -> np.ndarray:
    """Smoothed noise: edges of every strength, so Canny's output depends strongly on the thresholds."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 160, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.BILINEAR))


@pytest.fixture
def messy_folder(tmp_path):
    """6 good captioned images, a corrupt .jpg (captioned) and a good image without a caption."""
    root = tmp_path / "photos"
    for i in range(6):
        save(root / f"img{i}.png", noise(i)).with_suffix(".txt").write_text(f"noise {i}")
    (root / "broken.jpg").write_bytes(os.urandom(700))
    (root / "broken.txt").write_text("never read")
    save(root / "uncaptioned.png", noise(9))
    return root


# ---- field checks ---------------------------------------------------------------------------------


def test_canny_problems_name_each_bad_field():
    for ok in ((100, 200, 0), (0, 255, 255), (50.0, 99.0, 3), (0, 1, 1)):
        assert canny_problems(*ok) == {}, ok
    assert set(canny_problems(300, 200, 0)) == {"low_threshold"}
    assert set(canny_problems(-1, 256, 0)) == {"low_threshold", "high_threshold"}
    assert set(canny_problems(100.5, 200, 0)) == {"low_threshold"}  # not an integer
    assert set(canny_problems("100", 200, 0)) == {"low_threshold"} == set(canny_problems(True, 200, 0))
    assert canny_problems(150, 150, 0) == {"high_threshold": "expected more than low_threshold (150)"}  # strict
    assert set(canny_problems(200, 100, 0)) == {"high_threshold"}
    for blur in (2, 4, -1, 257, 3.5):
        assert set(canny_problems(100, 200, blur)) == {"blur"}, blur
    assert canny_problems(100, 200, 1) == {} and canny_problems(100, 200, 7) == {}


def test_control_size_problem():
    for ok in (None, 64, 512, 768, 4096, 512.0):
        assert control_size_problem(ok) is None, ok
    for bad in (0, 32, 56, 100, 4104, 8192, 512.5, "512", True):
        assert "multiple of 8 in 64..4096" in control_size_problem(bad), bad


def test_dataset_name_problem():
    for ok in ("fill50k", "my photos 2", "a.b", "x" * 100, "naïve"):
        assert dataset_name_problem(ok) is None, ok
    bad = {"": "a name", None: "a name", "a/b": "separators", "a\\b": "separators", ".": "leading dot",
           "..": "'..'", "a..b": "'..'", ".hidden": "leading dot", "tab\there": "printable", "nul\0": "printable",
           "x" * 101: "at most 100", " padded": "spaces"}  # fmt: skip
    for name, why in bad.items():
        assert why in dataset_name_problem(name), name


def test_readable_path_problem(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    assert readable_path_problem(tmp_path) is None and readable_path_problem(tmp_path / "f.txt", "file") is None
    assert readable_path_problem(tmp_path / "f.txt", "any") is None and readable_path_problem(tmp_path, "any") is None
    assert readable_path_problem(tmp_path / "f.txt") == f"{tmp_path / 'f.txt'} is not a directory"
    assert readable_path_problem(tmp_path, "file") == f"{tmp_path} is not a file"
    assert readable_path_problem(tmp_path / "nope", "any") == f"no such file or directory: {tmp_path / 'nope'}"
    assert readable_path_problem("", "any") == "expected a path"
    with pytest.raises(ValueError, match="kind='folder'"):
        readable_path_problem(tmp_path, "folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_readable_path_problem_sees_permissions(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o600)  # readable but not searchable: its files cannot be opened
    try:
        assert readable_path_problem(locked) == f"permission denied: {locked} is not readable"
    finally:
        locked.chmod(0o700)


def test_the_command_refuses_what_the_fields_refuse(tmp_path):
    base = [f"source.root={tmp_path}", f"out_dir={tmp_path / 'out'}"]
    validate_prep_config(prep_cfg(*base))  # conf/hint/canny.yaml's defaults pass
    with pytest.raises(ConfigError) as e:
        validate_prep_config(prep_cfg(*base, "hint.low_threshold=300", "hint.blur=4", "resolution=500"))
    lines = str(e.value).splitlines()
    assert "  hint.low_threshold=300: expected an integer in 0..255" in lines
    assert "  hint.blur=4: expected 0 (no blur) or an odd kernel size in 1..255" in lines
    assert "  resolution=500: expected a multiple of 8 in 64..4096, or none to keep the size" in lines
    with pytest.raises(ConfigError, match=r"hint.high_threshold=120: expected more than low_threshold \(120\)"):
        validate_prep_config(prep_cfg(*base, "hint.low_threshold=120", "hint.high_threshold=120"))
    with pytest.raises(ConfigError, match="hint.high_threshold"):  # precompute computes hints too
        validate_prep_config(prep_cfg("mode=precompute", f"source.root={tmp_path}", "hint.high_threshold=999"))
    validate_prep_config(prep_cfg(*base, "hint=given", "resolution=512"))  # not Canny: no thresholds to check
    validate_prep_config(prep_cfg("mode=precompute", f"source.root={tmp_path}", "resolution=7"))  # unused there


# ---- preview and scan -----------------------------------------------------------------------------


def test_scan_counts_readable_and_names_the_skipped(messy_folder):
    preview = SourcePreview(prep_cfg(f"source.root={messy_folder}").source)
    result = preview.scan()
    assert result.readable == 6
    assert sorted(result.skipped) == [(str(messy_folder / "broken.jpg"), "corrupt_image"),
                                      (str(messy_folder / "uncaptioned.png"), "missing_caption")]  # fmt: skip
    assert preview.scan(limit=3).readable == 2  # broken.jpg is the first of the sorted listing
    (messy_folder / "img0.png").write_bytes(b"broken now")  # a finished scan is kept, like the listing
    assert preview.scan() == result and preview.scan(limit=3).readable == 2
    seen = []
    fresh = SourcePreview(prep_cfg(f"source.root={messy_folder}").source)
    stopped = fresh.scan(progress=seen.append, should_stop=lambda: len(seen) == 4)
    assert seen == [1, 2, 3, 4] and stopped.readable + len(stopped.skipped) == 4  # broken.jpg, img0..img2
    assert fresh.scan().readable == 5  # a stopped scan is not kept: this one reads img0 as it is now


def test_preview_is_the_hint_prep_writes(messy_folder, tmp_path):
    preview = SourcePreview(prep_cfg(f"source.root={messy_folder}").source)
    assert len(preview) == 8 and preview.keys() == [f"{i:09d}" for i in range(8)]  # prep's keys
    index = preview.sources().index(str(messy_folder / "img2.png"))
    soft = preview.pair(index, canny(50, 100), control_size=64, seed=3)
    strict = preview.pair(index, canny(150, 250), control_size=64, seed=3)
    assert soft.image.shape == soft.hint.shape == (64, 85, 3) and soft.hint.dtype == np.uint8
    assert (soft.hint > 0).sum() > 1.5 * (strict.hint > 0).sum() > 0  # the thresholds matter
    assert soft.hint_params == {"detector": "canny", "low_threshold": 50, "high_threshold": 100, "blur": 0}
    assert soft.caption == "noise 2" and soft.source == str(messy_folder / "img2.png")

    out = tmp_path / "out"
    summary = PrepJob(prep_cfg(f"source.root={messy_folder}", f"out_dir={out}", "resolution=64", "seed=3",
                               "hint.low_threshold=50", "hint.high_threshold=100", "shard_size=3")).run()  # fmt: skip
    assert summary["written"] == 6
    written = read_out(out)[soft.key]
    hint = np.asarray(Image.open(io.BytesIO(written["png"])))
    assert hint.ndim == 2 and np.array_equal(soft.hint, np.repeat(hint[:, :, None], 3, axis=2))
    assert np.asarray(Image.open(io.BytesIO(written["jpg"]))).shape == soft.image.shape


def test_preview_raises_what_prep_skips_and_refuses_bad_fields(messy_folder):
    preview = SourcePreview(prep_cfg(f"source.root={messy_folder}").source)
    sources = preview.sources()
    with pytest.raises(BadSample) as e:
        preview.pair(sources.index(str(messy_folder / "broken.jpg")), canny(100, 200))
    assert e.value.reason == "corrupt_image"
    with pytest.raises(BadSample) as e:
        preview.pair(sources.index(str(messy_folder / "uncaptioned.png")), canny(100, 200))
    assert e.value.reason == "missing_caption"
    with pytest.raises(ConfigError, match=r"hint.high_threshold: expected more .*; resolution: expected a multiple"):
        preview.pair(1, OmegaConf.create(canny(200, 100)), control_size=100)
    with pytest.raises(IndexError, match="sample 8: the source has 8"):
        preview.pair(8, canny(100, 200))


def test_moving_a_slider_reads_nothing_again(messy_folder):
    preview = SourcePreview(prep_cfg(f"source.root={messy_folder}").source)
    first = preview.pair(1, canny(100, 200))
    save(messy_folder / "aaa_new.png", noise(20)).with_suffix(".txt").write_text("new")  # the listing is kept
    (messy_folder / "img0.png").unlink()  # and sample 1's bytes: another threshold needs no file
    again = preview.pair(1, canny(100, 200))
    assert len(preview) == 8 and np.array_equal(first.hint, again.hint) and again.key == first.key


def test_preview_of_existing_shards_lists_a_bounded_prefix(tmp_path):
    src = tmp_path / "img2dataset"
    src.mkdir()
    for shard in range(3):
        with wds.TarWriter(str(src / f"{shard:05d}.tar")) as sink:
            for j in range(3):
                buf = io.BytesIO()
                Image.fromarray(noise(shard * 3 + j)).save(buf, format="PNG")
                sink.write({"__key__": f"{shard}-{j}", "png": buf.getvalue(), "txt": "cap"})
    preview = SourcePreview(prep_cfg("source=shards", f"source.shards={src}", "source.image_key=png").source,
                            list_limit=4)  # fmt: skip
    assert preview.keys() == ["0-0", "0-1", "0-2", "1-0"]  # the first samples only, in prep's order
    pair = preview.pair(3, canny(100, 200))
    assert pair.key == "1-0" and pair.source.endswith("00001.tar:1-0") and pair.caption == "cap"
    assert preview.scan().readable == 9 and preview.scan(limit=5).readable == 5


# ---- skipped files, as the UI lists them ----------------------------------------------------------


def test_skipped_files_are_listed_per_shard_and_survive_a_resume(messy_folder, tmp_path):
    out = tmp_path / "out"
    args = [f"source.root={messy_folder}", f"out_dir={out}", "shard_size=2"]
    expected = [(str(messy_folder / "broken.jpg"), "corrupt_image"),
                (str(messy_folder / "uncaptioned.png"), "missing_caption")]  # fmt: skip
    job = PrepJob(prep_cfg(*args), lambda p: p.units_done == 1 and job.cancel())  # broken.jpg is in shard 0
    job.run()
    assert job.skipped_files == expected[:1] == skipped_files(out)
    stats = json.loads((out / ".prep" / "data-000000.tar.json").read_text())
    assert stats["skipped_files"][0][:2] == list(expected[0]) and "cannot identify" in stats["skipped_files"][0][2]
    assert stats["skipped_files_left_out"] == 0

    resumed = PrepJob(prep_cfg(*args))
    assert resumed.run()["complete"]
    assert sorted(resumed.skipped_files) == expected == sorted(skipped_files(out))  # shard 0's from the first run


def test_skipped_files_are_capped_per_shard(tmp_path, monkeypatch):
    import nemo_controlnet.prep.writer as writer

    monkeypatch.setattr(writer, "SKIPPED_FILES_CAP", 2)
    root = tmp_path / "broken"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.jpg").write_bytes(b"not a jpeg")
        (root / f"{i}.txt").write_text("x")
    PrepJob(prep_cfg(f"source.root={root}", f"out_dir={tmp_path / 'out'}")).run()
    stats = json.loads((tmp_path / "out" / ".prep" / "data-000000.tar.json").read_text())
    assert [s for s, _, _ in stats["skipped_files"]] == [str(root / "0.jpg"), str(root / "1.jpg")]
    assert stats["skipped_files_left_out"] == 3 and stats["skipped"] == {"corrupt_image": 5}


# ---- the folder layout: mode=precompute's manifest ------------------------------------------------


def precompute_args(root):
    return ["mode=precompute", f"source.root={root}", "workers=1", "hint._target_=tests.test_prep_job.SlowCanny"]


def test_a_cancelled_precompute_leaves_a_consistent_manifest_and_resumes(tmp_path):
    root = tmp_path / "photos"
    for i in range(10):
        save(root / ("sub" if i % 3 == 0 else "") / f"{i:02d}.jpg", picture(i)).with_suffix(".txt").write_text("x")
    (root / "00bad.jpg").write_bytes(b"\xff\xd8 not really")  # first in the sorted listing
    job = PrepJob(prep_cfg(*precompute_args(root)), lambda p: p.units_done == 4 and job.cancel())
    summary = job.run()
    assert summary["cancelled"] and not summary["complete"]
    manifest = json.loads((root / "canny" / "manifest.json").read_text())
    hints = manifest["hints"]
    on_disk = sorted(p.relative_to(root / "canny").as_posix() for p in (root / "canny").rglob("*_canny.png"))
    assert not manifest["complete"] and sorted(hints.values()) == on_disk
    assert len(hints) + len(manifest["skipped_files"]) == 4 == manifest["num_hints"] + len(manifest["skipped_files"])
    for image, hint in hints.items():  # every mapped hint is whole and belongs to its image
        decoded = Image.open(root / "canny" / hint)
        assert decoded.format == "PNG" and decoded.size == (48, 40) and (root / image).is_file()
        decoded.load()
        assert hint == image.rsplit(".", 1)[0] + "_canny.png"
    assert [f[:2] for f in manifest["skipped_files"]] == [["00bad.jpg", "corrupt_image"]]
    assert job.skipped_files == [(str(root / "00bad.jpg"), "corrupt_image")]

    resumed = PrepJob(prep_cfg(*precompute_args(root))).run()
    assert resumed["complete"] and resumed["present"] == 3 and resumed["written"] == 7
    manifest = json.loads((root / "canny" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == 11 and manifest["skipped"] == {"corrupt_image": 1}
    assert sorted(manifest["hints"]) == sorted(p.relative_to(root).as_posix() for p in root.rglob("[0-9][0-9].jpg"))
    assert all((root / "canny" / h).is_file() for h in manifest["hints"].values())


def test_the_folder_source_follows_the_manifest(tmp_path):
    root = tmp_path / "photos"
    for i in range(4):
        save(root / f"{i}.jpg", picture(i)).with_suffix(".txt").write_text(f"c{i}")
    (root / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    assert PrepJob(prep_cfg(*precompute_args(root))).run()["complete"]
    # A user (or another tool) names control files its own way: the manifest, not the naming rule, decides.
    hints_dir = root / "canny"
    (hints_dir / "1_canny.png").rename(hints_dir / "control-one.png")
    manifest_path = hints_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["hints"]["1.jpg"] = "control-one.png"
    manifest_path.write_text(json.dumps(manifest))

    source = FolderSource(str(root))  # without the manifest, bad.jpg's missing hint would refuse to start
    assert source.left_out == 1 and sorted(p.name for p, _ in source.items) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    samples = {s["__key__"]: s for s in source.samples("s", "e", False, None)}
    assert samples["1"]["png"] == (hints_dir / "control-one.png").read_bytes()
    for key in ("0", "2", "3"):
        assert samples[key]["png"] == (hints_dir / f"{key}_canny.png").read_bytes()

    manifest_path.unlink()  # as before manifests: by the naming rule, and bad.jpg has no hint
    with pytest.raises(FileNotFoundError, match="2 of 5 precomputed hints missing"):
        FolderSource(str(root))
    manifest_path.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not a precompute manifest"):
        FolderSource(str(root))


def test_precompute_manifest_is_rewritten_while_it_runs(tmp_path, monkeypatch):
    import nemo_controlnet.prep.precompute as precompute

    monkeypatch.setattr(precompute, "MANIFEST_EVERY_S", 0.0)  # every image
    root = tmp_path / "photos"
    for i in range(3):
        save(root / f"{i}.jpg", picture(i))
    manifest_path = root / "canny" / "manifest.json"
    seen = []

    def watch(p):  # what a UI polling the manifest sees after each image
        seen.append(len(json.loads(manifest_path.read_text())["hints"]) if manifest_path.is_file() else None)

    PrepJob(prep_cfg("mode=precompute", f"source.root={root}"), watch).run()
    assert seen == [None, 1, 2]  # the report comes before the write that follows each image
    assert json.loads(manifest_path.read_text())["num_hints"] == 3
