"""A GPU day in one command: CUDA smoke checks of the speed features and the benchmarks, each in a process
of its own under a time limit, into one JSON file and one markdown table. Run it through gpu_check.sh:

    bash scripts/gpu_check.sh --out gpu_check_out                  # one H100/H200, under 8 minutes
    bash scripts/gpu_check.sh --out gpu_check_out --wheels wheels/  # install what the GPU image lacks first
    bash scripts/gpu_check.sh --dry-run --out /tmp/gpu_check        # CPU: the same path, tiny model, 1-2 steps

Writes OUT/gpu_check.json (machine, every item's status, details and benchmark rows), OUT/gpu_check.md
(the same as tables) and OUT/logs/<item>.log. Statuses: pass, fail, error (it raised), timeout (killed at
its limit), "skipped: ..." (no CUDA in a dry run, not selected, or the time budget spent). The exit status
is 1 when any item failed, errored or timed out. The checks and benchmarks are in gpu_check_items.py.

A process per item: a hang or a crash costs that item only. The processes fork from a server that has
imported torch, diffusers and the package once (multiprocessing's forkserver; it never touches CUDA, so
each item starts CUDA afresh) instead of paying the imports per item.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
# name, kind, time limit (s) on a GPU, CUDA only (a dry run reports "skipped: no CUDA")
ITEMS = [
    ("environment", "check", 60, False),
    ("bf16_autocast", "check", 60, True),
    ("flash_sdpa", "check", 60, True),
    ("activation_checkpointing", "check", 60, False),
    ("channels_last", "check", 60, False),
    ("regional_compile", "check", 150, False),
    ("transformer_families", "check", 120, False),
    ("flux_block_memory", "check", 120, True),
    ("fused_adamw", "check", 60, True),
    ("fsdp_one_gpu", "check", 120, True),
    ("manual_swap_offload", "check", 90, True),
    ("bench_train_sd15_512", "benchmark", 200, False),
    ("bench_train_sdxl_1024_b4", "benchmark", 180, False),
    ("bench_data", "benchmark", 90, False),
    ("bench_offload_sd15_512", "benchmark", 120, False),
]
DRY_RUN_LIMIT = 120
FAILED = ("fail", "error", "timeout")
PACKAGES = ("torch", "lightning", "diffusers", "transformers", "accelerate", "peft", "hydra-core", "webdataset")


def child(name: str, cuda_only: bool, options: dict, result_path: str, log_path: str) -> None:
    """One item, in its own process (group, so a timeout takes its workers too), output to its log."""
    os.setpgid(0, 0)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        if f"{name}:hang" in options["faults"]:  # the time limit's own test
            time.sleep(10**6)
        import gpu_check_items

        result = gpu_check_items.run(name, cuda_only, gpu_check_items.Context(name=name, **options))
    except BaseException:  # noqa: B036  (reported as the item's error; the process ends here anyway)
        result = {"status": "error", "summary": "raised (see details.traceback)",
                  "details": {"traceback": traceback.format_exc()[-6000:]}}  # fmt: skip
    write_json(Path(result_path), result)
    sys.stdout.flush()
    sys.stderr.flush()


def noop() -> None:
    pass


def run_item(ctx, name: str, cuda_only: bool, limit: float, options: dict, out: Path) -> dict:
    result_path, log_path = out / "items" / f"{name}.json", out / "logs" / f"{name}.log"
    result_path.unlink(missing_ok=True)
    process = ctx.Process(target=child, args=(name, cuda_only, options, str(result_path), str(log_path)), name=name)
    start = time.monotonic()
    process.start()
    process.join(limit)
    if process.is_alive():
        kill_group(process)
        entry = {"status": "timeout", "summary": f"killed after its {limit:.0f} s limit"}
    elif result_path.exists():
        entry = json.loads(result_path.read_text())
    else:
        entry = {"status": "error", "summary": f"the process ended with code {process.exitcode} and no result"}
    entry["seconds"] = round(time.monotonic() - start, 1)
    entry["limit_s"] = round(limit)
    if entry["status"] in FAILED:
        entry["log_tail"] = tail(log_path)
    return entry


def kill_group(process) -> None:
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:  # killed before it made its group
            process.kill()
    except ProcessLookupError:
        pass
    process.join(10)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def machine_info(dry_run: bool) -> dict:
    """What the parent can tell without CUDA (the environment item adds the GPU's own view)."""

    def run(*cmd) -> str | None:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
            return done.stdout.strip() if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": run("git", "rev-parse", "HEAD") or os.environ.get("GIT_COMMIT"),  # (a copy without .git)
        "git_dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "nvidia_smi": run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
        "packages": versions,
        "dry_run": dry_run,
    }


def clean(value):
    """Strict JSON: NaN and infinities as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(clean(data), indent=2, allow_nan=False) + "\n")
    os.replace(temp, path)


def cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(report: dict) -> str:
    m = report["machine"]
    gpu = m.get("gpu") or "no GPU"
    lines = [f"# gpu_check{' (dry run, CPU)' if m['dry_run'] else ''}", "",
             f"{gpu}, torch {m.get('torch')}, CUDA {m.get('cuda')}, {m['date']}, commit "
             f"{(m.get('git_commit') or '?')[:12]}{' (dirty)' if m.get('git_dirty') else ''}", "",
             "| item | kind | status | seconds | result |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for item in report["items"]:
        lines.append(f"| {item['name']} | {item['kind']} | {cell(item['status'])} | {cell(item.get('seconds'))} | "
                     f"{cell(item.get('summary', ''))} |")  # fmt: skip
    for item in report["items"]:
        rows = item.get("rows")
        if not rows:
            continue
        columns = [k for k, v in rows[0].items() if not isinstance(v, (dict, list))]
        lines += ["", f"## {item['name']}", "", "| " + " | ".join(columns) + " |",
                  "| " + " | ".join("---" for _ in columns) + " |"]  # fmt: skip
        lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny model and sizes, CUDA-only checks skipped")
    parser.add_argument("--only", nargs="+", choices=[name for name, *_ in ITEMS], help="run these items only")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all items (default: 465 on a GPU, none in a dry run); an item's "
                             "limit is cut to what is left, and items past it are skipped")  # fmt: skip
    parser.add_argument("--inject-fault", nargs="+", default=[], metavar="ITEM[:hang]",
                        help="make ITEM's comparison see a real difference (a perturbed weight) and fail, or "
                             "ITEM:hang hang until its time limit: proves the exit status and the limits")  # fmt: skip
    parser.add_argument("--limit", nargs="+", default=[], metavar="ITEM=SECONDS", help="an item's own time limit")
    args = parser.parse_args(argv)
    limits = {k: float(v) for k, v in (x.split("=", 1) for x in args.limit)}
    budget = args.budget if args.budget is not None else (None if args.dry_run else 465.0)
    out = args.out.resolve()
    for sub in ("items", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # The forkserver starts with this environment, not this sys.path (Python 3.11 drops it): PYTHONPATH
    # lets it import gpu_check_items, and with it torch, diffusers and the package, once for all items.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["gpu_check_items"])
    warm = ctx.Process(target=noop)  # the server's imports, before any item's clock starts
    warm.start()
    warm.join()
    options = {"dry_run": args.dry_run, "out": str(out), "faults": list(args.inject_fault)}
    report = {"machine": machine_info(args.dry_run), "items": []}
    start = time.monotonic()
    print(f"gpu_check{' --dry-run' if args.dry_run else ''}: {len(ITEMS)} items -> {out}", flush=True)
    for name, kind, limit, cuda_only in ITEMS:
        limit = limits.get(name, DRY_RUN_LIMIT if args.dry_run else limit)
        left = None if budget is None else budget - (time.monotonic() - start)
        if args.only and name not in args.only:
            entry = {"status": "skipped: not selected"}
        elif left is not None and left < 15:
            entry = {"status": "skipped: time budget spent"}
        else:
            limit = limit if left is None else min(limit, left)
            entry = run_item(ctx, name, cuda_only, limit, options, out)
            if entry.get("bad_fork") and ctx.get_start_method() == "forkserver":
                print("CUDA was initialized before the fork: every item from here in a fresh process (spawn)")
                ctx = multiprocessing.get_context("spawn")
                entry = run_item(ctx, name, cuda_only, limit, options, out)
        entry = {"name": name, "kind": kind, **entry}
        report["items"].append(entry)
        if name == "environment" and "machine" in entry.get("details", {}):
            report["machine"].update(entry["details"]["machine"])
        write_json(out / "gpu_check.json", report)
        (out / "gpu_check.md").write_text(markdown(report))
        print(f"{name:>26} | {entry['status']:<22} | {entry.get('seconds', 0):6.1f} s | {entry.get('summary', '')}",
              flush=True)  # fmt: skip
    failed = [i["name"] for i in report["items"] if i["status"] in FAILED]
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all passed'}; {out / 'gpu_check.json'}, "
          f"{out / 'gpu_check.md'} ({time.monotonic() - start:.0f} s)")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
