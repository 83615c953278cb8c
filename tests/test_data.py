"""Synthetic shards, the loader's batch contract, deterministic resumable streams, splits, bad data."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from nemo_controlnet.prep.synthetic import circle_params, render, write_shapes_dataset
from nemo_controlnet.data.transforms import ResizeCrop, normalize_batch, normalize_hint, prepare_hint
from nemo_controlnet.data.webdataset import EpochStream, SampleDecoder, batches, epoch_pipeline, expand_shards

DECODER = SampleDecoder(64, "jpg", "png", "txt", hint_channels=3)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _read_members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_synthetic_samples_match_their_ground_truth(shapes_dir):
    members = _read_members(shapes_dir / "train" / "shapes-000000.tar")
    params = json.loads(members["00000003.json"])
    image = np.asarray(Image.open(io.BytesIO(members["00000003.jpg"])).convert("RGB")).astype(int)
    hint = np.asarray(Image.open(io.BytesIO(members["00000003.png"])).convert("L"))
    caption = members["00000003.txt"].decode()
    assert caption == f"{params['circle_color']} circle with {params['background_color']} background"
    assert params["circle_color"] != params["background_color"]
    cx, cy, r = params["cx"], params["cy"], params["radius"]
    assert np.abs(image[cy, cx] - params["circle_rgb"]).max() < 20
    corner = (0, 0) if np.hypot(cx, cy) > r + 2 else (63, 63)
    assert np.abs(image[corner] - params["background_rgb"]).max() < 20
    ys, xs = np.nonzero(hint > 127)
    dist = np.hypot(xs - cx, ys - cy)
    assert len(dist) > 4 * r and np.abs(dist - r).max() <= 1.5  # a thin outline exactly at the radius
    assert hint[cy, cx] == 0  # outline only, not filled


def test_synthetic_dataset_is_deterministic_and_idempotent(tmp_path):
    a = write_shapes_dataset(tmp_path / "a", num_samples=10, shard_size=4, resolution=32, seed=3)
    b = write_shapes_dataset(tmp_path / "b", num_samples=10, shard_size=5, resolution=32, seed=3)
    sa = {s["__key__"]: s for s in wds.WebDataset(expand_shards(a), shardshuffle=False)}
    sb = {s["__key__"]: s for s in wds.WebDataset(expand_shards(b), shardshuffle=False)}
    assert sorted(sa) == sorted(sb) and len(sa) == 10
    for key in sa:  # the same samples however the set is sharded
        assert sa[key]["png"] == sb[key]["png"] and sa[key]["txt"] == sb[key]["txt"]
    manifest = json.loads((a / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 2]
    mtimes = {p: p.stat().st_mtime_ns for p in a.glob("*.tar")}
    write_shapes_dataset(tmp_path / "a", num_samples=10, shard_size=4, resolution=32, seed=3)
    assert {p: p.stat().st_mtime_ns for p in a.glob("*.tar")} == mtimes  # nothing rewritten
    assert circle_params(3, 5, 32) != circle_params(4, 5, 32)


def test_interrupted_synthetic_write_is_redone(tmp_path):
    out = write_shapes_dataset(tmp_path / "d", num_samples=8, shard_size=4, resolution=32)
    (out / "manifest.json").unlink()  # as if killed before the manifest was written
    (out / "shapes-000001.tar").write_bytes(b"partial")
    write_shapes_dataset(out, num_samples=8, shard_size=4, resolution=32)
    assert len(list(wds.WebDataset(str(out / "shapes-000001.tar"), shardshuffle=False))) == 4
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_batches_follow_the_contract(shapes_dir):
    urls = expand_shards(shapes_dir / "train")
    batch = next(iter(epoch_pipeline(urls, DECODER, batch_size=4, epoch=0)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["hint"].shape == (4, 3, 64, 64) and batch["hint"].dtype == torch.uint8
    batch = normalize_batch(batch)  # what the model gets, after the transfer to its device
    assert batch["image"].dtype == batch["hint"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].min() < -0.5
    assert batch["hint"].min() == 0.0 and batch["hint"].max() == 1.0  # [0, 1], white outline on black
    assert all(c.endswith("background") for c in batch["caption"]) and len(batch["key"]) == 4


def test_hint_channel_order_and_grayscale_hints(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[10, 20] = (255, 0, 0)  # pure red: channel 0 in RGB order
    gray = np.zeros((64, 64), np.uint8)
    gray[5, 6] = 255
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "rgb", "jpg": _jpg(image), "png": _png(hint), "txt": "x"})
        sink.write({"__key__": "gray", "jpg": _jpg(image), "png": _png(gray), "txt": "y"})
    batch = next(iter(epoch_pipeline([str(tmp_path / "s.tar")], DECODER, 2, 0, shuffle_buffer=0)))
    rgb, g = normalize_hint(batch["hint"][0]), normalize_hint(batch["hint"][1])
    assert rgb[:, 10, 20].tolist() == [1.0, 0.0, 0.0]
    assert g.shape[0] == 3 and g[:, 5, 6].tolist() == [1.0, 1.0, 1.0]  # grayscale replicated to RGB
    one = SampleDecoder(64, "jpg", "png", "txt", hint_channels=1)
    sample = one({"__key__": "g", "jpg": _jpg(image), "png": _png(gray), "txt": b"y"})
    assert sample["hint"].shape == (1, 64, 64) and sample["hint"][0, 5, 6] == 255


def test_paired_resize_crop_keeps_image_and_hint_aligned():
    # A 96x64 image with a vertical edge at x=60: after resize to 64 short side and center crop,
    # the edge must sit at the same column in image and hint.
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, 60:] = 255
    hint = np.zeros((64, 96, 3), np.uint8)
    hint[:, 60] = 255
    geometry = ResizeCrop.center(96, 64, 64)  # drawn once, applied to both
    img, h = geometry.apply(Image.fromarray(image), "image"), geometry.apply(Image.fromarray(hint), "hint")
    assert img.size == h.size == (64, 64)
    edge_img = int(np.argmax(np.asarray(img)[32, :, 0] > 127))
    edge_hint = int(np.argmax(np.asarray(h)[32, :, 0]))
    assert edge_img == 60 - 16 and abs(edge_hint - edge_img) <= 1
    assert torch.equal(
        prepare_hint(Image.fromarray(hint), 64), torch.from_numpy(np.asarray(h) / 255.0).permute(2, 0, 1).float()
    )


def _keys(stream, n):
    out = []
    for batch, _ in zip(stream, range(n)):
        out.append((batch["data_position"], tuple(batch["key"])))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_neither_replays_nor_skips(shapes_dir, workers):
    urls = expand_shards(shapes_dir / "train")

    def make(epoch, first=0):
        pipeline = epoch_pipeline(urls, DECODER, batch_size=4, epoch=epoch, seed=5, shuffle_buffer=16)
        return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers)

    full = _keys(EpochStream(make), 24)  # 16 batches an epoch: crosses into epoch 1
    assert full[15][0] == (0, 15) and full[16][0] == (1, 0)
    epoch0 = sorted(k for _, keys in full[:16] for k in keys)
    assert epoch0 == sorted(f"{i:08d}" for i in range(64))  # every sample once an epoch
    assert [k for _, k in full[:8]] != [k for _, k in full[16:24]]  # epoch 1 is another order
    resumed = _keys(EpochStream(make, start=(0, 9)), 14)
    assert resumed == full[10:24]


def test_ranks_read_disjoint_shards_covering_all(shapes_dir, monkeypatch):
    urls = expand_shards(shapes_dir / "train")
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({k for b in batches(epoch_pipeline(urls, DECODER, 4, epoch=0, seed=1)) for k in b["key"]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"{i:08d}" for i in range(64)}


def test_bad_samples_are_skipped_and_logged(tmp_path, caplog):
    good = _jpg(np.zeros((64, 64, 3), np.uint8))
    hint = _png(np.zeros((64, 64, 3), np.uint8))
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "ok1", "jpg": good, "png": hint, "txt": "a"})
        sink.write({"__key__": "nohint", "jpg": good, "txt": "b"})
        sink.write({"__key__": "corrupt", "jpg": good[:40], "png": hint, "txt": "c"})
        sink.write({"__key__": "ok2", "jpg": good, "png": hint, "txt": "d"})
    with caplog.at_level(logging.WARNING):
        out = list(batches(epoch_pipeline([str(tmp_path / "bad.tar")], DECODER, 1, 0, shuffle_buffer=0)))
    assert [b["key"][0] for b in out] == ["ok1", "ok2"]
    text = caplog.text
    assert "nohint" in text and "missing_hint" in text and "bad.tar:corrupt" in text and "corrupt_image" in text


def test_expand_shards_forms_and_errors(shapes_dir, tmp_path):
    train = shapes_dir / "train"
    from_dir = expand_shards(train)
    assert len(from_dir) == 4
    assert expand_shards(str(train / "shapes-{000000..000003}.tar")) == from_dir
    assert expand_shards(train / "manifest.json") == from_dir
    assert expand_shards([from_dir[0], from_dir[2]]) == [from_dir[0], from_dir[2]]
    with pytest.raises(FileNotFoundError, match=r"2 shard\(s\) not found, first: .*shapes-000008.tar"):
        expand_shards(str(train / "shapes-{000008..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        expand_shards(tmp_path)


def test_render_is_pure():
    params = circle_params(0, 1, 64)
    a, b = render(params), render(params)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_an_epoch_without_a_full_batch_fails_instead_of_spinning(shapes_dir):
    urls = expand_shards(shapes_dir / "val")  # 4 samples

    def make(epoch, first=0):
        return epoch_pipeline(urls, DECODER, batch_size=8, epoch=epoch)

    with pytest.raises(RuntimeError, match="produced no batch"):
        next(iter(EpochStream(make)))


def test_too_few_shards_for_ranks_and_workers_is_an_error(shapes_dir):
    from omegaconf import OmegaConf

    from nemo_controlnet.data.datamodule import ShardDataModule

    cfg = OmegaConf.create(
        {
            "shards": str(shapes_dir / "train"),
            "num_workers": 8,
            "resolution": 64,
            "batch_size": 4,
            "shuffle_buffer": 0,
            "image_key": "jpg",
            "hint_key": "png",
            "caption_key": "txt",
            "access": "stream",  # indexed access hands batches, not shards, to workers: no minimum
        }
    )
    dm = ShardDataModule(cfg, hint_channels=3, seed=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"4 shard\(s\) for 1 rank\(s\) x 8 worker\(s\); need at least 8"):
        dm.train_dataloader()
