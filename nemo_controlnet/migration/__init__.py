"""A NeMo ControlNet config -> an experiment config of ours (controlnet-migrate).

NeMo's multimodal ControlNet recipe (examples/multimodal/text_to_image/controlnet/conf/controlnet_v1-5.yaml,
deleted from NeMo in 2025) configured the same parts under other names. ``RULES`` is the one table of what each
of its keys becomes here: a key of ours, a model config chosen by architecture, "the same" (ours works that way;
nothing to set) or "not mapped" with the reason; docs/migrating_from_nemo.md shows it (``key_table``). ``migrate``
walks every leaf of a NeMo config, and each one ends up mapped, the same, or listed as not mapped with why.
It sits beside config.py: it reads YAML (the NeMo file, our model configs) as data and never builds a model.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.config import ConfigError, output_dir_problem
from nemo_controlnet.io import atomic_path
from nemo_controlnet.migration.engine import (MAPPED, NOT_MAPPED, SAME, UNKNOWN, Mapper, Migration, canonical,
                                              rule_for, show)
from nemo_controlnet.migration.model import map_model
from nemo_controlnet.migration.rules import RULES
from nemo_controlnet.migration.run import map_data, map_run, map_training

HINT_RANGE = (
    "Hints: ours are [0, 1] RGB in training, validation and inference alike; NeMo trained on [-1, 1] hints "
    "and inferred on [0, 1] BGR ones. A ControlNet trained here expects [0, 1] RGB hints."
)


def key_table() -> str:
    """The markdown table of ``RULES`` (docs/migrating_from_nemo.md has it verbatim; a test checks)."""
    lines = ["| NeMo key | ours | how, or why not |", "| --- | --- | --- |"]
    for r in RULES:
        ours = {"same": "the same", "skip": "not mapped"}.get(r.kind, r.ours)
        lines.append(f"| `{r.nemo}` | {ours.replace('|', '&#124;')} | {r.note.replace('|', '&#124;')} |")
    return "\n".join(lines)


def read_nemo_config(path: str | os.PathLike) -> DictConfig:
    problem = None if path and Path(path).is_file() else f"no such file: {path}"
    if problem is None and not os.access(path, os.R_OK):
        problem = f"permission denied: {path} is not readable"
    if problem:
        raise ConfigError(f"nemo_config={str(path)!r}: {problem}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"nemo_config={str(path)!r}: not readable as YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(cfg, DictConfig) or OmegaConf.select(cfg, "model.control_stage_config") is None:
        raise ConfigError(f"nemo_config={str(path)!r}: not a NeMo ControlNet config (no model.control_stage_config)")
    return cfg


def migrate(cfg: DictConfig, source: str = "nemo_config") -> Migration:
    """Every leaf of a NeMo ControlNet config: mapped to ours, the same in ours, or not mapped with why."""
    x = Mapper(cfg, source)
    map_model(x)
    factor = 2 ** (len(x.get("model.first_stage_config.ddconfig.ch_mult", [1, 2, 4, 4])) - 1)
    map_data(x, factor)
    map_training(x)
    map_run(x)
    for key in x.m.leaves:  # what no code above handled: by its row in RULES, or unknown
        if key not in x.m.status:
            rule = rule_for(canonical(key))
            if rule is None:
                x.m.status[key] = (NOT_MAPPED, UNKNOWN)
            elif rule.kind in ("same", "skip"):
                x.m.status[key] = (SAME if rule.kind == "same" else NOT_MAPPED, rule.note)
            else:  # a key the code maps, left unused by the values around it
                x.m.status[key] = (NOT_MAPPED, f"not used with this config's other values ({rule.note})")
    x.m.notes.append(HINT_RANGE)
    return x.m


# -- writing ----------------------------------------------------------------------------------------------------


def experiment_name(out: str | os.PathLike) -> tuple[Path, str]:
    """``<dir>/experiment/<name>.yaml`` -> (<dir>, <name>): what --config-dir and +experiment= take."""
    out = Path(out)
    if out.suffix != ".yaml" or out.parent.name != "experiment":
        raise ConfigError(f"out={str(out)!r}: expected <dir>/experiment/<name>.yaml (so that controlnet-train "
                          "--config-dir <dir> +experiment=<name> finds it)")  # fmt: skip
    return out.parent.parent, out.stem


def render(m: Migration, out: str | os.PathLike) -> str:
    """The experiment config: a comment block (what was mapped, what not and why), defaults, values."""
    config_dir, name = experiment_name(out)
    lines = ["# @package _global_", f"# Migrated from NeMo by controlnet-migrate: {m.source}",
             f"#   controlnet-train --config-dir {config_dir} +experiment={name}", "#"]  # fmt: skip
    for kind in (NOT_MAPPED, MAPPED, SAME):
        keys = m.keys(kind)
        lines.append(f"# {kind} ({len(keys)}):")
        for key in keys:
            text = m.status[key][1]
            lines.append(f"#   {key}={show(m.leaves[key], 40)} -> {text}" if kind == MAPPED else
                         f"#   {key}={show(m.leaves[key], 40)}: {text}")  # fmt: skip
    lines += ["#", "# notes:", *(f"#   {note}" for note in m.notes)]
    body: dict = {"defaults": [{f"override /{group}": choice} for group, choice in m.choices.items()] + ["_self_"]}
    tree = OmegaConf.create()
    for key, value in m.values.items():
        OmegaConf.update(tree, key, value, force_add=True)
    body.update(OmegaConf.to_container(tree))
    return "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.create(body))


def report(m: Migration, out: str | os.PathLike) -> str:
    config_dir, name = experiment_name(out)
    not_mapped = m.keys(NOT_MAPPED)
    lines = [f"wrote {out}: " + ", ".join(f"{g}={c}" for g, c in m.choices.items())
             + f"; {len(m.keys(MAPPED))} keys mapped, {len(m.keys(SAME))} the same here, {len(not_mapped)} not mapped",
             f"train with: controlnet-train --config-dir {config_dir} +experiment={name}",
             f"not mapped ({len(not_mapped)}):",
             *(f"  {k}={show(m.leaves[k], 40)}: {m.status[k][1]}" for k in not_mapped),
             "notes:", *(f"  {note}" for note in m.notes)]  # fmt: skip
    return "\n".join(lines)


def migrate_file(nemo_config: str, out: str, overwrite: bool = False) -> str:
    """controlnet-migrate: read, map, write ``out`` atomically; returns the report to print."""
    experiment_name(out)
    if Path(out).exists() and not overwrite:
        raise ConfigError(f"out={out!r}: exists; overwrite=true replaces it")
    problem = output_dir_problem(Path(out).parent)
    if problem:
        raise ConfigError(f"out={out!r}: cannot create or write the directory ({problem})")
    m = migrate(read_nemo_config(nemo_config), str(nemo_config))
    text = render(m, out)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return report(m, out)
