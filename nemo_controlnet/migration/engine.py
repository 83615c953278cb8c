"""What every mapping step shares: a NeMo config's leaves, the record of each one's status, and the lookup of
its row in the key table (rules.py). A key the steps handle without a row there is a bug, raised at once."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_controlnet.migration.rules import RULES, Rule

MAPPED, SAME, NOT_MAPPED = "mapped", "the same", "not mapped"
UNKNOWN = "not a key of NeMo's ControlNet recipe that controlnet-migrate knows"
MOVABLE = ("data", "optim", "image_logger", "nsys_profile")  # under model: in NeMo's file; top level: read too


@dataclass
class Migration:
    """The outcome: our values and group choices, and for every NeMo leaf its status with our key or why."""

    source: str
    leaves: dict[str, Any]
    choices: dict[str, str] = field(default_factory=lambda: {"model": "sd15", "data": "shards", "trainer": "default"})
    values: dict[str, Any] = field(default_factory=dict)  # our dotted key -> value
    status: dict[str, tuple[str, str]] = field(default_factory=dict)  # NeMo key -> (status, our key or reason)
    notes: list[str] = field(default_factory=list)

    def keys(self, kind: str) -> list[str]:
        return [k for k, (s, _) in self.status.items() if s == kind]


def rule_for(key: str) -> Rule | None:
    """The row of ``RULES`` for a (canonical) NeMo key: an exact row first, then the first pattern."""
    exact = [r for r in RULES if r.nemo == key]
    return (exact or [r for r in RULES if fnmatch.fnmatchcase(key, r.nemo)] or [None])[0]


def canonical(key: str) -> str:
    return f"model.{key}" if key.split(".")[0] in MOVABLE else key


def show(value: Any, width: int = 70) -> str:
    text = {True: "true", False: "false"}.get(value, str(value)) if isinstance(value, bool) else str(value)
    text = "null" if value is None else text
    return text if len(text) <= width else text[: width - 3] + "..."


def _leaves(node, prefix: str = "") -> dict[str, Any]:
    """Every leaf as a dotted key: scalars, lists (one value each) and empty mappings; interpolations resolved
    where they can be (NeMo's own resolvers cannot be: those values stay as written)."""
    out: dict[str, Any] = {}
    for key in node.keys():
        dotted = f"{prefix}{key}"
        child = node._get_node(key)
        if isinstance(child, DictConfig) and len(child):
            out.update(_leaves(child, f"{dotted}."))
            continue
        try:
            value = node[key]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # an unknown resolver, a missing value: keep the text
            value = child._value() if not isinstance(child, (DictConfig, ListConfig)) else str(child)
        out[dotted] = value
    return out


class Mapper:
    """Records each NeMo key it handles; every key it names must have a row in RULES (the docs table)."""

    def __init__(self, cfg: DictConfig, source: str):
        leaves = _leaves(cfg)
        self.m = Migration(source, leaves)
        self.actual = {canonical(k): k for k in leaves}

    def has(self, key: str) -> bool:
        return key in self.actual

    def get(self, key: str, default: Any = None) -> Any:
        value = self.m.leaves.get(self.actual.get(key, ""), default)
        return default if value is None else value

    def _record(self, key: str, status: str, text: str) -> None:
        if rule_for(key) is None:
            raise AssertionError(f"{key} is handled but has no row in migration/rules.py")
        if key in self.actual:
            self.m.status[self.actual[key]] = (status, text)

    def put(self, key: str, ours: str, value: Any) -> None:
        """NeMo's ``key`` (when present) sets our ``ours``."""
        if self.has(key):
            self.m.values[ours] = value
            self._record(key, MAPPED, ours)

    def mapped(self, key: str, ours: str) -> None:
        self._record(key, MAPPED, ours)

    def same(self, key: str, why: str | None = None) -> None:
        self._record(key, SAME, why or rule_for(key).note)

    def skip(self, key: str, why: str | None = None) -> None:
        self._record(key, NOT_MAPPED, why or rule_for(key).note)

    def check(self, key: str, expected: Any, why_not: str) -> None:
        """The same when absent or ``expected``; otherwise not mapped, with why."""
        if self.get(key, expected) == expected:
            self.same(key)
        else:
            self.skip(key, why_not)
