"""Thin Hydra mains; the configs ship inside the package so the commands work from any directory.

What every main shares, so that a user's mistake reads as one line naming the argument, key or path:
``entry_point`` takes ``--verbose`` off the command line and parses the overrides with Hydra's own
parser before Hydra runs (a grammar error names its argument and the quoting that works, exit 2);
``user_errors`` turns a user error inside the task (a bad config value, a missing or unwritable path, a
full disk) into one line on stderr, exit 1; ``OutputDirCheck`` (a Hydra callback in the configs) names
the key of an output directory that cannot be created before Hydra tries to create it. With
``--verbose`` or ``HYDRA_FULL_ERROR=1`` (Hydra's own switch) the full traceback is shown instead.
``entry_point`` also silences the dependencies' known start-up notices (notices.py), and ``--help`` lists
the config groups of the command only (``command_help``, set as hydra.help.template in each command's config).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet import notices
from nemo_controlnet.config import ConfigError, output_dir_problem
from nemo_controlnet.io import UserError

CONFIG_PATH = "../conf"
VERSION_BASE = "1.3"
VERBOSE_FLAG = "--verbose"
# UserError: refused checkpoints and weights (altered, checksum mismatch), a run directory in use.
USER_ERRORS = (ConfigError, UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space left; over quota
EXIT_USER_ERROR = 1
EXIT_USAGE = 2

log = logging.getLogger(__name__)
_prog = "nemo_controlnet"  # the running command's name, for messages (set by entry_point)


def rank_suffix() -> str:
    """``_rankN`` for rank N > 0 of a job whose tasks the launcher started (srun: SLURM_PROCID;
    torchrun: RANK), so each rank keeps its own log file; "" for rank 0 and single processes."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if os.environ.get("SLURM_STEP_ID") else None)
    return f"_rank{rank}" if rank and rank != "0" else ""


OmegaConf.register_new_resolver("rank_suffix", rank_suffix, replace=True)  # conf/train.yaml: the log file

# Hydra's default help (hydra/conf/hydra/help/default.yaml) with the command's own groups where it has
# $APP_CONFIG_GROUPS, which lists every group under conf/: prep's under train, and the partials.
HELP_TEMPLATE = """{header}
{groups}== Config ==
Override anything in the config (foo.bar=value)

$CONFIG

{footer}"""
GROUPS_SECTION = """== Configuration groups ==
Compose your configuration from those groups (group=option; +group=option for a group marked +)

{lines}

"""
# Options that only other options of their group build on, not choices. A leading "_" says so
# (data/_common.yaml); model/options.yaml predates that convention.
PARTIALS = {"model/options"}


def group_options(group: str) -> list[str]:
    """The options a user can pick in ``group`` (conf/ and Hydra's plugins), partials left out."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    if not GlobalHydra.instance().is_initialized():
        return []
    options = GlobalHydra.instance().config_loader().get_group_options(group, ObjectType.CONFIG)
    return sorted(o for o in options if not o.startswith("_") and f"{group}/{o}" not in PARTIALS)


def command_help(*groups: str, _root_: DictConfig) -> str:
    """``hydra.help.template`` for a command that uses ``groups`` (``${command_help:model,data}`` in
    its config): Hydra's help, listing those groups only; a group outside the command's defaults list
    is marked +, as Hydra wants it added (+experiment=...). $CONFIG is left for Hydra to fill."""
    choices = OmegaConf.select(_root_, "hydra.runtime.choices", default=None) or {}
    lines = [f"{'' if group in choices else '+'}{group}: {', '.join(group_options(group))}" for group in groups]
    section = GROUPS_SECTION.format(lines="\n".join(lines)) if groups else ""
    return HELP_TEMPLATE.format(header=_root_.hydra.help.header, groups=section, footer=_root_.hydra.help.footer)


OmegaConf.register_new_resolver("command_help", command_help, replace=True)  # conf/*.yaml: hydra.help.template


def verbose() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERRORS) or (isinstance(error, OSError) and error.errno in DISK_FULL)


def user_message(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: the worker's own last line
        message = message.strip().splitlines()[-1]
    return message


def _log_to_files(message: str) -> None:
    """Into the run's log file (train.log), not again onto the console: stderr has it already."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exit_with(message: str, status: int) -> None:
    sys.stderr.write(f"{_prog}: error: {message}\n")
    raise SystemExit(status)


@contextmanager
def user_errors() -> Iterator[None]:
    """Around a task: a user error ends the command as one message on stderr (and in the run's log),
    status 1; anything else, or any error with ``--verbose``, goes on to Hydra's traceback."""
    try:
        yield
    except Exception as error:
        if not is_user_error(error):
            raise
        _log_to_files(user_message(error))
        if verbose():
            raise
        exit_with(user_message(error), EXIT_USER_ERROR)


def override_error(argument: str) -> str | None:
    """Why Hydra's override grammar refuses ``argument``, with the quoting that works; None if it parses."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        OverridesParser.create().parse_overrides([argument])
        return None
    except OverrideParseException as error:  # Hydra's lines: the parser's complaint, and a link
        lines = [line for line in str(error).splitlines() if not line.startswith(("See https", "Error parsing"))]
        reason = (lines or [str(error)])[0]
    key, equals, value = argument.partition("=")
    if not equals:
        return f"{argument}: not an override (key=value, +key=value or ~key); Hydra says: {reason}"
    bad = re.search(r"(?:input|at:) '(.)'", reason)
    what = f"Hydra cannot parse {bad.group(1)!r} in a value" if bad else f"Hydra cannot parse the value ({reason})"
    # Hydra's quotes keep the value a plain string; the shell's quotes around them reach Hydra intact.
    quoted = f'{key}="{value}"' if '"' not in value else f"{key}='{value}'"
    return f"{argument}: {what}; quote the value for Hydra inside the shell's quotes: {shlex.quote(quoted)}"


def check_overrides(argv: list[str]) -> None:
    """Parse the command line's overrides as Hydra will, one at a time, to name the one that fails."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    for argument in args.overrides:
        problem = override_error(argument)
        if problem:
            exit_with(problem, EXIT_USAGE)
    # Hydra keeps the last of repeated keys silently, as scripts that append overrides to defaults
    # rely on; but paths that differ only in a number are an unquoted brace pattern that bash
    # expanded (data.shards=/d/s-{0..2}.tar -> three overrides), and training would read one shard.
    values: dict[str, list[str]] = {}
    for argument in args.overrides:
        key, _, value = argument.partition("=")
        values.setdefault(key.lstrip("+~"), []).append(value)
    for key, seen in values.items():
        if expanded_braces(seen):
            example = shlex.quote(f'{key}="{brace_pattern(seen)}"')
            shown = " ".join(f"{key}={v}" for v in seen[:3]) + (" ..." if len(seen) > 3 else "")
            exit_with(f"{key} is given {len(seen)} times ({shown}): the shell expanded an unquoted brace pattern; "
                      f"quote it for Hydra inside the shell's quotes: {example}", EXIT_USAGE)  # fmt: skip


def _split(values: list[str]) -> tuple[str, list[str], str]:
    """The common prefix and suffix of ``values``, and what differs between them."""
    prefix = os.path.commonprefix(values).rstrip("0123456789")  # whole numbers differ: 000 vs 001
    suffix = os.path.commonprefix([v[len(prefix) :][::-1] for v in values])[::-1].lstrip("0123456789")
    return prefix, [v[len(prefix) : len(v) - len(suffix)] for v in values], suffix


def expanded_braces(values: list[str]) -> bool:
    """Several distinct paths that differ only in a number: bash's expansion of ``{0..N}``."""
    if len(values) < 2 or len(set(values)) != len(values) or not all("/" in v or ".tar" in v for v in values):
        return False
    return all(m.isdigit() for m in _split(values)[1])


def brace_pattern(values: list[str]) -> str:
    prefix, middles, suffix = _split(values)
    return f"{prefix}{{{middles[0]}..{middles[-1]}}}{suffix}"


def entry_point(hydra_main: Callable[[], Any], prog: str) -> Callable[[], None]:
    """The console script around a ``@hydra.main`` function."""

    def main() -> None:
        global _prog
        _prog = prog
        notices.install()
        if VERBOSE_FLAG in sys.argv[1:]:
            sys.argv[1:] = [a for a in sys.argv[1:] if a != VERBOSE_FLAG]
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own switch: full tracebacks, here and in children
        check_overrides(sys.argv[1:])
        hydra_main()

    main.__doc__ = hydra_main.__doc__
    return main


class OutputDirCheck(Callback):
    """A Hydra callback (``hydra.callbacks`` in a config): before Hydra creates the job's directory, the
    output directories named by ``keys`` and ``hydra.run.dir`` are checked, so one that cannot be
    created is named by its key instead of surfacing as Hydra's traceback."""

    def __init__(self, keys: list[str] = ()):
        self.keys = list(keys)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        for key in [*self.keys, "hydra.run.dir"]:
            path = OmegaConf.select(config, key, throw_on_missing=False, default=None)
            problem = output_dir_problem(path) if isinstance(path, str) and path else None
            if problem:
                message = f"{key}={path!r}: cannot create or write the directory ({problem})"
                if verbose():  # the message, then Hydra's own attempt and its full traceback
                    sys.stderr.write(f"{_prog}: error: {message}\n")
                    return
                exit_with(message, EXIT_USER_ERROR)
