"""The loader's fast paths give what the slow ones gave: libjpeg-turbo and libpng decodes with PIL's
pixels (PIL still judges and converts every other file), DCT-reduced decoding only where PIL's draft
used it, crop-then-resize keeping image and hint on one geometry, OpenCV's colour Canny bit for bit,
and batches that stay uint8 and go to the main process through shared memory."""

import io
import random
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import nemo_controlnet.data.decode as decode
from nemo_controlnet.data.decode import BadSample, draft_scale, load_array, load_hint, load_hint_array, load_image
from nemo_controlnet.data.hints import Canny, canny
from nemo_controlnet.data.transforms import ResizeCrop, to_uint8_chw
from nemo_controlnet.data.webdataset import collate
from tests.test_loader import near


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Gradients, discs and noise: edges in every channel, chroma that subsampling blurs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width].astype(np.float32)
    img = np.stack([x / width * 200, y / height * 200, np.full_like(x, 90)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, max(5, width / 4))
        img[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def fast_calls(monkeypatch) -> dict:
    """Counts the decodes done by simplejpeg and by OpenCV: a test of the fast path must take it."""
    calls = {"jpeg": 0, "png": 0}

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls[key] += out is not None
            return out

        return wrapper

    monkeypatch.setattr(decode, "_fast_jpeg", counted(decode._fast_jpeg, "jpeg"))
    monkeypatch.setattr(decode, "_fast_png", counted(decode._fast_png, "png"))
    return calls


JPEG_VARIANTS = {
    "420": {"quality": 95},
    "444": {"quality": 90, "subsampling": 0},
    "422": {"quality": 90, "subsampling": 1},
    "progressive": {"quality": 85, "progressive": True},
}


@pytest.mark.parametrize("variant", list(JPEG_VARIANTS))
@pytest.mark.parametrize("size", [(203, 131), (768, 576)])
def test_fast_jpeg_decode_gives_pils_pixels_at_every_draft_scale(variant, size, fast_calls):
    data = encode(Image.fromarray(photo(*size)), **JPEG_VARIANTS[variant])
    w, h = size
    for draft in (None, (w, h), (w // 2 + 1, h // 2 + 1), (w // 2, h // 2), (w // 3, h // 3), (w // 9, h // 9)):
        expected, converted = load_image(data, draft_size=draft)
        got, got_converted = load_array(data, draft_size=draft)
        assert got.dtype == np.uint8 and got.shape == (expected.height, expected.width, 3), draft
        assert np.array_equal(got, np.asarray(expected)), (variant, draft)
        assert got_converted == converted is None
    assert fast_calls["jpeg"] == 6


def test_dct_scaling_only_when_the_source_is_twice_the_target_and_never_below_it(fast_calls):
    assert draft_scale((2048, 1536), (683, 512)) == 2  # the 2048x1536 benchmark source at 512 px
    assert draft_scale((1365, 1024), (683, 512)) == 1  # 1.999x: a 1/2 decode would be smaller than the target
    assert draft_scale((1366, 1024), (683, 512)) == 2
    assert draft_scale((768, 576), (683, 512)) == 1  # the 768x576 benchmark source: full decode
    assert draft_scale((4096, 3072), (512, 512)) == 4  # 6x the height: 1/4 is the largest scale still covering it
    assert draft_scale((8192, 8192), (512, 512)) == 8
    data = encode(Image.fromarray(photo(1366, 1025)))
    arr, _ = load_array(data, draft_size=(683, 512))
    assert arr.shape == (513, 683, 3)  # ceil(1025 / 2) x ceil(1366 / 2): at least the target
    arr, _ = load_array(data, draft_size=(684, 512))
    assert arr.shape == (1025, 1366, 3)  # 1366 // 684 == 1: full size
    assert fast_calls["jpeg"] == 2


def test_grey_and_cmyk_jpegs_take_the_pil_path_and_convert_as_before(fast_calls):
    grey = encode(Image.fromarray(photo(64, 48)[:, :, 0]))
    arr, converted = load_array(grey)
    assert arr.shape == (48, 64, 3) and converted == "L->RGB"
    assert np.array_equal(arr, np.asarray(load_image(grey)[0]))
    hint, converted = load_hint_array(grey)
    assert hint.shape == (48, 64) and converted is None and np.array_equal(hint, np.asarray(load_hint(grey)[0]))
    cmyk = encode(Image.fromarray(photo(64, 48)).convert("CMYK"))
    arr, converted = load_array(cmyk)
    assert converted == "CMYK->RGB" and np.array_equal(arr, np.asarray(load_image(cmyk)[0]))
    assert fast_calls["jpeg"] == 0


def test_a_damaged_jpeg_is_judged_by_pil_as_before(fast_calls):
    data = encode(Image.fromarray(photo(256, 192)))
    with pytest.raises(BadSample, match="corrupt_image"):
        load_array(data[: len(data) // 2])  # truncated: corrupt, never a half-grey image
    # A damaged entropy segment: libjpeg-turbo (strict) refuses it, PIL decodes it; PIL's pixels.
    damaged = data[:3000] + bytes(500) + data[3500:]
    arr, _ = load_array(damaged)
    assert np.array_equal(arr, np.asarray(load_image(damaged)[0]))
    assert fast_calls["jpeg"] == 0


PNG_MODES = {
    "L": lambda a: Image.fromarray(a[:, :, 0]),
    "RGB": lambda a: Image.fromarray(a),
    "RGBA": lambda a: Image.fromarray(np.dstack([a, np.where(a[:, :, :1] > 128, 255, 0).astype(np.uint8)])),
    "LA": lambda a: Image.fromarray(np.dstack([a[:, :, 0], a[:, :, 1]])),
    "P": lambda a: Image.fromarray(a).quantize(12),
    "1": lambda a: Image.fromarray(a[:, :, 0] > 120),
    "I;16": lambda a: Image.fromarray(a[:, :, 0].astype(np.uint16) * 257),
}


@pytest.mark.parametrize("mode", list(PNG_MODES))
def test_every_png_mode_decodes_as_pil_decodes_it(mode, fast_calls):
    data = encode(PNG_MODES[mode](photo(40, 30)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == mode
    for gray_ok, background in ((False, decode.IMAGE_BACKGROUND), (True, decode.HINT_BACKGROUND)):
        expected, converted = load_image(data, gray_ok=gray_ok, background=background)
        got, got_converted = load_array(data, gray_ok=gray_ok, background=background)
        assert np.array_equal(got, np.asarray(expected)) and got_converted == converted, (mode, gray_ok)
    # The fast path for 8-bit grey (as a hint) and RGB; PIL converts the rest.
    assert fast_calls["png"] == {"L": 1, "RGB": 2}.get(mode, 0)


def _blob_centers(arr: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroids (x, y) of the bright blobs of a single-channel map, sorted by x."""
    count, labels = cv2.connectedComponents((arr > 60).astype(np.uint8))
    out = []
    for i in range(1, count):
        ys, xs = np.nonzero(labels == i)
        w = arr[ys, xs].astype(np.float64)
        out.append(((xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()))
    return np.array(sorted(out))


@pytest.mark.parametrize("seed", range(12))
def test_crop_then_resize_keeps_image_and_hint_on_one_geometry(seed):
    """Image (bilinear or cubic) and hint (INTER_AREA or linear) land on the same pixels, and where the
    geometry says: a blob at source (x, y) ends at (x * W / w - left, ...), mirrored with a flip."""
    rng = random.Random(seed)
    w, h = rng.choice([(768, 576), (300, 420), (96, 72), (1024, 1024), (200, 150)])
    target = rng.choice([64, 128, (96, 64), (64, 112)])
    geometry = ResizeCrop.draw(w, h, target, crop="random", hflip=0.5, rng=rng)
    hint = np.zeros((h, w), np.uint8)
    x, y, r = round(rng.uniform(0.3, 0.7) * w), round(rng.uniform(0.3, 0.7) * h), max(w, h) / 30
    cv2.circle(hint, (x, y), round(r), 255, -1)
    image = np.dstack([hint, 255 - hint, hint // 2])
    got_image, got_hint = geometry.apply(image, "image"), geometry.apply(hint, "hint")
    tw, th = geometry.box[2] - geometry.box[0], geometry.box[3] - geometry.box[1]
    assert got_image.shape == (th, tw, 3) and got_hint.shape == (th, tw)
    (W, H), (left, top) = geometry.resized, geometry.box[:2]
    ex, ey = (x + 0.5) * W / w - 0.5 - left, (y + 0.5) * H / h - 0.5 - top
    if geometry.flip:
        ex = tw - 1 - ex
    if not (r * W / w < ex < tw - 1 - r * W / w and r * H / h < ey < th - 1 - r * H / h):
        return  # the crop cut the blob: its centroid moves
    (hx, hy), (ix, iy) = _blob_centers(got_hint)[0], _blob_centers(got_image[:, :, 0])[0]
    assert abs(hx - ex) < 0.75 and abs(hy - ey) < 0.75, (geometry, (hx, hy), (ex, ey))
    assert abs(ix - hx) < 0.25 and abs(iy - hy) < 0.25  # one box, one mapping for both


def test_a_reduced_decode_and_a_full_size_hint_stay_aligned():
    """A large JPEG is decoded at 1/2 scale, its hint at full size: the same geometry puts both on the
    same pixels (within a quarter pixel), through random crops and flips."""
    w, h = 1600, 1200
    hint = np.zeros((h, w), np.uint8)
    cv2.circle(hint, (700, 650), 40, 255, -1)
    image = np.dstack([hint] * 3)
    data = encode(Image.fromarray(image), quality=98)
    for seed in range(6):
        geometry = ResizeCrop.draw(w, h, 512, crop="random", hflip=0.5, rng=random.Random(seed))
        decoded, _ = load_array(data, draft_size=geometry.resized)
        assert decoded.shape[:2] == (h // 2, w // 2)
        got_image, got_hint = geometry.apply(decoded, "image"), geometry.apply(hint, "hint")
        (ix, iy), (hx, hy) = _blob_centers(got_image[:, :, 0])[0], _blob_centers(got_hint)[0]
        assert abs(ix - hx) < 0.3 and abs(iy - hy) < 0.3, seed


@pytest.mark.parametrize("seed", range(40))
def test_augment_then_canny_matches_canny_then_augment_over_many_draws(seed):
    """tests/test_loader.py's check over 40 draws instead of 6: every edge computed on the augmented
    image lies within 1 px of the augmented hint's edges and vice versa (away from the border)."""
    img = np.zeros((72, 96, 3), np.uint8)
    img[17:51, 23:70] = (230, 230, 230)
    img[30:40, 5:15] = (120, 200, 40)
    image = Image.fromarray(img)
    geometry = ResizeCrop.draw(96, 72, 64, crop="random", hflip=0.5, rng=random.Random(seed))
    a = np.asarray(Canny()(geometry.apply(image, "image"))[0])
    b = np.asarray(geometry.apply(Canny()(image)[0], "hint"))
    assert near(a, b) > 0.97 and near(b, a) > 0.97


def test_colour_canny_is_opencvs_bit_for_bit():
    rng = np.random.default_rng(0)
    images = [photo(211, 157, seed) for seed in range(3)]
    ties = photo(120, 90, 5)
    ties[:, :, 1] = ties[:, :, 0]  # equal gradients in two channels: the first must win, as in OpenCV
    ties[40:, :, 2] = ties[40:, :, 0]
    images += [ties, rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)]
    for img in images:
        for low, high in ((100, 200), (20, 60), (0, 0), (250, 255)):
            assert np.array_equal(canny(img, low, high), cv2.Canny(img, low, high)), (low, high)
    grey = images[0][:, :, 0].copy()
    assert np.array_equal(canny(grey, 50, 150), cv2.Canny(grey, 50, 150))
    edges, params = Canny(blur=3, random_thresholds=True)(images[0], None, random.Random(4))
    blurred = cv2.GaussianBlur(images[0], (3, 3), 0)
    assert np.array_equal(np.asarray(edges), cv2.Canny(blurred, params["low_threshold"], params["high_threshold"]))


def test_tensors_stay_uint8_and_a_grey_hint_stays_one_plane_until_collate():
    image = photo(32, 24)
    t = to_uint8_chw(image, 3)
    assert t.dtype == torch.uint8 and t.is_contiguous() and torch.equal(t, torch.from_numpy(image).permute(2, 0, 1))
    grey = image[:, :, 0].copy()
    h = to_uint8_chw(grey, 3)
    assert h.shape == (3, 24, 32) and h.stride()[0] == 0  # a view of the one plane, not three copies
    assert to_uint8_chw(grey, 1).shape == (1, 24, 32)
    assert torch.equal(to_uint8_chw(image, 1)[0], torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)))
    batch = collate([{"image": t, "hint": h, "key": "a"}, {"image": t, "hint": h, "key": "b"}])
    assert batch["hint"].shape == (2, 3, 24, 32) and batch["hint"].is_contiguous()
    assert all(torch.equal(batch["hint"][1, c], torch.from_numpy(grey)) for c in range(3))
    assert torch.equal(batch["image"][0], t) and batch["key"] == ["a", "b"]


class _CollateInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        image = torch.from_numpy(photo(16, 12)).permute(2, 0, 1).contiguous()
        batch = collate([{"image": image, "key": "k"}] * 3)
        yield {"shared": batch["image"].is_shared(), "image": batch["image"], "expected": image}


def test_a_worker_writes_its_batch_into_shared_memory():
    """The stack is the one copy: a batch made in shared memory is sent without being copied again."""
    out = next(iter(torch.utils.data.DataLoader(_CollateInWorker(), batch_size=None, num_workers=1)))
    assert out["shared"] is True
    assert all(torch.equal(out["image"][i], out["expected"]) for i in range(3))
    assert not collate([{"image": torch.zeros(2, 2, dtype=torch.uint8)}])["image"].is_shared()  # not in a worker


FAULTS_PER_SAMPLE = """
import multiprocessing, sys
from pathlib import Path
import torch
from nemo_controlnet.data.datamodule import worker_init
from nemo_controlnet.data.hints import Canny
from nemo_controlnet.data.webdataset import SampleDecoder, SampleStream, ShardSource, batches

def faults_per_sample(url, init):
    decoder = SampleDecoder(512, crop="random", hflip=0.5, detector=Canny(), regenerate=True)
    stream = SampleStream([(ShardSource([url]), 1.0)], decoder, 4, 0, shuffle_buffer=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=1, worker_init_fn=init)
    it = batches(loader)
    next(it), next(it)  # the worker's heap grows to its working size
    (pid,) = [c.pid for c in multiprocessing.active_children()]
    stat = Path(f"/proc/{pid}/stat")
    start, count, per_sample = int(stat.read_text().rsplit(")", 1)[1].split()[7]), 0, None
    for batch in it:
        count += len(batch["key"])
        try:
            per_sample = (int(stat.read_text().rsplit(")", 1)[1].split()[7]) - start) / count
        except OSError:  # the worker has finished
            break
    del it, loader
    return per_sample

print(faults_per_sample(sys.argv[1], None), faults_per_sample(sys.argv[1], worker_init))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="page fault counts from /proc")
def test_a_worker_reuses_its_memory_instead_of_faulting_in_fresh_pages(tmp_path):
    """worker_init keeps each sample's freed arrays for the next: without it glibc hands the top of its
    heap back and every sample faults megabytes in again (~2.6 us a 4 KiB page on the benchmark VM).
    What is left is the batch's shared memory: 2 x 768 KiB (image and hint) per 512 px sample. Measured
    in a fresh process: a worker forked from a lean parent (a training script) shows it; one forked
    from pytest's large heap may not."""
    url = str(tmp_path / "photos.tar")
    with wds.TarWriter(url) as sink:
        for i in range(32):
            sink.write({"__key__": f"k{i}", "jpg": encode(Image.fromarray(photo(768, 576, i)), quality=95), "txt": "x"})
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_SAMPLE, url], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    default, retained = (float(v) for v in result.stdout.split())
    shared_pages = 2 * 768 * 1024 / 4096
    assert retained < 1.1 * shared_pages and default > 2 * shared_pages, (retained, default)
