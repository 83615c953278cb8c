"""controlnet-ui: time from the command to a served page, and prep throughput started from the UI
against ``controlnet-prep`` on the same images and settings.

    python scripts/bench_ui.py                          # 240 photos of 768x576 -> 512 px, 2 workers
    python scripts/bench_ui.py --images 600 --workers 2 --dir /tmp/ui-bench

Both prep runs print the job's own summary (``... written ..., N samples/s``, the same line from the
same ``PrepJob``): the command's from its output, the UI's from the job log it writes beside the
dataset. The UI run is started as a browser would start it: through the page's HTTP API
(gradio_client calling the Precompute button's handler), then polled until done.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

SUMMARY = re.compile(r"(\d+) written.*?([\d.]+)s \(([\d.]+) samples/s\)")


def write_photos(folder: Path, n: int, size: tuple[int, int]) -> None:
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 256, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize(size, Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-8, 9, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=95)
        (folder / f"{i:05d}.txt").write_text(f"photo {i}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prep_command(root: Path, photos: Path, workers: int, resolution: int, shard_size: int) -> dict:
    out = root / "datasets" / "cli"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "nemo_controlnet.cli.prep", "source=folder", f"source.root={photos}",
               f"out_dir={out}", f"workers={workers}", f"resolution={resolution}", f"shard_size={shard_size}",
               "hint=canny", "hint.low_threshold=100", "hint.high_threshold=200", "hint.blur=0"]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.monotonic() - start
    written, seconds, rate = SUMMARY.search(result.stdout + result.stderr).groups()
    return {"written": int(written), "job_s": float(seconds), "rate": float(rate), "wall_s": wall}


def start_ui(root: Path, workers: int) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "nemo_controlnet.cli.ui", f"ui.port={port}", f"ui.roots=[{root}]",
               f"ui.prep_workers={workers}", f"hydra.run.dir={root / 'ui-log'}"]  # fmt: skip
    start = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200 and b"<html" in response.read(2048).lower():
                    break
        except OSError:
            if process.poll() is not None:
                raise SystemExit("controlnet-ui exited before serving") from None
            time.sleep(0.05)
    return process, url, time.monotonic() - start


def prep_from_ui(url: str, root: Path, photos: Path, resolution: int, shard_size: int) -> dict:
    from gradio_client import Client

    out = root / "datasets" / "ui"
    shutil.rmtree(out, ignore_errors=True)
    client = Client(url, verbose=False)
    # The Datasets form's fields, in the page's order (ui/app.py DATASET_FIELDS).
    values = ["folder", str(photos), "ui", str(root / "datasets"), "", True, "canny", False, True, "shards",
              100, 200, 0, resolution, shard_size]  # fmt: skip
    start = time.monotonic()
    result = client.predict(*values, api_name="/start_prep")
    if not str(result[0]):
        raise SystemExit(f"the UI refused the job: {result}")
    while True:
        _, line, _ = client.predict(str(out), api_name="/prep_status")
        if line.startswith(("done", "failed", "cancelled")):
            break
        time.sleep(1.0)  # the page's timer polls once a second
    wall = time.monotonic() - start
    log = next((out / ".prep-logs").glob("*-ui.log")).read_text()
    written, seconds, rate = SUMMARY.search(log).groups()
    return {"written": int(written), "job_s": float(seconds), "rate": float(rate), "wall_s": wall, "status": line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--source-size", type=int, nargs=2, default=(768, 576), metavar=("W", "H"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each, best kept")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-ui"))
    args = parser.parse_args()
    root = args.dir.resolve()
    photos = root / "photos"
    write_photos(photos, args.images, tuple(args.source_size))
    process, url, served = start_ui(root, args.workers)
    print(f"controlnet-ui: page served {served:.1f} s after the command started ({url})")
    try:
        cli, ui = [], []
        for _ in range(args.repeats):  # alternating: the machine's speed drifts
            cli.append(prep_command(root, photos, args.workers, args.resolution, args.shard_size))
            ui.append(prep_from_ui(url, root, photos, args.resolution, args.shard_size))
    finally:
        process.terminate()
        process.wait(timeout=30)
    for name, runs in (("controlnet-prep", cli), ("controlnet-ui", ui)):
        for r in runs:
            print(f"{name:16s} {r['written']} written: job {r['job_s']:.1f} s, {r['rate']:.1f} samples/s "
                  f"(wall {r['wall_s']:.1f} s)")  # fmt: skip
    best_cli, best_ui = max(r["rate"] for r in cli), max(r["rate"] for r in ui)
    print(f"best: controlnet-prep {best_cli:.1f} samples/s, controlnet-ui {best_ui:.1f} samples/s, "
          f"ui/cli {best_ui / best_cli:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
