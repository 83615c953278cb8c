"""One hint decode for every path: a training batch, validation samples, evaluation and generation
see the same tensor for every PNG mode (alpha, palette, 1-bit, 16-bit)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from nemo_controlnet.data.datamodule import ShardDataModule, held_out, validation_samples
from nemo_controlnet.data.transforms import normalize_batch
from nemo_controlnet.inference.generate import load_hints
from tests.conftest import compose_train

H, W, SIZE = 40, 48, 32  # not square: the center crop and resize both act
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]


def _pattern() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:H, :W]
    gray = ((xx * 5 + yy * 3) % 200 + 40).astype(np.uint8)  # never 0: a black result means "transparent"
    rgb = np.stack([gray, 255 - gray, ((xx * 11) % 200 + 40).astype(np.uint8)], -1)
    alpha = np.where(xx < W // 2, 255, 0).astype(np.uint8)  # right half transparent
    return gray, rgb, alpha


def png(mode: str) -> bytes:
    gray, rgb, alpha = _pattern()
    if mode == "1":
        image = Image.fromarray(gray > 120).convert("1")
    elif mode == "L":
        image = Image.fromarray(gray)
    elif mode == "LA":
        image = Image.fromarray(np.stack([gray, alpha], -1))
    elif mode == "P":  # a palette with a transparent entry, used by the right half
        image = Image.fromarray(rgb).quantize(15)
        arr = np.asarray(image).copy()
        arr[:, W // 2 :] = 15
        image = Image.frombytes("P", (W, H), arr.tobytes())
        image.putpalette(Image.fromarray(rgb).quantize(15).getpalette()[: 15 * 3] + [250, 250, 250])
        image.info["transparency"] = 15
    elif mode == "RGB":
        image = Image.fromarray(rgb)
    elif mode == "RGBA":
        image = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1))
    else:  # I;16: a 16-bit grey hint, e.g. a depth map
        image = Image.fromarray(gray.astype(np.uint16) * 150)
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=image.info.get("transparency"))
    out = buf.getvalue()
    assert Image.open(io.BytesIO(out)).mode == mode
    return out


def _image_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pattern()[1]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hint_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per mode: the hint file, and a one-sample shard of image + that hint."""
    root = tmp_path_factory.mktemp("modes")
    out = {}
    for mode in MODES:
        name = mode.replace(";", "")
        hint = root / f"{name}.png"
        hint.write_bytes(png(mode))
        shards = root / name
        shards.mkdir()
        with wds.TarWriter(str(shards / "000000.tar")) as sink:
            sink.write({"__key__": "s", "jpg": _image_bytes(), "png": hint.read_bytes(), "txt": b"a caption"})
        out[mode] = (hint, shards)
    return out


def _cfg(shards: Path, *overrides: str):
    cfg = compose_train([f"data.shards={shards}", f"data.resolution={SIZE}", "data.num_workers=0",
                         "data.batch_size=1", "data.shuffle_buffer=0", *overrides])  # fmt: skip
    OmegaConf.set_struct(cfg, False)
    return cfg


def training_hint(shards: Path, *overrides: str) -> torch.Tensor:
    """The hint of the first batch of the training loader, normalized as the model gets it."""
    cfg = _cfg(shards, *overrides)
    datamodule = ShardDataModule(cfg.data, 3, 0)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return normalize_batch(batch)["hint"][0]


@pytest.mark.parametrize("mode", MODES)
def test_every_path_decodes_a_hint_alike(mode, hint_files):
    hint_path, shards = hint_files[mode]
    cfg = _cfg(shards)
    train = training_hint(shards)
    validation_file = validation_samples(
        OmegaConf.create({"samples": [{"prompt": "p", "hint": str(hint_path)}]}), cfg.data, 3
    )[1][0]
    from_shards = OmegaConf.create({"shards": str(shards), "num_samples": 1})
    validation_shards = validation_samples(from_shards, cfg.data, 3)[1][0]
    evaluation = held_out(shards, cfg.data, 3, 1, resolution=SIZE)[1][0]  # what controlnet-eval scores against
    generation = load_hints(OmegaConf.create({"hints": [str(hint_path)], "images": [], "hint": None}), SIZE, 3)[0]
    assert train.shape == (3, SIZE, SIZE) and train.dtype == torch.float32
    for name, other in [("validation.samples", validation_file), ("validation shards", validation_shards),
                        ("controlnet-eval", evaluation), ("controlnet-generate", generation)]:  # fmt: skip
        assert torch.equal(train, other), f"{mode}: {name} differs from training by {(train - other).abs().max()}"
    assert 0 <= train.min() and train.max() <= 1


def test_transparent_hint_pixels_are_black_and_16_bit_keeps_its_scale(hint_files):
    for mode in ("LA", "RGBA", "P"):
        hint = training_hint(hint_files[mode][1])
        right = hint[:, :, SIZE // 2 + 3 :]  # well inside the transparent half after the crop
        left = hint[:, :, : SIZE // 2 - 3]
        assert right.max() == 0, f"{mode}: transparent hint pixels must be black (no signal)"
        assert left.min() > 0, f"{mode}: opaque pixels keep their values"
    deep = Image.fromarray(np.full((H, W), 30000, np.uint16))
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    path = hint_files["L"][0].parent / "deep.png"
    path.write_bytes(buf.getvalue())
    hint = load_hints(OmegaConf.create({"hints": [str(path)], "images": [], "hint": None}), SIZE, 3)[0]
    assert torch.allclose(hint, torch.full_like(hint, (30000 // 256) / 255))  # 0.459, not clipped to 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "I;16", "P"])
def test_generation_from_images_computes_the_hint_as_training_on_the_fly(mode, hint_files, tmp_path):
    """images=[...] hint=canny equals the training loader's on-the-fly Canny of the same image."""
    image = tmp_path / "image.png"
    image.write_bytes(png(mode))
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "000000.tar")) as sink:
        sink.write({"__key__": "s", "jpg": image.read_bytes(), "txt": b"a caption"})
    train = training_hint(shards, "data.hint.on_the_fly=true", "data.hint.detector.low_threshold=20",
                          "data.hint.detector.high_threshold=60")  # fmt: skip
    canny = {"_target_": "nemo_controlnet.data.hints.Canny", "low_threshold": 20, "high_threshold": 60}
    generation = load_hints(OmegaConf.create({"hints": [], "images": [str(image)], "hint": canny}), SIZE, 3)[0]
    assert train.max() == 1, "the test image has edges"
    assert torch.equal(train, generation)
