"""Seconds per training step for several torch thread counts, on an idle machine and beside CPU-bound
processes (a busy machine): what ``perf.cpu_threads=auto`` is chosen by.

    python scripts/bench_threads.py --threads 1 2 --busy 0 1 --steps 60

Runs the fill50k base config (tiny UNet, 32 px, one loader worker) for ``--steps`` steps after a
warm-up run, once per (threads, busy) pair, and prints a table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _spin() -> None:
    while True:
        pass


def step_seconds(threads: int, steps: int, workdir: Path) -> float:
    from hydra import compose, initialize_config_module

    from nemo_controlnet.training.run import train

    common = [f"data.shards={workdir}/train", f"data.validation_shards={workdir}/val",
              f"data.synthetic.train.out_dir={workdir}/train", "data.synthetic.train.num_samples=1000",
              f"data.synthetic.val.out_dir={workdir}/val", "data.synthetic.val.num_samples=4", "logger=none",
              "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "validation.num_samples=0",
              "checkpoint.every_n_steps=0", "export.enabled=false", f"perf.cpu_threads={threads}", "resume=false"]
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        warm = compose("train", ["+experiment=fill50k_base", f"run_dir={workdir}/warm", *common, "trainer.max_steps=5"])
        timed = compose("train", ["+experiment=fill50k_base", f"run_dir={workdir}/run", *common,
                                  f"trainer.max_steps={steps}"])  # fmt: skip
    train(warm)
    start = time.perf_counter()
    train(timed)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="CPU-bound processes running beside")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for busy in args.busy:
            spinners = [mp.Process(target=_spin, daemon=True) for _ in range(busy)]
            for p in spinners:
                p.start()
            try:
                for threads in args.threads:
                    rows.append({"busy": busy, "threads": threads,
                                 "s_per_step": step_seconds(threads, args.steps, Path(tmp))})  # fmt: skip
            finally:
                for p in spinners:
                    p.kill()
                    p.join()
    cpus = len(os.sched_getaffinity(0))
    print(f"\n{cpus} available CPU(s), 1 loader worker, {args.steps} steps (fill50k base config)")
    print(f"{'busy processes':>15} {'torch threads':>14} {'s/step':>8}")
    for r in rows:
        print(f"{r['busy']:>15} {r['threads']:>14} {r['s_per_step']:>8.3f}")
    return rows


if __name__ == "__main__":
    main()
