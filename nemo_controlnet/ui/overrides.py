"""The Runs form's fields -> ``controlnet-train`` overrides, checked as the command checks the composed
config (``validate_train_config``) before anything starts; problems keyed by the field that set the key.
Also Hydra's compose API for the UI, one composition at a time (Gradio runs handlers in threads)."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.config import PRECISIONS, ConfigError, validate_train_config
from nemo_controlnet.data.layout import MANIFEST, find_images

# The UI's fields and the config keys they set: a problem the composed config has with a key is shown
# beside the field that set it.
FIELD_KEYS = {
    "model": "model",
    "model.path": "model",
    "trainer.max_steps": "steps",
    "data.batch_size": "batch_size",
    "optim.lr": "learning_rate",
    "trainer.precision": "precision",
    "checkpoint.every_n_steps": "checkpoint_every",
    "validation.every_n_steps": "validate_every",
    "data": "dataset",
    "data.shards": "dataset",
    "data.folder.root": "dataset",
    "run_dir": "name",
}
_HYDRA_LOCK = threading.Lock()  # Hydra's global state: one composition at a time (Gradio runs handlers in threads)


class ProblemsError(ValueError):
    """Refused input: ``problems`` maps each field (or ``config``) to what is wrong with it."""

    def __init__(self, problems: dict[str, str]):
        self.problems = dict(problems)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.problems.items()))


# ---- overrides ------------------------------------------------------------------------------------------


def _parse_override(text: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(text)


def override_problem(text: str) -> str | None:
    """Why Hydra's override grammar refuses ``text`` (what the command would exit with); None if it parses."""
    from hydra.errors import HydraException

    if not isinstance(text, str) or ("=" not in text and not text.startswith("~")):
        return f"{text!r}: not an override (key=value, +key=value or ~key)"
    try:
        _parse_override(text)
        return None
    except HydraException as error:
        reason = next((line for line in str(error).splitlines() if line and not line.startswith("See https")), "")
        return f"{text}: Hydra cannot parse it ({reason})"


def override_key(text: str) -> str:
    return text.partition("=")[0].lstrip("+~")


def hydra_string(key: str, value: str) -> str:
    """``value`` as Hydra reads it back, character for character, as a string: bare when the grammar
    leaves it a string (``/data/shards``), else single-quoted with Hydra's escapes (spaces next to
    brackets, commas, quotes, ``true`` or ``123`` meant as text)."""
    if "${" in value:  # OmegaConf would resolve it as an interpolation even inside quotes
        raise ValueError(f"{value!r}: '${{' is read as an interpolation; rename the path")
    try:
        if _parse_override(f"{key}={value}").value() == value:
            return value
    except Exception:  # noqa: BLE001 - any refusal of the bare form: quote it
        pass
    # Inside quotes Hydra un-escapes \' and the backslashes that precede a quote or the closing quote.
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
    quoted = f"'{escaped}'"
    if _parse_override(f"{key}={quoted}").value() != value:
        raise ValueError(f"{value!r}: cannot be passed to Hydra as a string")
    return quoted


def format_override(key: str, value: Any) -> str:
    """``key=value`` that Hydra parses back to ``value`` (bool, None, int, float, str, Path, or a list of them)."""

    def text(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "null"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{key}={v}: not a finite number")
            return repr(v)
        if isinstance(v, (str, os.PathLike)):
            return hydra_string(key, os.fspath(v))
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(text(x) for x in v) + "]"
        raise ValueError(f"{key}: cannot pass a {type(v).__name__} as an override")

    return f"{key}={text(value)}"


def field_of(key: str) -> str:
    return FIELD_KEYS.get(key.split("/")[0] if "/" in key else key, "config")


def add_problem(problems: dict[str, str], where: str, problem: str) -> None:
    problems[where] = f"{problems[where]}; {problem}" if where in problems else problem


def as_int(value: Any) -> int | None:
    """An integer from a UI field (ints, floats holding one, digit strings); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def model_options() -> list[str]:
    """The model configs a user can pick (conf/model/, partials left out)."""
    folder = resources.files("nemo_controlnet.conf") / "model"
    names = [p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")]
    return sorted(n for n in names if not n.startswith("_") and n != "options")  # options: shared by all


# A diffusers directory's pipeline class (model_index.json's _class_name) -> the model config that reads it.
LOCAL_MODELS = (("StableDiffusion3", "local_sd3"), ("Flux", "local_flux"), ("StableDiffusionXL", "local_diffusers_xl"))


def local_model(path: Path) -> tuple[str | None, str | None]:
    """(the local_* model config that reads this diffusers directory, or None with what is wrong)."""
    index = path / "model_index.json"
    if not (index.is_file() or (path / "unet" / "config.json").is_file()):
        return None, f"{path}: not a diffusers model directory (no model_index.json or unet/config.json)"
    pipeline = ""
    if index.is_file():
        try:
            pipeline = str(json.loads(index.read_text()).get("_class_name") or "")
        except (OSError, ValueError) as e:
            return None, f"{index}: unreadable ({e})"
    for marker, group in LOCAL_MODELS:
        if pipeline.startswith(marker):
            return group, None
    if (path / "transformer").is_dir():
        return None, f"{path}: a transformer base of pipeline {pipeline or '?'}, not SD3 or Flux"
    return ("local_diffusers_xl" if (path / "text_encoder_2").is_dir() else "local_diffusers"), None


def _model_overrides(model: Any) -> tuple[list[str], str | None]:
    options = model_options()
    if isinstance(model, str) and model in options:
        return [f"model={model}"], None
    path = Path(str(model or "")).expanduser()
    if str(model or "").strip() and path.is_dir():
        group, problem = local_model(path)
        if problem:
            return [], problem
        return [f"model={group}", format_override("model.path", str(path.resolve()))], None
    return [], f"expected one of {', '.join(options)} or a diffusers model directory (got {model!r})"


def _dataset_overrides(dataset: Any, extra: Iterable[str]) -> tuple[list[str], str | None]:
    path = Path(str(dataset)).expanduser()
    if not str(dataset).strip() or not path.exists():
        return [], f"no such file or directory: {dataset}"
    path = path.resolve()
    if path.is_file() and (path.name == MANIFEST or path.suffix == ".tar"):
        return ["data=shards", format_override("data.shards", str(path))], None
    if path.is_dir() and (path / MANIFEST).is_file():
        return ["data=shards", format_override("data.shards", str(path / MANIFEST))], None
    if path.is_dir() and any(path.glob("*.tar")):
        return ["data=shards", format_override("data.shards", str(path))], None
    if path.is_dir() and find_images(path, exclude_dirs={"canny"}):
        on_the_fly = any(re.fullmatch(r"\+?data\.hint\.on_the_fly=(true|True)", e.strip()) for e in extra)
        if not (path / "canny").is_dir() and not on_the_fly:
            return [], (f"{path}: an image folder without precomputed hints ({path / 'canny'}); compute them "
                        "first (controlnet-prep mode=precompute), or add data.hint.on_the_fly=true")  # fmt: skip
        return ["data=folder", format_override("data.folder.root", str(path))], None
    return [], f"{path}: neither shards (a manifest.json, .tar files) nor an image folder"


def run_overrides(
    model: str,
    steps: Any,
    batch_size: Any,
    learning_rate: Any,
    precision: Any,
    checkpoint_every: Any,
    dataset: str | os.PathLike | None = None,
    validate_every: Any = None,
    extra: Iterable[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The UI's training fields as ``controlnet-train`` overrides, and what is wrong with them keyed by
    field (empty when nothing is). ``model``: a conf/model option (tiny, sd15, ...) or a diffusers model
    directory; ``steps``: trainer.max_steps; ``batch_size``: data.batch_size (per device);
    ``learning_rate``: optim.lr, in (0, 1); ``precision``: trainer.precision; ``checkpoint_every``:
    checkpoint.every_n_steps (0: only at the end); ``dataset``: shards (a directory of .tar, a .tar or a
    manifest.json) or an image folder with precomputed hints; None: the default's generated shapes;
    ``validate_every``: validation.every_n_steps (None: the config's); ``extra``: more overrides as
    typed (key=value), appended last, so they win."""
    extra = [str(e).strip() for e in extra if str(e).strip()]
    overrides: list[str] = []
    problems: dict[str, str] = {}

    model_part, problem = _model_overrides(model)
    overrides += model_part
    if problem:
        problems["model"] = problem
    if dataset is not None and str(dataset).strip():
        data_part, problem = _dataset_overrides(dataset, extra)
        overrides += data_part
        if problem:
            problems["dataset"] = problem

    for name, key, value, least in (
        ("steps", "trainer.max_steps", steps, 1),
        ("batch_size", "data.batch_size", batch_size, 1),
        ("checkpoint_every", "checkpoint.every_n_steps", checkpoint_every, 0),
        ("validate_every", "validation.every_n_steps", validate_every, 0),
    ):
        if value is None and name == "validate_every":
            continue
        number = as_int(value)
        if number is None or number < least:
            problems[name] = f"expected an integer >= {least} (got {value!r})"
        else:
            overrides.append(f"{key}={number}")
    lr = _as_float(learning_rate)
    if lr is None or not 0 < lr < 1:
        problems["learning_rate"] = f"expected a number in (0, 1) (got {learning_rate!r})"
    else:
        overrides.append(f"optim.lr={lr!r}")
    if str(precision) not in PRECISIONS:
        problems["precision"] = f"expected one of {', '.join(sorted(PRECISIONS))} (got {precision!r})"
    else:
        overrides.append(f"trainer.precision={precision}")
    bad = [p for p in (override_problem(e) for e in extra) if p]
    if bad:
        problems["extra"] = "; ".join(bad)
    if any(override_key(e) == "run_dir" for e in extra):
        add_problem(problems, "extra", "run_dir is the run's name under the runs directory; leave it out")
    return overrides + extra, problems


def compose(config_name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """A command's config (conf/<config_name>.yaml) composed with ``overrides`` as the command composes
    it, without its ``hydra`` node; one composition at a time. Inside ``controlnet-ui`` (a Hydra main,
    whose search path is conf/) Hydra is initialised already; elsewhere (tests, scripts) it is
    initialised for the call and cleared after."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with _HYDRA_LOCK:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))


def _unset_keys(node: Any, prefix: str = "") -> list[str]:
    """The keys left ``???`` in an unresolved config (not those that interpolate one: the one to set is named)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _unset_keys(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in _unset_keys(value, f"{prefix[:-1]}[{i}].")]
    return [prefix[:-1]] if node == "???" else []


def config_problems(run_dir: Path, overrides: list[str]) -> dict[str, str]:
    """What ``controlnet-train`` would refuse in the config these overrides compose, before it builds
    anything, keyed by the UI field that set the key (``config`` for the others)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    problems: dict[str, str] = {}
    try:
        cfg = compose("train", [*overrides, format_override("run_dir", str(run_dir))])
        for key in _unset_keys(OmegaConf.to_container(cfg, resolve=False)):  # the command fails on them later
            add_problem(problems, field_of(key), f"{key}: missing (a value is required)")
        OmegaConf.resolve(cfg)
        validate_train_config(cfg)
    except ConfigError as error:
        for line in str(error).splitlines():
            line = re.sub(r"^invalid \w+ config:\s*", "", line.strip())  # the header, alone or before one
            match = re.match(r"^([\w.]+)[=:]", line)
            if line:
                add_problem(problems, field_of(match.group(1)) if match else "config", line)
    except (HydraException, OmegaConfBaseException) as error:
        message = " ".join(str(error).split()).partition(" Config search path:")[0]
        match = re.search(r"(?:override|find|full_key:|key:?) '?([\w./]+)'?", message)
        add_problem(problems, field_of(match.group(1)) if match else "config", message)
    return problems


