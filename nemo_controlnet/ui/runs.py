"""Training runs for controlnet-ui: ``controlnet-train`` in a session of its own per run (closing the
browser, a Ctrl-C of the UI or the UI's exit leave it running), and each run's state, checkpoints,
grids, loss and metrics read back from its directory, so a restarted UI finds its runs again.

A run is ``<runs_root>/<name>``: what training writes there (config.yaml, train.log, checkpoints/,
samples/, logs/, controlnet/) plus ``ui_run.json`` (the latest launch: pid, overrides, command line,
start time; written atomically) and ``ui_process.log`` (the process's stdout and stderr, one header
line per launch). The UI's form fields become real config overrides in ``run_overrides``; ``start``
checks the composed config as the command will (``validate_train_config``) before anything starts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nemo_controlnet.config import dataset_name_problem
from nemo_controlnet.io import write_json_atomic
from nemo_controlnet.ui.overrides import (
    ProblemsError,
    add_problem,
    as_int,
    config_problems,
    field_of,
    format_override,
    override_key,
    override_problem,
)
from nemo_controlnet.ui.run_logs import ScalarReader, read_metrics

log = logging.getLogger(__name__)

RECORD = "ui_run.json"
PROCESS_LOG = "ui_process.log"
TRAIN_MODULE = "nemo_controlnet.cli.train"
TRAIN_COMMAND = "controlnet-train"  # the console script, for runs started outside the UI
STATES = ("running", "stopped", "finished", "failed", "unknown")
LAUNCH_HEADER = "# controlnet-ui launch "  # opens each launch's part of ui_process.log

# What training logs (training/callbacks.py, training/run.py, Lightning's fit loop, cli/__init__.py).
PREEMPTED = re.compile(r"preempted: checkpoint at step (\d+) written")
REACHED_MAX_STEPS = "`Trainer.fit` stopped: `max_steps="
TRAIN_LOG_START = "][nemo_controlnet.training.run][INFO] - run_dir "  # the first line of each start in train.log
ERROR_LINE = re.compile(r"^(?:controlnet-train: error: .*|\S*(?:Error|Exception|Interrupt)\b.*)$")
LOGGED_ERROR = re.compile(r"\]\[ERROR\] - (.*)$")
# The step progress bar: "step:  45%|...| 45/100 [" (logs of older versions: "Training: |...| 99/? [" after a resume).
PROGRESS = re.compile(r"(?:step|Training):[^|\n]*\|[^|\n]*\|\s*(\d+)/(\d+|\?) \[")
LOG_RECORD_START = re.compile(r"(?<=[^\n])(?=\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]\[)")
GRID = re.compile(r"^step_(\d+)\.png$")
LOCK_HOLDER = re.compile(r"^pid (\d+) on host (\S+),")

WAIT_POLL_S = 0.2


# ---- what a run looks like ------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """A run as the UI shows it. ``state``: running | stopped (by Stop, or preempted: resumable) |
    finished (reached max_steps) | failed (exited with an error; ``message`` says which) | unknown
    (not running, and nothing says how it ended: killed -9, the machine went down)."""

    name: str
    run_dir: Path
    state: str
    pid: int | None = None  # of the running process (or of the latest launch)
    returncode: int | None = None  # when this process launched it and it has ended
    started: float | None = None  # epoch seconds of the latest launch (ui_run.json), else config.yaml's mtime
    overrides: list[str] = field(default_factory=list)  # as launched (without run_dir)
    command: list[str] = field(default_factory=list)
    step: int | None = None  # the latest optimizer step the progress bar showed in this launch
    max_steps: int | None = None
    checkpoint_step: int | None = None  # the newest checkpoint's step
    checkpoint: Path | None = None
    grid: Path | None = None  # the newest validation grid, samples/step_*.png
    exported: Path | None = None  # run_dir/controlnet once exported
    message: str = ""  # one line: why it failed, where it stopped
    log: Path | None = None  # the log the tail comes from
    log_tail: str = ""


def _tail(path: Path, max_bytes: int = 1 << 16) -> str:
    """The end of a text file as a terminal shows it: progress bars redrawn with \\r keep their last
    state, and a log record printed after one starts its own line."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes:
        text = text.partition("\n")[2]  # a partial first line
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return LOG_RECORD_START.sub("\n", "\n".join(lines))


def _segment(text: str, marker: str) -> str:
    """The part of a log after the last ``marker`` line (the latest launch); all of it without one."""
    at = text.rfind(marker)
    return text[at:] if at >= 0 else text


def _cmdline(pid: int) -> list[str] | None:
    """A live process's arguments; None when it is gone, a zombie, or unreadable (no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return []  # exists, unreadable (another user's): unknown arguments
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


def _is_training(pid: int | None, run_dir: Path | None = None) -> bool:
    """``pid`` is a live ``controlnet-train`` (for ``run_dir`` when given): a pid alone may have been
    reused by any process since."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    args = _cmdline(pid)
    if args is None:
        return False
    if not Path("/proc").is_dir():
        return True  # no way to look closer
    if not any(a == TRAIN_MODULE or a.endswith(TRAIN_COMMAND) for a in args):
        return False
    return run_dir is None or f"run_dir={run_dir}" in args or format_override("run_dir", str(run_dir)) in args


def _newest_grid(samples: Path) -> Path | None:
    grids = [(int(m.group(1)), p) for p in samples.glob("step_*.png") if (m := GRID.match(p.name))]
    return max(grids)[1] if grids else None


def _last_error(segment: str) -> str:
    """The line that says why the process failed: the command's one-line error, a traceback's last
    line, or an ERROR record of train.log."""
    for line in reversed(segment.splitlines()):
        line = line.strip()
        if ERROR_LINE.match(line):
            return line
        logged = LOGGED_ERROR.search(line)
        if logged:
            return logged.group(1)
    return ""


# ---- the manager ----------------------------------------------------------------------------------------


class RunManager:
    """Training runs under ``runs_root``: start, stop (checkpoint, then exit), resume, and read back.

    ``env``: variables added to the training processes' environment. Safe to share between the
    UI's threads."""

    def __init__(self, runs_root: str | os.PathLike, env: dict[str, str] | None = None):
        self.runs_root = Path(runs_root).expanduser().resolve()
        self.env = dict(env or {})
        self._procs: dict[str, subprocess.Popen] = {}  # the processes this manager launched
        self._stop_requested: dict[str, float] = {}  # runs without a record (started outside the UI)
        self._scalars = ScalarReader()  # the loss curves' event files, read on incrementally
        self._config_cache: dict[Path, tuple[int, int | None]] = {}
        self._lock = threading.RLock()  # launching and stopping

    # -- paths and records

    def run_dir(self, name: str) -> Path:
        problem = dataset_name_problem(name)
        if problem:
            raise ProblemsError({"name": problem})
        return self.runs_root / name

    def _read_record(self, run_dir: Path) -> dict:
        try:
            record = json.loads((run_dir / RECORD).read_text())
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}

    def _update_record(self, run_dir: Path, **changes: Any) -> None:
        record = self._read_record(run_dir)
        if record:
            write_json_atomic(run_dir / RECORD, {**record, **changes})

    # -- starting

    def start(self, name: str, overrides: dict[str, Any] | list[str] = (), check: bool = True) -> RunInfo:
        """Launch ``controlnet-train run_dir=<runs_root>/<name> *overrides`` in a session of its own.
        ``overrides``: override strings as typed (``run_overrides``' list), or {config key: value}.
        Refused with ``ProblemsError`` (nothing started, nothing written) for a bad name, a run of that
        name still running, an override Hydra cannot parse, or (``check``) a config the command refuses.
        An existing run of that name continues from its newest checkpoint (train.yaml's resume: true)."""
        problems: dict[str, str] = {}
        name_problem = dataset_name_problem(name)
        if name_problem:
            raise ProblemsError({"name": name_problem})
        run_dir = self.runs_root / name
        with self._lock:
            current = self.status(name, log_lines=0)
            if current.state == "running":
                raise ProblemsError({"name": f"a run named {name!r} is running (pid {current.pid}); stop it first"})
            try:
                items = (
                    [format_override(k, v) for k, v in overrides.items()]
                    if isinstance(overrides, dict)
                    else [str(o) for o in overrides]
                )
            except ValueError as error:
                raise ProblemsError({"overrides": str(error)}) from None
            for item in items:
                problem = override_problem(item)
                if problem:
                    add_problem(problems, field_of(override_key(item)), problem)
                elif override_key(item) == "run_dir":
                    add_problem(problems, "name", "run_dir is the run's name under the runs directory; leave it out")
            if not problems and check:
                problems = config_problems(run_dir, items)
            if problems:
                raise ProblemsError(problems)
            return self._launch(name, items, cwd=Path.cwd())

    def resume(self, name: str) -> RunInfo:
        """Launch the run again with the overrides it was launched with (ui_run.json; for a run started
        outside the UI, Hydra's record of its overrides) and ``resume=true``: training continues from the
        newest complete checkpoint."""
        run_dir = self.run_dir(name)
        with self._lock:
            current = self.status(name, log_lines=0)
            if current.state == "running":
                raise ProblemsError({"name": f"{name!r} is running (pid {current.pid})"})
            record = self._read_record(run_dir)
            if record:
                overrides, cwd = list(record.get("overrides", [])), Path(record.get("cwd") or Path.cwd())
            elif (run_dir / "hydra" / "overrides.yaml").is_file():
                overrides = [str(o) for o in OmegaConf.load(run_dir / "hydra" / "overrides.yaml")]
                cwd = Path.cwd()
            else:
                raise ProblemsError({"name": f"{run_dir}: no record of how the run was launched ({RECORD})"})
            overrides = [o for o in overrides if override_key(o) not in ("run_dir", "resume")] + ["resume=true"]
            return self._launch(name, overrides, cwd=cwd if cwd.is_dir() else Path.cwd())

    def _launch(self, name: str, overrides: list[str], cwd: Path) -> RunInfo:
        run_dir = self.runs_root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", TRAIN_MODULE, format_override("run_dir", str(run_dir)), *overrides]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with (run_dir / PROCESS_LOG).open("ab") as out:
            started = time.time()
            header = f"\n{LAUNCH_HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')}: {subprocess.list2cmdline(command)}\n"
            out.write(header.encode())
            out.flush()
            # A session of its own: a Ctrl-C of the UI's terminal (its process group) or the UI's exit
            # does not reach the run; stop() signals it by pid.
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self._procs[name] = proc
        self._stop_requested.pop(name, None)
        record = {
            "name": name,
            "run_dir": str(run_dir),
            "pid": proc.pid,
            "host": socket.gethostname(),
            "overrides": overrides,
            "command": command,
            "cwd": str(cwd),
            "started": started,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "launches": int(self._read_record(run_dir).get("launches", 0)) + 1,
            "stop_requested": None,
        }
        write_json_atomic(run_dir / RECORD, record)
        log.info("started run %s (pid %d): %s", name, proc.pid, subprocess.list2cmdline(command))
        return self.status(name)

    # -- stopping

    def stop(self, name: str, timeout: float = 120.0, force: bool = False) -> RunInfo:
        """SIGTERM to the run's training process: it finishes the step, writes a checkpoint and exits
        (training/callbacks.py: Preemption). Returns once it has exited, or after ``timeout`` seconds
        with the run still ``running``; ``force`` then kills its whole process group (no checkpoint)."""
        run_dir = self.run_dir(name)
        with self._lock:
            pid = self._live_pid(name, run_dir)
            if pid is None:
                return self.status(name)
            self._stop_requested[name] = time.time()
            self._update_record(run_dir, stop_requested=self._stop_requested[name])
            log.info("stopping run %s (pid %d)", name, pid)
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(name, pid, run_dir, timeout) and force:
            log.warning("run %s did not stop within %.0fs: killing its process group", name, timeout)
            try:
                os.killpg(pid, signal.SIGKILL)  # its own session: the group is the run and its loader workers
            except ProcessLookupError:
                pass
            self._wait_exit(name, pid, run_dir, 30.0)
        return self.status(name)

    def _wait_exit(self, name: str, pid: int, run_dir: Path, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        proc = self._procs.get(name)
        while True:
            if proc is not None and proc.pid == pid:
                if proc.poll() is not None:
                    return True
            elif not _is_training(pid, None):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(WAIT_POLL_S)

    def wait(self, name: str, timeout: float | None = None) -> RunInfo:
        """Until the run is no longer running (or ``timeout`` seconds): its final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._live_pid(name, self.run_dir(name)) is not None:
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(WAIT_POLL_S)
        return self.status(name)

    # -- reading back

    def _lock_holder(self, run_dir: Path) -> int | None:
        try:
            match = LOCK_HOLDER.match((run_dir / ".lock").read_text())
        except OSError:
            return None
        return int(match.group(1)) if match and match.group(2) == socket.gethostname() else None

    def _live_pid(self, name: str, run_dir: Path) -> int | None:
        """The pid of the run's live training process, whoever started it; None when there is none."""
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is None:
            return proc.pid
        record = self._read_record(run_dir)
        pid = record.get("pid")
        if record.get("host") == socket.gethostname() and isinstance(pid, int) and _is_training(pid, run_dir):
            return pid
        holder = self._lock_holder(run_dir)  # started outside the UI: the pid training's lock records
        return holder if _is_training(holder) else None

    def _max_steps(self, run_dir: Path, overrides: list[str]) -> int | None:
        path = run_dir / "config.yaml"
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime is not None:
            cached = self._config_cache.get(path)
            if cached and cached[0] == mtime:
                return cached[1]
            try:
                value = OmegaConf.select(OmegaConf.load(path), "trainer.max_steps")
                value = value if isinstance(value, int) else None
            except Exception:  # noqa: BLE001 - being rewritten, or not ours: unknown
                value = None
            self._config_cache[path] = (mtime, value)
            return value
        for item in reversed(overrides):
            if override_key(item) == "trainer.max_steps":
                return as_int(item.partition("=")[2])
        return None

    def status(self, name: str, log_lines: int = 40) -> RunInfo:
        """The run's state and what it has written so far (``log_lines`` of its log's tail)."""
        from nemo_controlnet.training.checkpoint import list_checkpoints

        run_dir = self.run_dir(name)
        record = self._read_record(run_dir)
        proc = self._procs.get(name)
        returncode = proc.poll() if proc is not None else None
        pid = self._live_pid(name, run_dir)
        process_log, train_log = run_dir / PROCESS_LOG, run_dir / "train.log"
        if record and process_log.is_file():
            log_path, segment = process_log, _segment(_tail(process_log), LAUNCH_HEADER)
        else:
            log_path, segment = train_log, _segment(_tail(train_log), TRAIN_LOG_START)
        checkpoints = list_checkpoints(run_dir / "checkpoints")
        started = record.get("started")
        if started is None and (run_dir / "config.yaml").is_file():
            started = (run_dir / "config.yaml").stat().st_mtime
        progress = PROGRESS.findall(segment)
        info = RunInfo(
            name=name,
            run_dir=run_dir,
            state="running",
            pid=pid if pid is not None else record.get("pid"),
            returncode=returncode,
            started=started,
            overrides=list(record.get("overrides", [])),
            command=list(record.get("command", [])),
            step=int(progress[-1][0]) if progress else None,
            max_steps=self._max_steps(run_dir, list(record.get("overrides", []))),
            checkpoint_step=checkpoints[-1][0] if checkpoints else None,
            checkpoint=checkpoints[-1][1] if checkpoints else None,
            grid=_newest_grid(run_dir / "samples"),
            exported=run_dir / "controlnet" if (run_dir / "controlnet" / "config.json").is_file() else None,
            log=log_path if log_path.is_file() else None,
            log_tail="\n".join(segment.splitlines()[-log_lines:]) if log_lines > 0 else "",
        )
        if pid is None:
            stop_requested = bool(record.get("stop_requested")) or name in self._stop_requested
            info.state, info.message = self._ended(segment, returncode, stop_requested)
        return info

    @staticmethod
    def _ended(segment: str, returncode: int | None, stop_requested: bool) -> tuple[str, str]:
        """How a launch that is no longer running ended: its exit status when this process launched it,
        else what its log says (``segment``: the launch's part)."""
        preempted = PREEMPTED.findall(segment)
        if preempted:
            return "stopped", f"stopped with a checkpoint at step {preempted[-1]}"
        if returncode == 0:
            return "finished", ""
        signalled = returncode is not None and (returncode < 0 or returncode - 128 in (signal.SIGTERM, signal.SIGKILL))
        if stop_requested and (returncode is None or signalled):  # ended by the signal, before training took it
            return "stopped", "stopped before training began (no checkpoint written by this launch)"
        error = _last_error(segment)
        if returncode is not None:
            return "failed", error or f"exited with status {returncode}"
        if REACHED_MAX_STEPS in segment and not _last_error(segment.rpartition(REACHED_MAX_STEPS)[2]):
            return "finished", ""  # and nothing failed after it (the export)
        if error:
            return "failed", error
        return "unknown", "not running, and its log does not say how it ended"

    def list_runs(self) -> list[RunInfo]:
        """Every run under runs_root (a directory with config.yaml or ui_run.json), newest first."""
        if not self.runs_root.is_dir():
            return []
        infos = []
        for path in self.runs_root.iterdir():
            if path.is_dir() and not dataset_name_problem(path.name):
                if (path / RECORD).is_file() or (path / "config.yaml").is_file():
                    infos.append(self.status(path.name, log_lines=0))
        return sorted(infos, key=lambda i: i.started or 0.0, reverse=True)

    def loss_curve(self, name: str, tag: str = "train/loss") -> list[tuple[int, float]]:
        """(step, value) of ``tag`` as the run logged it (run_logs.ScalarReader.loss_curve)."""
        return self._scalars.loss_curve(self.run_dir(name), tag)

    def metrics(self, name: str) -> list[dict]:
        """The hint-following metrics of each validation, by step (run_logs.read_metrics)."""
        return read_metrics(self.run_dir(name))
