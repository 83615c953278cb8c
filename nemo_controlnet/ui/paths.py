"""The UI's file access, limited to the configured roots (``ui.roots``): every path a browser sends
is resolved (``..`` and symlinks followed) and refused unless it lies inside one of them."""

from __future__ import annotations

import os
from pathlib import Path


class OutsideRoots(PermissionError):
    """A path the browser sent resolves outside every configured root."""


class Roots:
    def __init__(self, roots: list[str | Path]):
        if not roots:
            raise ValueError("ui.roots: give at least one directory the UI may read and write")
        resolved = []
        for root in roots:
            path = Path(os.path.realpath(os.path.expanduser(str(root))))
            if not path.is_dir():
                raise FileNotFoundError(f"ui.roots: no directory {root}")
            resolved.append(path)
        self.roots = resolved

    def __iter__(self):
        return iter(self.roots)

    def resolve(self, path: str | Path, field: str = "path") -> Path:
        """The real path of ``path`` (relative ones from the first root), or ``OutsideRoots``."""
        text = str(path).strip()
        if not text:
            raise ValueError(f"{field}: empty")
        candidate = Path(os.path.expanduser(text))
        if not candidate.is_absolute():
            candidate = self.roots[0] / candidate
        # realpath follows symlinks and '..' on what exists, and normalises the rest lexically.
        real = Path(os.path.realpath(candidate))
        if not any(real == root or root in real.parents for root in self.roots):
            raise OutsideRoots(f"{field}: {text} is outside the UI's roots ({', '.join(map(str, self.roots))})")
        return real

    def problem(self, path: str | Path, field: str = "path") -> str | None:
        """The message for a path outside the roots (or empty), else None."""
        try:
            self.resolve(path, field)
        except (OutsideRoots, ValueError) as e:
            return str(e)
        return None
