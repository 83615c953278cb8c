"""Captions per second of ``controlnet-prep caption.model=...``, through the real job (PrepJob: the
captioning pass, its prefetch thread, the shard writers).

    python scripts/bench_caption.py                               # a tiny random BLIP on the CPU
    python scripts/bench_caption.py --model /models/blip-image-captioning-large --device cuda \\
        --dtype bf16 --batch-sizes 16 64 --images 512 --image-size 768 576 --workers 4
    python scripts/bench_caption.py --random large --device cuda ...   # no weights at hand: speed only

Without --model it builds a random BLIP in --dir: ``tiny`` (default; tests/test_caption.py's), whose
figure is the pipeline's overhead (read, decode, preprocess, generate loop, write) more than a model's
cost, or ``large``: blip-image-captioning-large's shapes (ViT-L/16 at 384 px, a BERT-base decoder, its
vocabulary size) with random weights. A random decoder rarely stops early, so it generates all
--max-new-tokens tokens: a trained model, which stops at its caption's end, is as fast or faster.
Each batch size is a fresh output directory; the table gives captions/s of the captioning pass and
samples/s of the whole job. The command for a real BLIP-large on a GPU is printed at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
GPU_COMMAND = (
    "controlnet-prep source=folder source.root=/data/photos out_dir=/data/shards "
    "caption.model=/models/blip-image-captioning-large caption.device=cuda caption.dtype=bf16 "
    "caption.batch_size=64 workers=8"
)


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields and a few blocks: compresses and decodes like a photo, differs per image."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = rng.uniform(0, 255, 3) + 80 * np.sin(6 * x[..., None] + rng.uniform(0, 6, 3)) * np.cos(4 * y[..., None])
    arr = np.clip(base, 0, 255).astype(np.uint8)
    for _ in range(4):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        arr[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def make_photos(root: Path, n: int, size: tuple[int, int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"{i:05d}.jpg"
        if not path.exists():
            photo_like(rng, *size).save(path, quality=90)
    return root


def random_blip_large(directory: Path) -> Path:
    """blip-image-captioning-large's architecture with random weights, saved in bf16, and a processor
    with a BERT-sized vocabulary (made-up tokens): for timing only."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:
        from transformers import BlipImageProcessorPil as BlipImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor
    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    (directory / "vocab.txt").write_text("\n".join(specials + [f"t{i}" for i in range(30524 - 6)]) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"), bos_token="[DEC]")
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("bos", "[DEC]"), ("sep", "[SEP]"), ("pad", "[PAD]"))}
    config = BlipConfig(
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 384, "patch_size": 16},
        text_config={"vocab_size": len(tokenizer), "bos_token_id": ids["bos"], "sep_token_id": ids["sep"],
                     "eos_token_id": ids["sep"], "pad_token_id": ids["pad"]},
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is quicker there
        model = BlipForConditionalGeneration(config)
    model.to(torch.bfloat16).save_pretrained(directory)
    BlipProcessor(BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer).save_pretrained(directory)
    return directory


def run(photos: Path, out: Path, model: Path, batch_size: int, args) -> dict:
    from hydra import compose, initialize_config_module

    from nemo_controlnet.prep.job import PrepJob

    overrides = [
        f"source.root={photos}", f"out_dir={out}", "overwrite=true", f"workers={args.workers}",
        f"shard_size={args.shard_size}",
        f"caption.model={model}", "caption.mode=overwrite", f"caption.batch_size={batch_size}",
        f"caption.device={args.device}", f"caption.dtype={args.dtype}", f"caption.max_new_tokens={args.max_new_tokens}",
        f"caption.reader_threads={args.reader_threads}",
    ]  # fmt: skip
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="prep", overrides=overrides)
    start = time.time()
    summary = PrepJob(cfg).run()
    seconds = time.time() - start
    return {
        "batch_size": batch_size,
        "captioned": summary["captioned"],
        "captions_per_s": summary["captions_per_s"],
        "samples_per_s": round(summary["written"] / seconds, 2),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a captioning model directory (default: a random BLIP)")
    parser.add_argument("--random", choices=("tiny", "large"), default="tiny", help="the random BLIP without --model")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--image-size", type=int, nargs=2, default=(512, 384), metavar=("W", "H"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="shard writers (1: in the job's process)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--reader-threads", default="auto", help="caption.reader_threads")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("nemo_controlnet.prep.caption").setLevel(logging.INFO)  # the model, device, threads

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-caption-"))
    model = args.model
    if model is None and args.random == "large":
        start = time.time()
        model = random_blip_large(work / "random-blip-large")
        print(f"random BLIP-large built in {time.time() - start:.1f}s")
    elif model is None:
        sys.path.insert(0, str(REPO))
        from tests.test_caption import tiny_blip

        model = tiny_blip(work / "tiny-blip")
    photos = make_photos(work / f"photos-{args.image_size[0]}x{args.image_size[1]}", args.images, args.image_size)
    rows = [run(photos, work / f"out-b{b}", model, b, args) for b in args.batch_sizes]

    print(f"\nmodel {model}, {args.images} images {args.image_size[0]}x{args.image_size[1]}, "
          f"device {args.device}, dtype {args.dtype}, max_new_tokens {args.max_new_tokens}")  # fmt: skip
    print(f"{'batch':>6} {'captions/s':>11} {'samples/s':>10} {'seconds':>8}")
    for r in rows:
        print(f"{r['batch_size']:>6} {r['captions_per_s']:>11.2f} {r['samples_per_s']:>10.2f} {r['seconds']:>8.2f}")
    print(f"\nA real BLIP-large on a GPU:\n  {GPU_COMMAND}")
    print(
        "  benchmark it: python scripts/bench_caption.py --model /models/blip-image-captioning-large "
        "--device cuda --dtype bf16 --batch-sizes 16 64 --images 512 --image-size 768 576 --workers 4"
    )
    return rows


if __name__ == "__main__":
    main()
