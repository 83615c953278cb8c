"""Hugging Face datasets on disk: prep source (source=hf_dataset) and training source (data=hf_dataset),
for every layout (parquet, save_to_disk, DatasetDict, imagefolder), column names, and bounded reading."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

datasets = pytest.importorskip("datasets")

from nemo_controlnet.config import ConfigError, validate_prep_config, validate_train_config  # noqa: E402
from nemo_controlnet.data.datamodule import ShardDataModule  # noqa: E402
from nemo_controlnet.data.decode import BadSample  # noqa: E402
from nemo_controlnet.data.hf import HfDataset, HfSource  # noqa: E402
from nemo_controlnet.data.hints import Canny  # noqa: E402
from nemo_controlnet.prep.hf_source import HfDatasetSource  # noqa: E402
from nemo_controlnet.prep.job import run_prep  # noqa: E402
from nemo_controlnet.prep.writer import SkipLog  # noqa: E402
from tests.conftest import compose_train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


def picture(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    arr = np.full((SIZE, SIZE, 3), rng.integers(0, 80, 3), np.uint8)
    x, y = rng.integers(4, 30, 2)
    arr[y : y + 20, x : x + 24] = rng.integers(150, 255, 3)
    return arr


def conditioning(i: int) -> np.ndarray:
    return 255 - picture(i)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def fill50k(n: int, first: int = 0, names=("image", "conditioning_image", "text")) -> "datasets.Dataset":
    """The fill50k layout (image, conditioning_image, text) with the Image feature, rows first..first+n."""
    image, cond, text = names
    ds = datasets.Dataset.from_dict({
        image: [{"bytes": png(picture(i)), "path": None} for i in range(first, first + n)],
        cond: [{"bytes": png(conditioning(i)), "path": None} for i in range(first, first + n)],
        text: [f"caption {i}" for i in range(first, first + n)],
    })  # fmt: skip
    return ds.cast_column(image, datasets.Image()).cast_column(cond, datasets.Image())


def prep_cfg(*overrides: str):
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="prep", overrides=["workers=1", "source=hf_dataset", *overrides])
    OmegaConf.set_struct(cfg, False)
    return cfg


def read_out(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for shard in manifest["shards"]:
        for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False):
            samples[s["__key__"]] = s
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(samples)
    return samples


@pytest.fixture
def hub_parquet(tmp_path) -> Path:
    """A Hub-style parquet dataset: data/train-*.parquet (two files) and data/validation-*.parquet."""
    root = tmp_path / "fill50k"
    (root / "data").mkdir(parents=True)
    fill50k(3).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    fill50k(2, first=3).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    fill50k(2, first=10).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    return root


def check_given(samples: dict, rows) -> None:
    assert sorted(samples) == [f"{i:09d}" for i in range(len(rows))]
    for k, i in enumerate(rows):
        s = samples[f"{k:09d}"]
        assert s["txt"] == f"caption {i}".encode()
        assert np.array_equal(decode(s["png"]), conditioning(i))  # the conditioning image itself
        assert np.abs(decode(s["jpg"]).astype(int) - picture(i)).mean() < 4  # the image (as JPEG)


def test_fill50k_parquet_through_the_command_as_is(hub_parquet, tmp_path):
    out = tmp_path / "shards"
    args = [sys.executable, "-m", "nemo_controlnet.cli.prep", "source=hf_dataset", f"source.path={hub_parquet}",
            "hint=given", f"out_dir={out}", "shard_size=2", "workers=2"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = read_out(out)
    check_given(samples, range(5))  # the train split, over both files, in order
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 3  # units of 2 rows span files
    assert json.loads(samples["000000003"]["json"])["source"].endswith("train-00001-of-00002.parquet:0")


def test_parquet_split_and_canny_hints(hub_parquet, tmp_path):
    summary = run_prep(prep_cfg(f"source.path={hub_parquet}", "source.split=validation", f"out_dir={tmp_path / 'o'}"))
    assert summary["written"] == 2 and summary["complete"]
    samples = read_out(tmp_path / "o")
    for k, i in enumerate((10, 11)):
        s = samples[f"{k:09d}"]
        expected, params = Canny()(Image.fromarray(picture(i)))  # Canny of the image, not the conditioning
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), np.asarray(expected))
        assert json.loads(s["json"])["hint"] == params and s["txt"] == f"caption {i}".encode()
    with pytest.raises(ConfigError, match=r"source.split='test'.*splits: \['train', 'validation'\]"):
        HfDatasetSource(str(hub_parquet), split="test").units(10)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    fill50k(4).save_to_disk(str(tmp_path / "ds"))
    run_prep(prep_cfg(f"source.path={tmp_path / 'ds'}", "hint=given", f"out_dir={tmp_path / 'o1'}"))
    check_given(read_out(tmp_path / "o1"), range(4))
    datasets.DatasetDict({"train": fill50k(3), "validation": fill50k(2, first=20)}).save_to_disk(str(tmp_path / "dd"))
    run_prep(prep_cfg(f"source.path={tmp_path / 'dd'}", "source.split=validation", "hint=given",
                      f"out_dir={tmp_path / 'o2'}"))  # fmt: skip
    check_given(read_out(tmp_path / "o2"), (20, 21))
    with pytest.raises(ConfigError, match=r"source.split='test'.*splits: \['train', 'validation'\]"):
        HfDatasetSource(str(tmp_path / "dd"), split="test").units(10)


def test_imagefolder_with_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "folder"
    (root / "train").mkdir(parents=True)
    lines = []
    for i in range(3):
        Image.fromarray(picture(i)).save(root / "train" / f"{i}.png")
        Image.fromarray(conditioning(i)).save(root / "train" / f"c{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "conditioning_image_file_name": f"c{i}.png",
                                 "text": f"caption {i}"}))  # fmt: skip
    (root / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_prep(prep_cfg(f"source.path={root}", "hint=given", f"out_dir={tmp_path / 'o'}"))
    assert summary["written"] == 3
    samples = read_out(tmp_path / "o")
    check_given(samples, range(3))
    assert HfDataset(str(root)).layout == "imagefolder"


def test_custom_columns_and_a_wrong_column_names_the_columns(tmp_path):
    path = tmp_path / "custom.parquet"
    fill50k(3, names=("target", "source", "prompt")).to_parquet(str(path))
    run_prep(prep_cfg(f"source.path={path}", "source.image_column=target", "source.conditioning_image_column=source",
                      "source.caption_column=prompt", "hint=given", f"out_dir={tmp_path / 'o'}"))  # fmt: skip
    check_given(read_out(tmp_path / "o"), range(3))
    with pytest.raises(ConfigError, match=r"source.image_column='image'.*columns: \['target', 'source', 'prompt'\]"):
        run_prep(prep_cfg(f"source.path={path}", f"out_dir={tmp_path / 'o2'}"))
    with pytest.raises(ConfigError, match=r"source.caption_column='text'"):
        HfDatasetSource(str(path), image_column="target", conditioning_image_column=None).units(10)
    # No conditioning, no caption columns: Canny of the image, empty captions.
    run_prep(prep_cfg(f"source.path={path}", "source.image_column=target", "source.conditioning_image_column=null",
                      "source.caption_column=null", f"out_dir={tmp_path / 'o3'}"))  # fmt: skip
    s = read_out(tmp_path / "o3")["000000002"]
    assert s["txt"] == b"" and np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))),
                                              np.asarray(Canny()(Image.fromarray(picture(2)))[0]))  # fmt: skip
    with pytest.raises(ConfigError, match="hint=given.*conditioning_image_column=null"):
        validate_prep_config(prep_cfg(f"source.path={path}", "source.conditioning_image_column=null", "hint=given",
                                      f"out_dir={tmp_path / 'o4'}"))  # fmt: skip
    with pytest.raises(ConfigError, match="source.path=.*no such file"):
        validate_prep_config(prep_cfg(f"source.path={tmp_path / 'nothing'}", f"out_dir={tmp_path / 'o5'}"))


_POOLS = []  # memory pools stay alive until exit: buffers they allocated may outlive the test


def test_units_are_row_ranges_and_a_big_parquet_set_streams_in_bounded_memory(tmp_path):
    """48 rows of 512 KiB (24 MiB), written by datasets in row groups of 2 rows: reading every unit holds
    about a row group or two in Arrow memory (pyarrow reads a row group's column whole), never the set;
    reading the table whole does (the control: the pool sees the reader's memory)."""
    rows, cell = 48, 512 * 1024
    rng = np.random.default_rng(0)
    images = [rng.bytes(cell) for _ in range(rows)]
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": b, "path": None} for b in images],
        "conditioning_image": [{"bytes": b"c", "path": None}] * rows,
        "text": [f"row {i}" for i in range(rows)],
    }).cast_column("image", datasets.Image()).cast_column("conditioning_image", datasets.Image())  # fmt: skip
    path = tmp_path / "big.parquet"
    ds.to_parquet(str(path), batch_size=2)
    del ds
    assert pq.ParquetFile(path).metadata.num_row_groups == 24
    source = HfDatasetSource(str(path))
    units = source.units(5)
    assert [(u.start, u.stop) for u in units] == [(i, min(i + 5, rows)) for i in range(0, rows, 5)]
    assert units[1].pieces == ((str(path), 5, 10),)

    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    _POOLS.append(pool)
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        read = [(raw.key, raw.image, raw.caption) for u in units for raw in source.read(u)]
        source.dataset.close()
        streamed_peak = pool.max_memory()
        pq.read_table(path)
        whole_peak = pool.max_memory()
    finally:
        pa.set_memory_pool(previous)
    assert read == [(f"{i:09d}", images[i], f"row {i}") for i in range(rows)]
    assert streamed_peak <= 6 * 2**20, streamed_peak  # a few 1 MiB row groups, not 24 MiB
    assert whole_peak >= rows * cell


def test_a_file_gone_after_listing_is_a_counted_skip_not_a_crash(tmp_path):
    fill50k(4).to_parquet(str(tmp_path / "d.parquet"), batch_size=2)
    source = HfDatasetSource(str(tmp_path / "d.parquet"))
    unit = source.units(4)[0]
    (tmp_path / "d.parquet").unlink()
    (bad,) = list(source.read(unit))
    assert isinstance(bad, BadSample) and bad.reason == "unreadable_file" and "d.parquet" in bad.detail
    skips = SkipLog(unit)
    skips.add_bad(bad)
    assert skips.counts == {"unreadable_file": 1}


def test_training_config_checks(tmp_path):
    fill50k(2).to_parquet(str(tmp_path / "d.parquet"))
    base = ["data=hf_dataset", f"data.hf.path={tmp_path / 'd.parquet'}", f"run_dir={tmp_path / 'run'}"]
    validate_train_config(compose_train(base))
    with pytest.raises(ConfigError, match="data.hf.conditioning_image_column=null.*on_the_fly=true"):
        validate_train_config(compose_train([*base, "data.hf.conditioning_image_column=null"]))
    with pytest.raises(ConfigError, match=r"data.hf.image_colum: not a key.*did you mean data.hf.image_column\?"):
        validate_train_config(compose_train([*base, "+data.hf.image_colum=x"]))
    with pytest.raises(ConfigError, match="exactly one of data.shards, data.datasets, data.folder, data.hf"):
        validate_train_config(compose_train([*base, f"data.shards={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.hf.image_column='img'.*columns: \\['image', 'conditioning_image'"):
        HfSource(str(tmp_path / "d.parquet"), image_column="img")
    dm = ShardDataModule(compose_train([*base, "data.access=indexed"]).data, 3, 0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="parquet, read by row group; use data.access=stream"):
        dm.choose_access()
    dm = ShardDataModule(compose_train([*base, "data.num_workers=2"]).data, 3, 0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="1 row group"):
        dm.check_stream_readers()


def test_image_cells_as_paths_and_plain_bytes(tmp_path):
    """Not the Image feature: a column of paths (relative to the dataset) and one of bytes."""
    for i in range(2):
        (tmp_path / "ds" / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(i)).save(tmp_path / "ds" / "images" / f"{i}.png")
    table = pa.table({"file": ["images/0.png", "images/1.png"], "hint": [png(conditioning(i)) for i in range(2)],
                      "caption": [["caption 0", "other"], ["caption 1"]]})  # fmt: skip
    pq.write_table(table, tmp_path / "ds" / "train.parquet")
    dataset = HfDataset(str(tmp_path / "ds"), "train", "file", "hint", "caption")
    rows = list(dataset.read(dataset.ranges(10)[0].pieces))
    assert [(r.index, r.caption) for r in rows] == [(0, "caption 0"), (1, "caption 1")]
    assert np.array_equal(decode(rows[1].image), picture(1)) and rows[1].conditioning == png(conditioning(1))
    with pytest.raises(ConfigError, match=r"image_column='caption' holds list<.*not images"):
        HfDataset(str(tmp_path / "ds"), "train", "caption", "hint", None)


def first_batch(cfg) -> tuple[ShardDataModule, dict]:
    dm = ShardDataModule(cfg.data, 3, 0)
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_training_reads_the_dataset_directly(train_cfg, tmp_path, layout):
    path = tmp_path / "ds"
    if layout == "parquet":  # streamed by row group
        path.mkdir()
        fill50k(6).to_parquet(str(path / "train-00000-of-00001.parquet"), batch_size=2)
        extra = []
    else:  # indexed; no conditioning column: Canny on the fly, after augmentation
        fill50k(6).save_to_disk(str(path))
        extra = ["data.hf.conditioning_image_column=null", "data.hint.on_the_fly=true", "data.augment.hflip=0.5"]
    cfg = train_cfg(
        "data=hf_dataset", "data.shards=null", f"data.hf.path={path}", "data.resolution=64", "data.batch_size=2",
        "data.num_workers=0", "trainer.max_steps=2", "validation.num_samples=0", "checkpoint.every_n_steps=0", *extra,
    )  # fmt: skip
    dm, batch = first_batch(cfg)
    assert dm.access == ("stream" if layout == "parquet" else "indexed")
    for key, hint, image in zip(batch["key"], batch["hint"], batch["image"]):
        i = int(key)
        if layout == "parquet":  # the conditioning image, untouched (64 px: no resize, no crop)
            assert torch.equal(hint.permute(1, 2, 0), torch.from_numpy(conditioning(i)))
        else:
            edges = Canny()(image.permute(1, 2, 0).numpy())[0]
            assert torch.equal(hint[0], torch.from_numpy(np.array(edges)))
    from nemo_controlnet.training.run import train

    trainer, module = train(cfg)
    assert trainer.global_step == 2 and module.data_position == (0, 1)
