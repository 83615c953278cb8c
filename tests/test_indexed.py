"""Indexed access: shard indexes, planned epochs, O(1) resume, aspect buckets with SDXL
micro-conditioning, same-bucket batches on every rank."""

import os
import random
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

from nemo_controlnet.data.datamodule import ShardDataModule
from nemo_controlnet.data.indexed import (
    INDEX_SUFFIX,
    IndexedStream,
    SampleTable,
    ShardSet,
    assign_buckets,
    make_buckets,
    plan_epoch,
    shard_index,
)
from nemo_controlnet.data.tarshards import read_shard
from nemo_controlnet.data.webdataset import EpochStream, SampleDecoder
from tests.test_loader import cut_in_member, near, png


def box_image(width: int, height: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright box, and the box's outline as its hint (white on black)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    x0, y0 = int(rng.integers(4, width // 3)), int(rng.integers(4, height // 3))
    x1, y1 = int(rng.integers(2 * width // 3, width - 4)), int(rng.integers(2 * height // 3, height - 4))
    img[y0:y1, x0:x1] = 230
    hint = np.zeros((height, width), np.uint8)
    hint[y0, x0:x1] = hint[y1 - 1, x0:x1] = hint[y0:y1, x0] = hint[y0:y1, x1 - 1] = 255
    return img, hint


def write_shards(tmp_path: Path, name: str, sizes: list[list[tuple[int, int]]]) -> list[str]:
    """One shard per inner list; each sample an image of that (width, height) with its hint."""
    urls = []
    for s, shard in enumerate(sizes):
        url = str(tmp_path / f"{name}-{s:03d}.tar")
        with wds.TarWriter(url) as sink:
            for j, (w, h) in enumerate(shard):
                img, hint = box_image(w, h, seed=s * 1000 + j)
                sink.write({"__key__": f"{name}{s}_{j:03d}", "jpg": png(img), "png": png(hint), "txt": f"{w}x{h}"})
        urls.append(url)
    return urls


class CountingDecoder(SampleDecoder):
    """A decoder that counts the samples it decodes (in this process)."""

    calls = 0

    def __call__(self, sample):
        CountingDecoder.calls += 1
        return super().__call__(sample)


def test_the_index_reads_every_sample_as_the_stream_does(tmp_path):
    url = write_shards(tmp_path, "a", [[(48, 32), (32, 48), (40, 40)] * 3])[0]
    index, built = shard_index(url, "jpg")
    assert built and Path(url + INDEX_SUFFIX).is_file()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]  # written by rename
    assert (Path(url + INDEX_SUFFIX).stat().st_mode & 0o777) == (0o666 & ~_umask())
    assert index.image_sizes.tolist() == [[48, 32], [32, 48], [40, 40]] * 3
    table = ShardSet([url], "jpg")
    streamed = list(read_shard(url))
    assert len(table) == len(streamed) == 9
    for i, expected in enumerate(streamed):
        got = table.sample(i)
        assert got == expected, i
    again, built = shard_index(url, "jpg")
    assert not built and again.keys.tolist() == index.keys.tolist()
    # A shard rewritten in place is indexed again: a stale index would read the wrong bytes.
    write_shards(tmp_path, "a", [[(40, 40)] * 4])
    os.utime(url, ns=(1, 1))
    fresh, built = shard_index(url, "jpg")
    assert built and len(fresh) == 4


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_truncated_shard_indexes_its_complete_samples(tmp_path):
    url = write_shards(tmp_path, "t", [[(32, 32)] * 6])[0]
    cut = cut_in_member(url, 10)  # inside sample 3 (three members each)
    index, _ = shard_index(url, "jpg")
    assert [str(k) for k in index.keys] == [f"t0_{j:03d}" for j in range(3)]
    assert index.error and cut.startswith("t0_003")


def test_a_read_only_shard_directory_keeps_its_index_in_the_cache(tmp_path, monkeypatch):
    data = tmp_path / "ro"
    data.mkdir()
    url = write_shards(data, "r", [[(32, 32)] * 3])[0]
    if os.geteuid() == 0:  # root writes anywhere: a directory where the index would go blocks it instead
        Path(url + INDEX_SUFFIX).mkdir()
    data.chmod(0o555)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        _, built = shard_index(url, "jpg")
        assert built and len(list((tmp_path / "cache").rglob("*" + INDEX_SUFFIX))) == 1
        assert not list(data.glob("*tmp*")) and not list(data.glob(".*tmp*"))
        _, built = shard_index(url, "jpg")
        assert not built
    finally:
        data.chmod(0o755)


def test_buckets_are_sdxl_like_and_images_go_to_the_nearest_aspect():
    buckets = make_buckets(1024, 64, 2.0)
    assert (1024, 1024) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 and max(w / h, h / w) <= 2.0
        assert w * h > 1024 * 1024 - 64 * max(w, h)  # as large as the step allows
    assert (832, 1216) in buckets and (1216, 832) in buckets  # two of SDXL's published buckets
    sizes = np.array([[1920, 1080], [1080, 1920], [500, 500], [0, 0], [4000, 100]])
    chosen = [buckets[b] for b in assign_buckets(sizes, buckets)]
    assert chosen[2] == (1024, 1024) and chosen[3] == (1024, 1024)  # unknown size: the square one
    assert chosen[0][0] > chosen[0][1] and chosen[1][0] < chosen[1][1]
    assert abs(np.log(chosen[0][0] / chosen[0][1]) - np.log(1920 / 1080)) < 0.1
    assert chosen[4] == max(buckets, key=lambda b: b[0] / b[1])  # beyond max_aspect: the widest, cropped
    with pytest.raises(ValueError, match="must divide"):
        make_buckets(1000, 64, 2.0)


def _table(urls: list[str]) -> SampleTable:
    return SampleTable.of([ShardSet(urls, "jpg")], [1.0])


def test_an_epoch_plan_covers_the_data_once_in_one_bucket_per_batch(tmp_path):
    sizes = [[(64, 32)] * 7 + [(32, 64)] * 5 + [(48, 48)] * 9, [(64, 32)] * 6 + [(48, 48)] * 4]
    table = _table(write_shards(tmp_path, "p", sizes))
    buckets = make_buckets(48, 16, 2.0)
    bucket_of = assign_buckets(table.image_sizes, buckets)
    plan = plan_epoch(table, bucket_of, len(buckets), 4, seed=3, epoch=0)
    ids = plan.batches.ravel()
    assert len(set(ids.tolist())) == len(ids)  # no sample twice in an epoch
    assert len(ids) + plan.left_over == len(table)
    assert plan.left_over < 4 * len(buckets)  # at most a partial global batch per bucket
    for row, b in zip(plan.batches, plan.bucket):
        assert set(bucket_of[row].tolist()) == {b}
    same = plan_epoch(table, bucket_of, len(buckets), 4, seed=3, epoch=0)
    assert np.array_equal(same.batches, plan.batches)  # a pure function of (data, seed, epoch)
    other = plan_epoch(table, bucket_of, len(buckets), 4, seed=3, epoch=1)
    assert not np.array_equal(other.batches, plan.batches)
    drawn = plan_epoch(table, bucket_of, len(buckets), 4, seed=3, epoch=0, samples_per_epoch=40)
    assert drawn.batches.size + drawn.left_over == 40  # resampled: draws with replacement


def _stream_keys(stream, n):
    return [(b["data_position"], tuple(b["key"]), b["image"].sum().item()) for _, b in zip(range(n), stream)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_seeks_without_decoding_what_came_before(tmp_path, workers):
    table = _table(write_shards(tmp_path, "s", [[(40, 32)] * 12, [(32, 40)] * 12, [(36, 36)] * 12]))
    decoder = CountingDecoder(32, crop="random", hflip=0.5, seed=1)

    def make(epoch, first=0, num_workers=workers):
        stream = IndexedStream(table, decoder, 3, epoch, seed=4, buckets=None,
                               bucket_of=np.zeros(len(table), np.int32), first=first)  # fmt: skip
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)

    full = _stream_keys(EpochStream(make), 20)  # 12 batches an epoch: into epoch 1
    assert full[11][0] == (0, 11) and full[12][0] == (1, 0)
    assert sorted(k for _, keys, _ in full[:12] for k in keys) == sorted(str(k) for k in table.sources[0].keys)
    CountingDecoder.calls = 0
    resumed = _stream_keys(EpochStream(make, start=(0, 8)), 8)
    assert resumed == full[9:17]
    if workers == 0:  # decoded in this process: only what the resumed batches hold
        assert CountingDecoder.calls == 8 * 3
    # The order does not depend on the number of loader workers.
    other = _stream_keys(EpochStream(lambda e, first=0: make(e, first, 1 if workers else 2), start=(0, 8)), 8)
    assert other == full[9:17]


def test_bad_samples_are_replaced_so_batches_stay_full(tmp_path):
    url = str(tmp_path / "bad.tar")
    img, hint = box_image(32, 32, 0)
    with wds.TarWriter(url) as sink:
        for j in range(8):
            sample = {"__key__": f"k{j}", "jpg": png(img), "png": png(hint), "txt": "x"}
            if j == 2:
                sample["jpg"] = b"\xff\xd8garbage"
            if j == 5:
                del sample["png"]
            sink.write(sample)
    table = _table([url])
    stream = IndexedStream(table, SampleDecoder(32), 4, 0, seed=0, buckets=None,
                           bucket_of=np.zeros(len(table), np.int32))  # fmt: skip
    out = list(stream)
    full = [b for b in out if "key" in b]
    assert [len(b["key"]) for b in full] == [4, 4]
    keys = [k for b in full for k in b["key"]]
    assert "k2" not in keys and "k5" not in keys
    skipped = out[-1]["data_stats"]["skipped"]
    assert skipped.get("corrupt_image", 0) >= 1 and skipped.get("missing_hint", 0) >= 1


def _aligned(batch: dict, i: int) -> bool:
    img = batch["image"][i].permute(1, 2, 0).numpy()
    edges = cv2.Canny(np.ascontiguousarray(img), 100, 200)
    hint = (batch["hint"][i, 0].numpy() > 76).astype(np.uint8)
    return near(hint, edges, tolerance=2) > 0.9 and near(edges, hint, tolerance=2) > 0.9


def test_bucketed_batches_keep_image_and_hint_aligned_with_sdxl_conditioning(tmp_path, monkeypatch):
    """Two ranks, random crops and flips: every step both ranks hold one bucket's shape; each image's
    hint stays on its edges; original size and crop corner describe the crop made."""
    from nemo_controlnet.models.families.sd_unet import SDUNetFamily

    rng = random.Random(0)
    sizes = [[(rng.choice([96, 64, 40]), rng.choice([96, 64, 40])) for _ in range(16)] for _ in range(3)]
    urls = write_shards(tmp_path, "b", sizes)
    truth = {f"b{s}_{j:03d}": wh for s, shard in enumerate(sizes) for j, wh in enumerate(shard)}
    cfg = OmegaConf.create({"shards": urls, "num_workers": 0, "resolution": 48, "batch_size": 2, "shuffle_buffer": 0,
                            "image_key": "jpg", "hint_key": "png", "caption_key": "txt",
                            "augment": {"crop": "random", "hflip": 0.5},
                            "buckets": {"enabled": True, "step": 16, "max_aspect": 2.0}})  # fmt: skip
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = ShardDataModule(cfg, hint_channels=3, seed=0)
        dm.setup("fit")
        stream = dm.train_dataloader()
        per_rank.append([b for b, _ in zip(stream, range(8))])
    buckets = make_buckets(48, 16, 2.0)
    shapes = set()
    for a, b in zip(*per_rank):
        assert a["data_position"] == b["data_position"]
        assert a["image"].shape == b["image"].shape  # the same bucket on both ranks
        assert not set(a["key"]) & set(b["key"])
        h, w = a["image"].shape[-2:]
        assert (w, h) in buckets
        shapes.add((w, h))
        for batch in (a, b):
            assert batch["hint"].shape[-2:] == (h, w)
            for i, key in enumerate(batch["key"]):
                ow, oh = truth[key]
                assert batch["original_size"][i].tolist() == [oh, ow]
                scale = max(w / ow, h / oh)
                top, left = batch["crop_top_left"][i].tolist()
                assert 0 <= top <= round(oh * scale) - h and 0 <= left <= round(ow * scale) - w
                assert _aligned(batch, i), key
            time_ids = SDUNetFamily().micro_conditioning(None, batch, torch.zeros(len(batch["key"]), 4))["time_ids"]
            assert time_ids[:, 4:].tolist() == [[h, w]] * len(batch["key"])  # the bucket is the target size
            assert time_ids[:, :2].tolist() == batch["original_size"].tolist()
    assert len(shapes) > 1  # more than one bucket was trained


def test_access_is_chosen_and_checked(tmp_path):
    urls = write_shards(tmp_path, "c", [[(32, 32)] * 4])
    base = {"shards": urls, "num_workers": 0, "resolution": 32, "batch_size": 2, "shuffle_buffer": 0,
            "image_key": "jpg", "hint_key": "png", "caption_key": "txt"}  # fmt: skip

    def dm(resume=None, cached=False, **extra):
        module = ShardDataModule(OmegaConf.create({**base, **extra}), hint_channels=3, seed=0, cached=cached)
        module.setup("fit")
        if resume is not None:
            module.load_state_dict(resume)
        return module

    assert dm().choose_access() == "indexed"
    assert dm(access="stream").choose_access() == "stream"
    # A checkpoint from before indexed access resumes in its own (streamed) order.
    assert dm({"data_position": [0, 1]}).choose_access() == "stream"
    assert dm({"data_position": [0, 1], "data_access": "indexed"}).choose_access() == "indexed"
    with pytest.raises(ValueError, match="trained with data.access=indexed: resume with data.access=indexed"):
        dm({"data_position": [0, 1], "data_access": "indexed"}, access="stream").choose_access()
    with pytest.raises(ValueError, match="data.buckets.enabled=true needs indexed access"):
        dm(access="stream", buckets={"enabled": True}).choose_access()
    with pytest.raises(ValueError, match="cannot use cached latents"):
        dm(cached=True, buckets={"enabled": True}).choose_access()
    with pytest.raises(ValueError, match="data.access='sideways'"):
        dm(access="sideways").choose_access()
    module = dm()
    module.train_dataloader()
    assert module.state_dict()["data_access"] == "indexed"


def test_a_tar_member_count_does_not_matter_to_the_index(tmp_path):
    """Samples without an optional member (no caption) and with extra ones (json) index and read back."""
    url = str(tmp_path / "m.tar")
    img, hint = box_image(32, 32, 1)
    with wds.TarWriter(url) as sink:
        sink.write({"__key__": "a", "jpg": png(img), "png": png(hint)})
        sink.write({"__key__": "b", "jpg": png(img), "png": png(hint), "txt": "b", "json": b'{"x": 1}'})
    table = ShardSet([url], "jpg")
    assert set(table.sample(0)) == {"__key__", "__url__", "jpg", "png"}
    assert table.sample(1)["json"] == b'{"x": 1}' and table.sample(1)["txt"] == b"b"
    with tarfile.open(url) as tar:
        assert len(tar.getmembers()) == 6


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_header_walk_agrees_with_tarfile_on_every_format(fmt):
    """Long and non-ASCII names (pax records, GNU long names, the ustar prefix) and pax sizes."""
    import io

    from nemo_controlnet.data.indexed import TarWalkError, walk_tar

    names = ["p" * 120 + "/k1.jpg", "k1.txt"] if fmt == tarfile.USTAR_FORMAT else \
        ["a" * 150 + "/k1.jpg", "dir/k1.txt", "ü/k2.jpg", "k3.txt"]  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 300 + 700 * i, 1.5e9 + 0.25  # a float mtime: pax records, as TarWriter writes
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
        directory = tarfile.TarInfo("a-directory")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]
    assert list(walk_tar(io.BytesIO(raw), len(raw))) == expected and len(expected) == len(names)
    damaged = bytearray(raw)
    damaged[expected[-1][1] - 512 + 10] ^= 0xFF  # a byte of the last member's header
    with pytest.raises(TarWalkError, match="checksum"):
        list(walk_tar(io.BytesIO(bytes(damaged)), len(damaged)))
    with pytest.raises(TarWalkError, match="cut short"):
        list(walk_tar(io.BytesIO(raw[: expected[-1][1] + 10]), expected[-1][1] + 10))


def test_image_sizes_from_headers_match_pil():
    import io

    from PIL import Image

    from nemo_controlnet.data.indexed import image_size

    for fmt, modes, extra in [("JPEG", ["RGB", "L", "CMYK"], {"progressive": True}), ("PNG", ["RGB", "LA", "P"], {}),
                              ("WEBP", ["RGB"], {}), ("BMP", ["RGB"], {})]:  # fmt: skip
        for mode in modes:
            buf = io.BytesIO()
            image = Image.new(mode, (37, 23))
            image.save(buf, format=fmt, **extra)
            assert image_size(buf.getvalue()) == (37, 23), (fmt, mode)
    exif = io.BytesIO()
    tags = Image.Exif()
    tags[0x010F] = "x" * 3000  # a long maker name: a large APP1 segment before the frame header
    Image.new("RGB", (640, 480)).save(exif, format="JPEG", exif=tags)
    assert image_size(exif.getvalue()) == (640, 480)  # the frame header after an APP1 segment
    assert image_size(b"not an image") == (0, 0)


def test_a_large_set_loads_one_joined_index_until_a_shard_changes(tmp_path, monkeypatch):
    import nemo_controlnet.data.indexed as indexed

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(indexed, "SET_CACHE_MIN_SHARDS", 2)
    urls = write_shards(tmp_path, "j", [[(32, 32)] * 3, [(40, 32)] * 2, [(32, 40)] * 4])
    first = ShardSet(urls, "jpg")
    assert len(list((tmp_path / "cache").glob("*/*/set-*.npz"))) == 1

    def not_again(*args, **kwargs):
        raise AssertionError("the shards' own indexes were read although the joined one is current")

    monkeypatch.setattr(indexed, "index_shards", not_again)
    again = ShardSet(urls, "jpg")
    assert again.keys.tolist() == first.keys.tolist() and np.array_equal(again.offsets, first.offsets)
    assert again.sample(7) == first.sample(7)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(indexed, "SET_CACHE_MIN_SHARDS", 2)
    write_shards(tmp_path, "j", [[(48, 48)] * 6])  # shard 0 rewritten: the joined index is stale
    changed = ShardSet(urls, "jpg")
    assert len(changed) == 6 + 2 + 4 and changed.image_sizes[0].tolist() == [48, 48]
