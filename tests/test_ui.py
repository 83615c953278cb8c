"""controlnet-ui in a real Chromium (Debian's chromium + chromium-driver, driven by selenium).

One server (the real ``controlnet-ui`` command) and one browser for the whole module; the flows run
in order on one workspace: a dataset from a folder of 40 images (preview, a slider move changes it,
precompute to 100%, a cancel mid-way leaves a consistent manifest, resume completes), a 20-step tiny
run (loss curve and grid), generation from that run, and bad values refused at their fields.
Screenshots of each page go to $UI_ARTIFACTS (default: test-artifacts/ui) and must not be blank."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.ui

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("UI_ARTIFACTS", "test-artifacts/ui"))
NUM_IMAGES = 40


def _missing() -> str | None:
    if not (CHROMIUM and DRIVER):
        return "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as e:
        return f"needs the ui and dev extras: {e}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, condition, timeout: float = 120, poll: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value is not None and value is not False and (not hasattr(value, "__len__") or len(value)):
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def write_images(folder: Path, n: int = NUM_IMAGES, size: int = 640) -> None:
    """Smooth colour fields with mild noise and captions: Canny finds about 3x the edges at 20/40 as
    at 100/200 (0.19 vs 0.07 of the pixels at 256 px), so a threshold move shows. Plus one
    file that is not an image and one image without a caption: both must be skipped and listed."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-8, 9, (size, size, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"img{i:03d}.jpg", quality=95)
        (folder / f"img{i:03d}.txt").write_text(f"a noisy picture number {i}")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "broken.txt").write_text("never read")
    Image.fromarray(noisy.astype(np.uint8)).save(folder / "uncaptioned.jpg")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    why = _missing()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("ui")
    write_images(root / "photos")
    (root / "datasets").mkdir()
    return root


@pytest.fixture(scope="module")
def server(workspace):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "nemo_controlnet.cli.ui", f"ui.port={port}", f"ui.roots=[{workspace}]",
               "ui.prep_workers=1", f"hydra.run.dir={workspace / 'ui-log'}"]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
    lines = []
    while True:
        line = process.stdout.readline()
        if not line:
            raise AssertionError("controlnet-ui exited before serving:\n" + "".join(lines))
        lines.append(line)
        if "serving http" in line:
            break
    url = f"http://127.0.0.1:{port}/"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
    print(f"controlnet-ui: page served {time.monotonic() - started:.1f} s after the command started")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.get(server)
    _wait("the page", lambda: driver.find_elements("css selector", "#f-source"), timeout=60)
    yield driver
    driver.quit()


# ---- page helpers


def _el(driver, css: str):
    return driver.find_element("css selector", css)


def _text(driver, css: str) -> str:
    found = driver.find_elements("css selector", css)
    return found[0].text if found else ""


def fill(driver, field: str, value) -> None:
    """Type into a field's text or number input and leave it (Gradio updates on input and blur)."""
    from selenium.webdriver.common.keys import Keys

    box = _el(driver, f"#{field} textarea, #{field} input[type=number], #{field} input[type=text], #{field} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(value))
    box.send_keys(Keys.TAB)


def click(driver, css: str) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", _el(driver, css))
    _el(driver, css).click()


def tab(driver, name: str) -> None:
    for button in driver.find_elements("css selector", "button[role=tab]"):
        if button.text.strip() == name:
            button.click()
            return
    raise AssertionError(f"no tab {name}")


def image_bytes(driver, css: str) -> bytes | None:
    """The bytes the page shows in the <img> under ``css`` (fetched from the server, as the page did)."""
    found = driver.find_elements("css selector", f"{css} img")
    src = found[0].get_attribute("src") if found else None
    if not src or not src.startswith("http"):
        return None
    with urllib.request.urlopen(src, timeout=30) as response:
        return response.read()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    pixels = np.asarray(Image.open(path).convert("L"), np.float32)
    assert pixels.std() > 5, f"{path}: the page looks blank"


def dataset_form(driver, workspace: Path, name: str, shard_size: int = 5) -> None:
    tab(driver, "Datasets")
    fill(driver, "f-source", workspace / "photos")
    fill(driver, "f-name", name)
    fill(driver, "f-out_root", workspace / "datasets")
    fill(driver, "f-control_size", 256)
    fill(driver, "f-shard_size", shard_size)


def manifest(workspace: Path, name: str) -> dict:
    return json.loads((workspace / "datasets" / name / "manifest.json").read_text())


# ---- flows, in order


def test_preview_shows_a_real_pair_and_a_threshold_move_changes_it(browser, workspace):
    dataset_form(browser, workspace, "photos-canny")
    click(browser, "#ds-preview-button")
    counts = _wait("the counts", lambda: _text(browser, "#ds-counts"))
    assert "sample 0 is skipped by prep: corrupt_image" in counts, counts  # broken.jpg sorts first
    fill(browser, "ds-sample", 3)
    first = _wait("the preview", lambda: image_bytes(browser, "#ds-preview"))
    counts = _wait("the counts", lambda: _text(browser, "#ds-counts"))
    assert f"{NUM_IMAGES} readable, 2 skipped" in counts, counts
    fill(browser, "f-low_threshold", 20)
    fill(browser, "f-high_threshold", 40)
    a = _pixels(first)
    half = (a.shape[1] - 4) // 2
    left, right = slice(0, half), slice(half + 4, a.shape[1])

    def more_edges():  # the preview once both thresholds are in: far more edges
        shown = image_bytes(browser, "#ds-preview")
        b = _pixels(shown) if shown else a
        return b if (b[:, right] > 0).mean() > 1.5 * (a[:, right] > 0).mean() else None

    b = _wait("a preview with the lower thresholds' edges", more_edges)
    assert a.shape == b.shape
    assert np.array_equal(a[:, left], b[:, left]), "the image half must not change with the thresholds"
    screenshot(browser, "datasets-preview")


def test_a_bad_threshold_is_shown_at_its_field_and_no_job_starts(browser, workspace):
    dataset_form(browser, workspace, "never-made")
    fill(browser, "f-low_threshold", 200)
    fill(browser, "f-high_threshold", 100)
    click(browser, "#ds-start")
    errors = ("#err-low_threshold", "#err-high_threshold")
    message = _wait("the field error", lambda: " ".join(_text(browser, e) for e in errors).strip())
    assert "low" in message.lower() or "threshold" in message.lower(), message
    assert "not started" in _wait("the button's message", lambda: _text(browser, "#ds-message"))
    assert not (workspace / "datasets" / "never-made").exists()
    fill(browser, "f-source", "../../etc")
    click(browser, "#ds-start")
    assert "outside" in _wait("the roots error", lambda: _text(browser, "#err-source"))
    screenshot(browser, "datasets-errors")


def test_precompute_cancel_mid_way_then_resume_completes(browser, workspace):
    dataset_form(browser, workspace, "photos-canny", shard_size=2)
    fill(browser, "f-low_threshold", 100)
    fill(browser, "f-high_threshold", 200)
    click(browser, "#ds-start")
    out = workspace / "datasets" / "photos-canny"
    _wait("the first complete shard", lambda: list(out.glob("*.tar")), timeout=120, poll=0.05)
    click(browser, "#ds-cancel")
    _wait("the cancel", lambda: "cancelled" in _text(browser, "#ds-status") or "done" in _text(browser, "#ds-status"))
    status = _text(browser, "#ds-status")
    assert "cancelled" in status, f"the job finished before the cancel: {status}"
    m = manifest(workspace, "photos-canny")
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert not m["complete"] and 0 < len(shards) < 21
    assert sorted(s["name"] if isinstance(s, dict) else Path(s).name for s in m["shards"]) == shards
    assert not list(out.glob("*.tmp*")), "a cancelled shard must leave no partial file"
    assert (out / "prep_config.yaml").is_file() and (out / "prep_command.txt").is_file()
    click(browser, "#ds-resume")
    _wait("the resumed job", lambda: "done" in _text(browser, "#ds-status") and "100%" in _text(browser, "#ds-status"),
          timeout=300)  # fmt: skip
    m = manifest(workspace, "photos-canny")
    assert m["complete"] and m["num_samples"] == NUM_IMAGES
    skipped = _wait("the skipped list", lambda: _text(browser, "#ds-skipped"))
    assert "broken.jpg" in skipped and "uncaptioned.jpg" in skipped, skipped
    screenshot(browser, "datasets-done")


def test_the_saved_command_line_reproduces_the_dataset(workspace, tmp_path):
    out = workspace / "datasets" / "photos-canny"
    command = (out / "prep_command.txt").read_text().split()
    assert command[0] == "controlnet-prep"
    again = tmp_path / "again"
    args = [a if not a.startswith("out_dir=") else f"out_dir={again}" for a in command[1:]]
    subprocess.run([sys.executable, "-m", "nemo_controlnet.cli.prep", *args], check=True, cwd=tmp_path,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)  # fmt: skip
    import tarfile

    def members(folder: Path) -> dict:
        found = {}
        for shard in sorted(folder.glob("*.tar")):
            with tarfile.open(shard) as tar:
                found.update({m.name: tar.extractfile(m).read() for m in tar if not m.name.endswith(".json")})
        return found

    assert members(again) == members(out)
    # The saved config runs as it is, too (its own primary config).
    third = tmp_path / "third"
    command = [sys.executable, "-m", "nemo_controlnet.cli.prep", f"--config-dir={out}", "--config-name=prep_config",
               f"out_dir={third}"]  # fmt: skip
    subprocess.run(command, check=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    assert members(third) == members(out)


def test_a_tiny_run_shows_its_loss_curve_and_a_grid(browser, workspace):
    tab(browser, "Runs")
    fill(browser, "f-run_name", "tiny20")
    fill(browser, "f-steps", 20)
    fill(browser, "f-batch_size", 2)
    fill(browser, "f-checkpoint_every", 10)
    fill(browser, "f-extra", "data.synthetic.train.num_samples=64 data.synthetic.train.shard_size=32 "
                             "validation.every_n_steps=10 validation.num_samples=2 validation.num_inference_steps=2")
    click(browser, "#run-start")
    assert "started" in _wait("the start", lambda: _text(browser, "#run-message"))
    _wait("the run to finish", lambda: "finished" in _text(browser, "#run-state"), timeout=300, poll=1)
    _wait("the grid", lambda: image_bytes(browser, "#run-grid"), timeout=30)
    _wait("the loss curve", lambda: browser.find_elements("css selector", "#run-loss canvas, #run-loss svg"))
    assert (workspace / "runs" / "tiny20" / "controlnet").is_dir()
    screenshot(browser, "runs")


def test_generate_returns_an_image(browser, workspace):
    tab(browser, "Generate")
    fill(browser, "gen-controlnet", "tiny20")
    upload = _el(browser, "#gen-upload input[type=file]")
    upload.send_keys(str(workspace / "photos" / "img000.jpg"))
    fill(browser, "gen-prompt", "a noisy picture")
    fill(browser, "gen-steps", 2)
    click(browser, "#gen-go")
    picture = _wait("a generated image", lambda: image_bytes(browser, "#gen-images"), timeout=180)
    assert np.asarray(Image.open(io.BytesIO(picture))).std() > 0
    screenshot(browser, "generate")


def test_picking_a_controlnet_sets_its_family_guidance(browser, workspace):
    """A Flux run's guidance default is its training guidance (tiny_flux: 3.5), an SD run's 7.5: picking
    one moves the slider there (as controlnet-generate with guidance_scale null samples)."""
    command = [sys.executable, "-m", "nemo_controlnet.cli.train", "model=tiny_flux",
               f"run_dir={workspace / 'runs' / 'flux1'}",
               "trainer.max_steps=1", "data.batch_size=2", "data.num_workers=0", "validation.num_samples=0",
               "data.synthetic.train.num_samples=4", "data.synthetic.train.shard_size=4",
               "trainer.enable_progress_bar=false"]  # fmt: skip
    subprocess.run(command, check=True, cwd=workspace, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    tab(browser, "Generate")

    def guidance() -> float:
        return float(_el(browser, "#gen-guidance input[type=number]").get_attribute("value"))

    fill(browser, "gen-controlnet", "flux1")
    _wait("the Flux guidance", lambda: guidance() == 3.5, timeout=30)
    fill(browser, "gen-controlnet", "tiny20")
    _wait("the SD guidance", lambda: guidance() == 7.5, timeout=30)


def test_files_outside_the_roots_are_refused_over_http(server):
    for path in ("/etc/passwd", f"{Path(__file__).resolve()}"):
        for route in ("gradio_api/file=", "file="):
            try:
                with urllib.request.urlopen(server + route + path, timeout=10) as response:
                    body = response.read()
                    assert b"root:" not in body and b"import" not in body, f"{route}{path} was served"
            except urllib.error.HTTPError as e:
                assert e.code in (403, 404), e.code
