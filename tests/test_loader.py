"""The training loader at scale: paired augmentation stays aligned, hints after augmentation,
folder datasets, weighted mixing, resampled epochs, corrupt data counted and survived."""

import io
import random
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from nemo_controlnet.data.datamodule import ShardDataModule, make_sources
from nemo_controlnet.data.folder import FolderSource
from nemo_controlnet.data.hints import Canny
from nemo_controlnet.data.transforms import ResizeCrop
from nemo_controlnet.data.webdataset import EpochStream, SampleDecoder, SampleStream, ShardSource, batches

BORDER = 3


def rectangle_image(width=96, height=72) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    img[17:51, 23:70] = (230, 230, 230)
    img[30:40, 5:15] = (120, 200, 40)
    return img


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def near(a: np.ndarray, b: np.ndarray, tolerance: int = 1) -> float:
    """Fraction of a's edge pixels (away from the border) within ``tolerance`` px of an edge in b
    (anywhere: an edge of b in the border ring is still the neighbour of one of a just inside it)."""
    a = a.copy()
    a[:BORDER], a[-BORDER:], a[:, :BORDER], a[:, -BORDER:] = 0, 0, 0, 0
    grown = cv2.dilate((b > 0).astype(np.uint8), np.ones((2 * tolerance + 1,) * 2, np.uint8))
    ys, xs = np.nonzero(a)
    return float(grown[ys, xs].mean()) if len(ys) else 1.0


@pytest.mark.parametrize("seed", range(6))
def test_augment_then_canny_equals_canny_then_augment(seed):
    """augment_align: flips and crops commute with edge detection, up to interpolation at borders."""
    image = Image.fromarray(rectangle_image())
    edges, _ = Canny()(image)
    geometry = ResizeCrop.draw(*image.size, 64, crop="random", hflip=0.5, rng=random.Random(seed))
    a = np.asarray(Canny()(geometry.apply(image, "image"))[0])
    b = np.asarray(geometry.apply(edges, "hint"))
    assert a.any() and b.any()
    assert near(a, b) > 0.95 and near(b, a) > 0.95


def test_hint_from_a_shard_stays_aligned_through_every_transform(tmp_path):
    image = rectangle_image()
    hint = np.zeros_like(image)
    hint[17, 23:70] = hint[50, 23:70] = hint[17:51, 23] = hint[17:51, 69] = 255  # the bright box's outline
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "box", "jpg": png(image), "png": png(hint), "txt": "box"})
    for epoch in range(8):  # a different crop and flip every epoch
        decoder = SampleDecoder(64, crop="random", hflip=0.5, seed=3)
        stream = SampleStream([(ShardSource([str(tmp_path / "s.tar")]), 1.0)], decoder, 1, epoch, shuffle_buffer=0)
        batch = next(iter(batches(stream)))
        img = batch["image"][0].permute(1, 2, 0).numpy()
        box_edges = cv2.Canny(np.ascontiguousarray(img), 100, 200)
        hint_edges = (batch["hint"][0, 0].numpy() > 76).astype(np.uint8)
        assert near(hint_edges, box_edges, tolerance=2) > 0.9, f"epoch {epoch}"
        assert near(box_edges * (img.mean(axis=2) > 170), hint_edges, tolerance=2) > 0.9, f"epoch {epoch}"


def test_on_the_fly_hints_are_computed_after_augmentation(tmp_path):
    with wds.TarWriter(str(tmp_path / "nohints.tar")) as sink:
        sink.write({"__key__": "k", "jpg": png(rectangle_image()), "txt": "x"})
    decoder = SampleDecoder(64, crop="random", hflip=1.0, detector=Canny(), regenerate=True, seed=1)
    stream = SampleStream([(ShardSource([str(tmp_path / "nohints.tar")]), 1.0)], decoder, 1, 0, shuffle_buffer=0)
    batch = next(iter(batches(stream)))
    img = batch["image"][0].permute(1, 2, 0).numpy()
    expected = np.asarray(Canny()(Image.fromarray(img))[0])  # canny of exactly the augmented image the model sees
    got = batch["hint"][0].permute(1, 2, 0).numpy()
    assert np.array_equal(got[:, :, 0], expected) and np.array_equal(got[:, :, 1], expected)
    assert not SampleDecoder(64).__dict__["regenerate"]
    with pytest.raises(ValueError, match="needs a detector"):
        SampleDecoder(64, regenerate=True)


def _folder(tmp_path: Path, n=4) -> Path:
    root = tmp_path / "ds"
    for i in range(n):
        (root / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rectangle_image()).save(root / "sub" / f"{i}.jpg")
        (root / "sub" / f"{i}.txt").write_text(f"caption {i}")
    return root


def test_folder_dataset_prefers_precomputed_hints(tmp_path):
    root = _folder(tmp_path)
    hints = root / "canny" / "sub"
    hints.mkdir(parents=True)
    for i in range(3):  # hint 3 is missing
        Image.fromarray(np.full((72, 96, 3), 255, np.uint8)).save(hints / f"{i}_canny.png")  # all white: not canny
    with pytest.raises(FileNotFoundError, match=r"1 of 4 precomputed hints missing, first: .*sub/3_canny.png"):
        FolderSource(str(root))
    source = FolderSource(str(root), on_the_fly=True)
    decoder = SampleDecoder(64, detector=Canny())
    out = list(batches(SampleStream([(source, 1.0)], decoder, 1, 0, shuffle_buffer=0)))
    by_key = {b["key"][0]: b for b in out}
    assert sorted(by_key) == [f"sub/{i}" for i in range(4)]
    assert by_key["sub/0"]["hint"].min() == 255  # the precomputed (white) hint was used
    computed = by_key["sub/3"]["hint"].float() / 255
    assert 0 < computed.mean() < 0.5  # computed on the fly: an edge map
    assert by_key["sub/2"]["caption"] == ["caption 2"]


def _shards(tmp_path: Path, name: str, count: int, per_shard: int = 10) -> list[str]:
    urls = []
    for s in range(count):
        url = str(tmp_path / f"{name}-{s}.tar")
        with wds.TarWriter(url) as sink:
            for j in range(per_shard):
                sink.write({"__key__": f"{name}{s}_{j}", "jpg": png(rectangle_image(32, 32)),
                            "png": png(np.zeros((32, 32, 3), np.uint8)), "txt": name})  # fmt: skip
        urls.append(url)
    return urls


def test_weighted_mixing_and_resampled_epochs(tmp_path):
    a, b = _shards(tmp_path, "a", 2), _shards(tmp_path, "b", 2)
    decoder = SampleDecoder(32)

    def epoch(e):
        sources = [(ShardSource(a), 3.0), (ShardSource(b), 1.0)]
        stream = SampleStream(sources, decoder, 10, e, seed=4, shuffle_buffer=20, resampled=True, samples_per_epoch=400)
        return [k for batch in batches(stream) for k in batch["key"]]

    keys = epoch(0)
    assert len(keys) == 400  # resampled: the epoch is samples_per_epoch long
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.68 < share_a < 0.82
    assert epoch(0) == keys and epoch(1) != keys  # deterministic, and another draw every epoch
    with pytest.raises(ValueError, match="samples_per_epoch"):
        SampleStream([(ShardSource(a), 1.0)], decoder, 10, 0, resampled=True)


def test_finite_mixing_reads_every_sample_once(tmp_path):
    a, b = _shards(tmp_path, "a", 2), _shards(tmp_path, "b", 1)
    stream = SampleStream([(ShardSource(a), 1.0), (ShardSource(b), 5.0)], SampleDecoder(32), 5, 0, seed=1)
    keys = [k for batch in batches(stream) for k in batch["key"]]
    assert sorted(keys) == sorted([f"a{s}_{j}" for s in range(2) for j in range(10)] + [f"b0_{j}" for j in range(10)])


def test_resampled_stream_resumes_exactly(tmp_path):
    urls = _shards(tmp_path, "r", 3)

    def make(e, first=0):
        stream = SampleStream([(ShardSource(urls), 1.0)], SampleDecoder(32), 4, e, seed=2, shuffle_buffer=8,
                              resampled=True, samples_per_epoch=40)  # fmt: skip
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)

    def keys(stream, n):
        return [(b["data_position"], tuple(b["key"])) for b, _ in zip(stream, range(n))]

    full = keys(EpochStream(make), 14)  # 10 batches an epoch (2 workers x 20 samples / 4)
    assert full[9][0] == (0, 9) and full[10][0] == (1, 0)
    assert keys(EpochStream(make, start=(0, 6)), 7) == full[7:14]


def cut_in_member(shard: str, index: int) -> str:
    """Truncate ``shard`` halfway through the data of its ``index``-th member; that member's name."""
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[index]
    Path(shard).write_bytes(Path(shard).read_bytes()[: member.offset_data + member.size // 2])
    return member.name


def test_corrupt_shards_are_survived_and_counted(tmp_path):
    good = _shards(tmp_path, "g", 2, per_shard=6)
    bad = str(tmp_path / "bad.tar")
    with wds.TarWriter(bad) as sink:
        sink.write({"__key__": "ok", "jpg": png(rectangle_image(32, 32)), "png": png(np.zeros((32, 32, 3), np.uint8))})
        sink.write({"__key__": "nohint", "jpg": png(rectangle_image(32, 32))})
        sink.write({"__key__": "badjpg", "jpg": b"\xff\xd8garbage", "png": png(np.zeros((32, 32, 3), np.uint8))})
        small_hint = png(np.zeros((8, 8, 3), np.uint8))
        sink.write({"__key__": "mismatch", "jpg": png(rectangle_image(32, 32)), "png": small_hint})
    truncated = _shards(tmp_path, "t", 1, per_shard=6)[0]
    cut_in_member(truncated, 4)
    cfg = OmegaConf.create(
        {"shards": [*good, bad, truncated], "num_workers": 2, "resolution": 32, "batch_size": 2,
         "shuffle_buffer": 0, "image_key": "jpg", "hint_key": "png", "caption_key": "txt", "access": "stream"}
    )  # fmt: skip
    dm = ShardDataModule(cfg, hint_channels=3, seed=0)
    dm.setup("fit")
    stream = dm.train_dataloader()
    keys = []
    for batch in stream:  # one whole epoch: the run goes on past every bad sample and shard
        if batch["data_position"][0] == 1:
            break
        keys += batch["key"]
    assert "ok" in keys and not {"nohint", "badjpg", "mismatch"} & set(keys)
    counts = dict(stream.skipped)  # epoch 0's, gathered from both workers
    # One read error for the truncated tar, under its own name: not a sample count, not counted twice.
    assert counts == {"missing_hint": 1, "corrupt_image": 1, "size_mismatch": 1, "truncated_shard": 1}, counts
    assert len(set(keys)) == len(keys)


def test_a_truncated_shard_is_one_error_naming_shard_and_member(tmp_path, caplog):
    shard = _shards(tmp_path, "t", 1, per_shard=6)[0]
    cut = cut_in_member(shard, 5)
    decoder = SampleDecoder(32)
    source = ShardSource([shard])
    stream = EpochStream(lambda epoch, first=0: SampleStream([(source, 1.0)], decoder, 1, epoch, shuffle_buffer=0))
    with caplog.at_level("INFO"):
        good = []
        for batch in stream:
            if batch["data_position"][0] == 1:
                break
            good += batch["key"]
    assert stream.skipped == {"truncated_shard": 1}
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad data")]
    assert len(warnings) == 1  # once (webdataset's reader reported it twice)
    assert shard in warnings[0] and f"in member {cut}" in warnings[0], warnings[0]
    assert len(good) == len(set(good)) and good, "the samples before the damage are used"
    assert cut.split(".")[0] not in good, "the sample the cut falls in is dropped with the error"
    epoch_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data epoch 0 done"))
    assert "0 bad samples skipped {}, 1 shard(s) not read to the end {'truncated_shard': 1}" in epoch_line


@pytest.mark.parametrize("access", ["stream", "indexed"])
@pytest.mark.parametrize("mode", ["empty", "skip"])
def test_samples_without_a_caption_are_counted_and_follow_data_missing_caption(tmp_path, mode, access, caplog):
    shard = str(tmp_path / "c.tar")
    with wds.TarWriter(shard) as sink:
        for i in range(4):
            sample = {"__key__": f"s{i}", "jpg": png(rectangle_image(32, 32)), "png": png(np.zeros((32, 32), np.uint8))}
            if i % 2:
                sample["txt"] = f"caption {i}"
            sink.write(sample)
    cfg = OmegaConf.create({"shards": shard, "num_workers": 0, "resolution": 32, "batch_size": 1, "shuffle_buffer": 0,
                            "image_key": "jpg", "hint_key": "png", "caption_key": "txt", "missing_caption": mode,
                            "access": access})  # fmt: skip
    dm = ShardDataModule(cfg, hint_channels=3, seed=0)
    dm.setup("fit")
    stream = dm.train_dataloader()
    captions, steps = {}, 0
    with caplog.at_level("INFO"):
        for batch in stream:
            if batch["data_position"][0] == 1:
                break
            captions[batch["key"][0]] = batch["caption"][0]
            steps += 1
    epoch_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data epoch 0 done"))
    if mode == "empty":  # trained as unconditional samples, and said so
        assert captions == {"s0": "", "s1": "caption 1", "s2": "", "s3": "caption 3"}
        assert stream.notes == {"missing_caption": 2} and not stream.skipped
        assert "2 sample(s) without a caption trained with the empty prompt" in epoch_line
        assert any("c.tar:s0: no 'txt' member" in r.getMessage() for r in caplog.records)
    elif access == "stream":  # left out
        assert captions == {"s1": "caption 1", "s3": "caption 3"} and steps == 2
        assert stream.skipped == {"missing_caption": 2} and not stream.notes
        assert "2 bad samples skipped {'missing_caption': 2}" in epoch_line
    else:  # replaced by a good sample: every planned step still comes, with a full batch
        assert captions == {"s1": "caption 1", "s3": "caption 3"} and steps == 4
        assert stream.skipped["missing_caption"] >= 2 and set(stream.skipped) == {"missing_caption"}
        assert "bad samples skipped {'missing_caption'" in epoch_line


def test_make_sources_picks_folder_datasets_or_shards(tmp_path):
    a = _shards(tmp_path, "a", 1)
    assert len(make_sources(OmegaConf.create({"shards": a}))) == 1
    mixed = make_sources(OmegaConf.create({"datasets": [{"shards": a, "weight": 2}, {"shards": a}]}))
    assert [w for _, w in mixed] == [2.0, 1.0]
    with pytest.raises(ValueError, match=r"data.datasets\[1\].weight=0.0"):
        make_sources(OmegaConf.create({"datasets": [{"shards": a}, {"shards": a, "weight": 0}]}))
    folder_cfg = OmegaConf.create({"folder": {"root": str(_folder(tmp_path))}, "hint": {"on_the_fly": True}})
    assert [type(s).__name__ for s, _ in make_sources(folder_cfg)] == ["FolderSource"]
