"""The learning curve of a run: validation metrics against steps (``<run_dir>/samples/metrics.jsonl``,
written by the trainer's validation), drawn as a PNG with Pillow (no plotting library needed).

    python examples/fill50k/plot.py runs/fill50k/controlnet --baseline runs/fill50k/controlnet/eval/metrics.json \
        --out examples/fill50k/learning_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"iou": (220, 50, 40), "edge_f1_tol1": (30, 110, 220), "edge_f1": (40, 160, 70), "ssim": (150, 80, 180)}
W, H, PAD = 640, 360, 48


def plot(rows: list[dict], baseline: dict | None, out: Path, title: str) -> Path:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps = [r["step"] for r in rows]
    x0, x1, y0, y1 = PAD, W - 150, H - PAD, PAD
    span = max(steps) or 1
    sx = lambda s: x0 + (x1 - x0) * s / span  # noqa: E731
    sy = lambda v: y0 - (y0 - y1) * v  # noqa: E731  (metrics lie in [0, 1])
    d.rectangle([x0, y1, x1, y0], outline="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([x0, sy(v), x1, sy(v)], fill=(225, 225, 225))
        d.text((8, sy(v) - 6), f"{v:.2f}", fill="black")
    for s in (0, span // 2, span):
        d.text((sx(s) - 10, y0 + 6), str(s), fill="black")
    d.text((x0, 12), title, fill="black")
    d.text(((x0 + x1) // 2 - 10, H - 18), "step", fill="black")
    for i, (name, color) in enumerate(COLORS.items()):
        points = [(sx(r["step"]), sy(r[name])) for r in rows if r.get(name) is not None]
        if len(points) > 1:
            d.line(points, fill=color, width=2)
        for p in points:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        if baseline and baseline.get(name) is not None:  # dashed: the same base without control
            y = sy(baseline[name])
            for x in range(int(x0), int(x1), 12):
                d.line([x, y, x + 6, y], fill=color, width=1)
        d.line([x1 + 12, y1 + 10 + 18 * i, x1 + 32, y1 + 10 + 18 * i], fill=color, width=2)
        d.text((x1 + 38, y1 + 4 + 18 * i), name, fill="black")
    d.text((x1 + 12, y1 + 10 + 18 * len(COLORS)), "dashed: no control", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--baseline", type=Path, help="metrics.json of controlnet-eval (its uncontrolled means)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in (args.run_dir / "samples" / "metrics.jsonl").read_text().splitlines() if line]
    baseline = json.loads(args.baseline.read_text())["results"]["uncontrolled"] if args.baseline else None
    return plot(rows, baseline, args.out or args.run_dir / "learning_curve.png", f"validation metrics: {args.run_dir}")


if __name__ == "__main__":
    print(main())
