"""The table of examples/fill50k/research.sh: per run, the held-out scores (controlnet-eval's
metrics.json), the trainable parameters (the newest checkpoint's weights), the size of the newest
checkpoint and of the exported weights, and the training time.

    python examples/fill50k/research_table.py runs/fill50k/research standard edge_loss control_lora
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def trainable_parameters(checkpoint: Path) -> int:
    """The trainable parameters: a checkpoint holds only those (optimizer state aside)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return sum(t.numel() for t in state.values())


def size_mb(paths: list[Path]) -> float | None:
    files = [p for p in paths if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6 if files else None


def row(run: Path, name: str, times: dict[str, str]) -> dict:
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["results"]["controlled"]
    checkpoints = sorted((run / "checkpoints").glob("step=*.ckpt"))
    export = run / "control_lora" if (run / "control_lora").is_dir() else run / "controlnet"
    return {
        "run": name,
        "edge F1": f"{metrics['edge_f1']:.3f}",
        "edge F1 (1 px)": f"{metrics['edge_f1_tol1']:.3f}",
        "circle IoU": f"{metrics['iou']:.3f}",
        "trainable parameters": f"{trainable_parameters(checkpoints[-1]):,}" if checkpoints else "?",
        "checkpoint (MB)": f"{size_mb(checkpoints[-1:]):.2f}" if checkpoints else "?",
        "export (MB)": f"{size_mb(sorted(export.glob('*.safetensors'))):.2f}" if export.is_dir() else "?",
        "train time (s)": times.get(name, "?"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    root = Path(args.root)
    times = {}
    if (root / "times.txt").is_file():
        for line in (root / "times.txt").read_text().splitlines():
            m = re.match(r"(\S+): trained in (\d+) s", line)
            if m:
                times[m.group(1)] = m.group(2)
    rows = [row(root / name, name, times) for name in args.runs]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("| " + " | ".join("---" for _ in keys) + " |")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return rows


if __name__ == "__main__":
    main()
