"""Every command line of ours in the docs runs as written: through bash, as a user's shell parses it, with
``--cfg job`` appended (Hydra composes and prints the config without running the job).

Commands are taken from README.md, docs/*.md and examples/*/README.md: fenced code blocks (backslash
continuations joined, comments dropped) and inline code spans (which may wrap lines). A command is a
console script of ours (``controlnet-train`` ...), ``python -m nemo_controlnet.cli.<name>``, or the
nemo_controlnet part of ``torchrun ... -m nemo_controlnet.cli.train ...``. Paths such as /data/... need
not exist for ``--cfg job``. A command that cannot run here is listed in ``NOT_RUN`` with its reason.
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")),
        *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "examples").glob("*/README.md"))]  # fmt: skip
COMMANDS = ("train", "prep", "generate", "eval", "synth", "export", "ui", "init", "migrate")
# A console script of ours (also as .venv/bin/controlnet-train), or python -m / torchrun -m of a main.
SCRIPT = re.compile(r"(?:^|(?<=\s))(?:[\w.$/-]*/)?controlnet-(?:%s)(?=\s|$)" % "|".join(COMMANDS))
MODULE = re.compile(r"(?:^|(?<=\s))-m\s+(nemo_controlnet\.cli\.\S+)(?=\s|$)")
MULTIRUN = re.compile(r"(?<=\s)(?:-m|--multirun)(?=\s|$)")

# Commands the test cannot run, each with the reason. Every entry must still be in the docs.
NOT_RUN = {
    # A placeholder for any of the mains, not a command.
    "python -m nemo_controlnet.cli.<name>": "placeholder <name>",
    # The experiment the documented controlnet-migrate writes; tests/test_migrate.py runs this on one it wrote.
    "controlnet-train --config-dir configs +experiment=controlnet_v1-5": "needs the file controlnet-migrate writes",
}


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # as the docs write it (our part of the line)

    def runnable(self) -> str:
        """The bash command line the test runs: multirun's -m dropped, since Hydra refuses --cfg with
        --multirun (the job's config is composed the same way; nothing is launched either way)."""
        text = self.text
        if SCRIPT.match(text):
            text = MULTIRUN.sub("", text)
        return f"{text} --cfg job"


def shell_split(line: str) -> list[str]:
    """``line`` cut at unquoted ``&&``, ``||``, ``;`` and ``|``, and without its ``#`` comment, the way
    bash reads them (quotes and backslashes respected)."""
    pieces, current, quote, i = [], [], None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            current.append(ch)
            if ch == "\\" and quote == '"' and i + 1 < len(line):
                current.append(line[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch == "\\" and i + 1 < len(line):
            current += [ch, line[i + 1]]
            i += 1
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == "#" and (not current or current[-1].isspace()):
            break
        elif ch in ";|&":
            pieces.append("".join(current))
            current = []
            while i + 1 < len(line) and line[i + 1] in ";|&":
                i += 1
        else:
            current.append(ch)
        i += 1
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


def ours(piece: str) -> str | None:
    """Our command in one shell command: from the console script on, or ``python -m`` and the rest."""
    script = SCRIPT.search(piece)
    module = MODULE.search(piece)
    if script and (not module or script.start() < module.start()):
        return piece[script.start():]
    if module:
        return f"python -m {module.group(1)}{piece[module.end():]}"
    return None


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every shell line: fenced blocks with continuations joined, and inline
    code spans (joined when they wrap)."""
    lines = path.read_text().splitlines()
    out, prose, fence, pending = [], [], None, None
    for number, line in enumerate(lines, 1):
        marker = re.match(r"\s*(```+|~~~+)", line)
        if fence is None and marker:
            fence = marker.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
                continue
            start, text = pending or (number, "")
            text += line.strip() if pending else line
            if text.endswith("\\"):
                pending = (start, text[:-1] + " ")
            else:
                pending = None
                out.append((start, text))
            continue
        prose.append((number, line))
    # Inline spans, paragraph by paragraph (a span may wrap but never crosses a blank line).
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        if paragraph:
            text = "\n".join(t for _, t in paragraph)
            for span in re.finditer(r"(`+)(.+?)\1", text, re.S):
                first = paragraph[0][0] + text.count("\n", 0, span.start())
                out.append((first, " ".join(span.group(2).split())))
        paragraph = []
    return out


def doc_commands() -> list[DocCommand]:
    found = []
    for name in DOCS:
        for number, line in code_lines(REPO / name):
            for piece in shell_split(line):
                text = ours(piece)
                if text:
                    found.append(DocCommand(f"{name}:{number}", text))
    return found


def run_in_bash(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_docs_have_our_commands():
    commands = doc_commands()
    texts = [c.text for c in commands]
    assert len(commands) >= 25, texts
    assert {c.where.split(":")[0] for c in commands} == {
        "README.md", "docs/architecture.md", "docs/data.md", "docs/performance.md", "docs/slurm.md", "docs/ui.md",
        "docs/migrating_from_nemo.md", "docs/diffusers_arguments.md", "docs/control_train.md",
        "examples/fill50k/README.md"}
    assert {t.split()[0] for t in texts} >= {*(f"controlnet-{c}" for c in COMMANDS), "python"}, texts
    assert any(t.startswith("python -m nemo_controlnet.cli.train trainer=ddp_bf16") for t in texts)  # torchrun
    for text in NOT_RUN:  # the allow-list does not outlive its commands
        assert text in texts, f"NOT_RUN lists {text!r}, which no document shows any more"


def test_every_documented_command_runs_as_written(tmp_path):
    # Relative paths in the docs (.venv/bin/controlnet-train) resolve as in the repository root; the
    # commands run in an empty directory otherwise, so nothing a command might write lands in the repo.
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    where: dict[str, list[str]] = {}  # each distinct command runs once
    for c in doc_commands():
        if c.text not in NOT_RUN:
            where.setdefault(c.runnable(), []).append(c.where)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(where, pool.map(lambda command: run_in_bash(command, tmp_path), where)))
    failures = [
        f"{', '.join(where[command])}: {command}\n    exit {r.returncode}: {r.stderr.strip()[-800:]}"
        for command, r in results.items()
        if r.returncode != 0 or not r.stdout.strip()
    ]
    commands = where
    assert not failures, f"{len(failures)} of {len(commands)} documented commands fail:\n" + "\n".join(failures)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".venv"]  # --cfg job wrote nothing


@pytest.mark.parametrize(
    "line, expected",
    [
        ("x && .venv/bin/controlnet-train   # the main job", ["x", ".venv/bin/controlnet-train"]),
        ('controlnet-prep source.caption="a # b" out_dir=/o; ls', ['controlnet-prep source.caption="a # b" out_dir=/o',
                                                                   "ls"]),
        ("a 'x|y' | b", ["a 'x|y'", "b"]),
    ],
)  # fmt: skip
def test_shell_split(line, expected):
    assert shell_split(line.rstrip("\n")) == expected


def test_ours_finds_the_nemo_controlnet_part():
    assert ours("docker run -v /d:/d img controlnet-train trainer=gpu") == "controlnet-train trainer=gpu"
    torchrun = "torchrun --nnodes 2 --rdzv-endpoint $HEAD:29500 -m nemo_controlnet.cli.train a=1 b=2"
    assert ours(torchrun) == "python -m nemo_controlnet.cli.train a=1 b=2"
    assert ours('"$PY" -m nemo_controlnet.cli.synth x=1') == "python -m nemo_controlnet.cli.synth x=1"
    assert ours("evaluate.py (controlnet-eval)") is None  # prose in a layout block
    assert ours("sbatch scripts/slurm/train.sbatch run_dir=x") is None
