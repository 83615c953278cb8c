"""Config checks that run before any model is built: a bad value fails in seconds, naming its key."""

from __future__ import annotations

import difflib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

PRECISIONS = {"32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64", "64-true"}
PREDICTION_TYPES = {"epsilon", "v_prediction"}
PREP_MODES = ("shards", "precompute", "merge", "encode", "residuals")
LR_SCHEDULERS = {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"}
MODEL_NODES = (
    "unet_config",
    "first_stage_config",
    "cond_stage_config.text_encoder",
    "cond_stage_config.tokenizer",
    "scheduler_config",
    "control_stage_config",
)


class ConfigError(ValueError):
    pass


class _Checker:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.errors: list[str] = []

    def check(self, key: str, ok: Callable[[Any], bool], expected: str, required: bool = True) -> None:
        value = OmegaConf.select(self.cfg, key, throw_on_missing=False, default=None)
        if value is None:
            if required:
                self.errors.append(f"{key}: missing (expected {expected})")
            return
        try:
            good = ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            self.errors.append(f"{key}={value!r}: expected {expected}")

    def raise_if_any(self, what: str) -> None:
        if len(self.errors) == 1:
            raise ConfigError(f"invalid {what} config: {self.errors[0]}")
        if self.errors:
            raise ConfigError(f"invalid {what} config:\n  " + "\n  ".join(self.errors))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(v) -> bool:
    return _is_int(v) and v > 0


def _nonneg_int(v) -> bool:
    return _is_int(v) and v >= 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def output_dir_problem(path: str | Path) -> str | None:
    """Why a directory cannot be created (or written) at ``path``; None when it can. Checked before any
    work starts, without creating anything: the nearest existing ancestor must be a writable directory."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.is_file():
        return f"{existing} is a file"
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"permission denied: {existing} is not writable"
    return None


# ---- field checks: each returns what is wrong with one value (None when nothing is), so a UI can show
# it beside the field and the command refuses the same values (validate_prep_config) -------------------

CANNY_MAX = 255  # ControlNet's annotator range; higher thresholds (Canny's gradients go beyond) keep almost no edge
CONTROL_SIZE_RANGE, CONTROL_SIZE_STEP = (64, 4096), 8
DATASET_NAME_MAX = 100


def _integral(v) -> bool:
    """An integer, or a float holding one (UI sliders hand numbers over as floats); never a bool."""
    return _is_int(v) or (isinstance(v, float) and v.is_integer())


def canny_problems(low, high, blur) -> dict[str, str]:
    """What is wrong with Canny's fields, keyed by field name (``low_threshold``, ``high_threshold``,
    ``blur``); empty when all are fine. Thresholds are integers in 0..255 with low < high (equal ones
    make Canny's hysteresis a single threshold, which is never what the user meant); blur is 0 (none)
    or an odd Gaussian kernel size up to 255."""
    problems = {}
    for field, value in (("low_threshold", low), ("high_threshold", high)):
        if not (_integral(value) and 0 <= value <= CANNY_MAX):
            problems[field] = f"expected an integer in 0..{CANNY_MAX}"
    if not problems and not low < high:
        problems["high_threshold"] = f"expected more than low_threshold ({low:g})"
    if not (_integral(blur) and (blur == 0 or (blur % 2 == 1 and 1 <= blur <= CANNY_MAX))):
        problems["blur"] = f"expected 0 (no blur) or an odd kernel size in 1..{CANNY_MAX}"
    return problems


def control_size_problem(size) -> str | None:
    """The short side images and hints are scaled to: None (keep the size) or a multiple of 8 (the
    VAE's downsampling) in 64..4096."""
    low, high = CONTROL_SIZE_RANGE
    if size is None:
        return None
    if not (_integral(size) and low <= size <= high and size % CONTROL_SIZE_STEP == 0):
        return f"expected a multiple of {CONTROL_SIZE_STEP} in {low}..{high}, or none to keep the size"
    return None


def dataset_name_problem(name) -> str | None:
    """A dataset name becomes one directory name: no separators, nothing that climbs out ("..") or
    hides (a leading dot), printable, at most 100 characters."""
    if not isinstance(name, str) or not name:
        return "expected a name"
    if name != name.strip():
        return "expected no leading or trailing spaces"
    if "/" in name or "\\" in name:
        return "expected no path separators (/ or \\)"
    if ".." in name:
        return "expected no '..'"
    if name.startswith("."):
        return "expected no leading dot (hidden)"
    if not name.isprintable():
        return "expected printable characters only"
    if len(name) > DATASET_NAME_MAX:
        return f"expected at most {DATASET_NAME_MAX} characters (got {len(name)})"
    return None


def readable_path_problem(path, kind: str = "dir") -> str | None:
    """Why ``path`` cannot be read as ``kind`` ("dir", "file" or "any"); None when it can. A directory
    must also be searchable (X), or its files cannot be opened."""
    if kind not in ("dir", "file", "any"):
        raise ValueError(f"kind={kind!r}: expected 'dir', 'file' or 'any'")
    if path is None or not str(path).strip():
        return "expected a path"
    path = Path(path)
    if not path.exists():
        return f"no such file or directory: {path}"
    if kind == "dir" and not path.is_dir():
        return f"{path} is not a directory"
    if kind == "file" and not path.is_file():
        return f"{path} is not a file"
    needed = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, needed):
        return f"permission denied: {path} is not readable"
    return None


def hint_problems(hint) -> dict[str, str]:
    """``canny_problems`` of a hint config node (a mapping with ``_target_``) whose target is Canny,
    with Canny's defaults for the fields it leaves out; other detectors have no fields checked here."""
    if not str(hint.get("_target_", "")).endswith("hints.Canny"):
        return {}
    return canny_problems(hint.get("low_threshold", 100), hint.get("high_threshold", 200), hint.get("blur", 0))


def check_hint_fields(c: _Checker, prefix: str) -> None:
    """The hint block's fields by ``hint_problems``, each message naming its key."""
    hint = OmegaConf.select(c.cfg, prefix, throw_on_missing=False, default=None)
    if isinstance(hint, DictConfig):
        for field, problem in hint_problems(hint).items():
            c.errors.append(f"{prefix}.{field}={hint.get(field)!r}: {problem}")


def check_problem(c: _Checker, key: str, problem_of: Callable[[Any], str | None]) -> None:
    """``key`` checked by a field check; its message names the key and the value."""
    value = OmegaConf.select(c.cfg, key, throw_on_missing=False, default=None)
    problem = problem_of(value)
    if problem:
        c.errors.append(f"{key}={value!r}: {problem}")


def check_output_dir(c: _Checker, key: str) -> None:
    """``key`` names a directory this job writes: it must be creatable and writable."""
    value = OmegaConf.select(c.cfg, key, throw_on_missing=False, default=None)
    if isinstance(value, str) and value.strip():
        problem = output_dir_problem(value)
        if problem:
            c.errors.append(f"{key}={value!r}: cannot create or write the directory ({problem})")


def _suggest(prefix: str, key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {prefix}.{close[0]}?)" if close else ""


def check_keyword_arguments(c: _Checker, prefix: str, function, what: str) -> None:
    """Every key of the block at ``prefix`` must be a parameter of ``function``, which receives the
    block as keyword arguments: a misspelled key fails here, not after the data and models are built."""
    block = OmegaConf.select(c.cfg, prefix, throw_on_missing=False, default=None)
    if not isinstance(block, DictConfig):
        return
    params = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # takes anything
    known = [name for name, p in params.items() if name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in block.keys():
        if isinstance(key, str) and not key.startswith("_") and key not in known:  # _target_, _convert_, ...
            c.errors.append(f"{prefix}.{key}: not an argument of {what}{_suggest(prefix, key, known)}")


def check_target_arguments(c: _Checker, prefix: str) -> None:
    """A ``_target_`` node that Hydra instantiates: its keys must be arguments of the target."""
    target = OmegaConf.select(c.cfg, f"{prefix}._target_", throw_on_missing=False, default=None)
    if not isinstance(target, str):
        return
    from hydra.utils import get_object

    try:
        function = get_object(target)
    except Exception as e:  # what instantiate would fail on later
        c.errors.append(f"{prefix}._target_={target!r}: cannot be imported ({e})")
        return
    try:
        inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return
    check_keyword_arguments(c, prefix, function, target)


def check_trainer(c: _Checker, prefix: str = "trainer") -> None:
    """The trainer block goes to ``lightning.Trainer`` as keyword arguments (training/run.py)."""
    import lightning

    check_keyword_arguments(c, prefix, lightning.Trainer.__init__, "lightning.Trainer")


def check_model(c: _Checker, prefix: str = "model") -> None:
    for node in MODEL_NODES:
        if node == "control_stage_config" and OmegaConf.select(c.cfg, f"{prefix}.{node}") is None:
            continue  # no ControlNet: the base itself trains (pretraining a base, examples/fill50k)
        c.check(f"{prefix}.{node}._target_", lambda v: isinstance(v, str) and "." in v, "a _target_ dotted path")
    c.check(f"{prefix}.seed", _is_int, "an integer")
    c.check(f"{prefix}.hint_channels", _pos_int, "a positive integer")
    c.check(f"{prefix}.control_key", lambda v: isinstance(v, str) and v, "a batch key such as 'hint'")
    c.check(f"{prefix}.sd_locked", lambda v: isinstance(v, bool), "true or false")
    c.check(f"{prefix}.only_mid_control", lambda v: isinstance(v, bool), "true or false")
    c.check(f"{prefix}.control_scale", lambda v: _number(v) and v >= 0, "a number >= 0")
    c.check(f"{prefix}.proportion_empty_prompts", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
    c.check(
        f"{prefix}.prediction_type",
        lambda v: v in PREDICTION_TYPES,
        f"one of {sorted(PREDICTION_TYPES)}",
        required=False,
    )


def check_local_weights(c: _Checker, prefix: str = "model") -> None:
    """Every ``from_pretrained`` source is a local directory that exists (hubs are never asked)."""
    model = OmegaConf.select(c.cfg, prefix)
    for node in (*MODEL_NODES, "cond_stage_config.text_encoder_2", "cond_stage_config.tokenizer_2"):
        source = OmegaConf.select(model, f"{node}.pretrained_model_name_or_path", default=None)
        if source is not None:
            where = Path(source) / (OmegaConf.select(model, f"{node}.subfolder", default=None) or "")
            if not where.is_dir():
                c.errors.append(f"{prefix}.{node}.pretrained_model_name_or_path={source!r}: no directory {where}")
    pretrained = OmegaConf.select(model, "control_stage_config.pretrained", default=None)
    if pretrained and not (Path(pretrained) / "config.json").is_file() and not Path(pretrained).is_file():
        c.errors.append(
            f"{prefix}.control_stage_config.pretrained={pretrained!r}: neither a diffusers ControlNet directory "
            "nor an original-format ControlNet file"
        )
    checkpoint = OmegaConf.select(model, "checkpoint", default=None)
    if checkpoint and not Path(checkpoint).is_file():
        c.errors.append(f"{prefix}.checkpoint={checkpoint!r}: no such file")


def validate_model_config(cfg: DictConfig, prefix: str = "model") -> None:
    c = _Checker(cfg)
    check_model(c, prefix)
    if not c.errors:
        check_local_weights(c, prefix)
    c.raise_if_any("model")


HF_KEYS = ("path", "split", "image_column", "conditioning_image_column", "caption_column")
HF_SOURCE = "nemo_controlnet.prep.hf_source.HfDatasetSource"


def check_hf_dataset(c: _Checker, prefix: str) -> None:
    """A Hugging Face dataset block (``data.hf``, or ``source`` with source=hf_dataset): a path that
    exists (or a glob), a split, column names (conditioning and caption may be null). The columns
    themselves are checked when the dataset is opened (``data/hf.py``), naming the ones there are."""
    c.check(f"{prefix}.path", lambda v: isinstance(v, str) and v.strip(), "a save_to_disk directory, parquet or "
            "arrow files (a file, a directory or a glob), or an image folder")  # fmt: skip
    path = OmegaConf.select(c.cfg, f"{prefix}.path", throw_on_missing=False, default=None)
    if isinstance(path, str) and path.strip() and not any(ch in path for ch in "*?["):
        check_problem(c, f"{prefix}.path", lambda v: readable_path_problem(v, "any"))
    c.check(f"{prefix}.split", lambda v: isinstance(v, str) and v.strip(), "a split name such as train")
    c.check(f"{prefix}.image_column", lambda v: isinstance(v, str) and v, "a column name")
    for key in ("conditioning_image_column", "caption_column"):
        c.check(f"{prefix}.{key}", lambda v: isinstance(v, str) and v, "a column name or null", required=False)


def check_hf_training_data(c: _Checker) -> None:
    """``data.hf`` (data=hf_dataset): the block, its keys, and hints it can have."""
    block = OmegaConf.select(c.cfg, "data.hf", throw_on_missing=False, default=None)
    if not isinstance(block, DictConfig):
        return
    check_hf_dataset(c, "data.hf")
    for key in block.keys():
        if key not in HF_KEYS:
            hint = _suggest("data.hf", key, HF_KEYS)
            c.errors.append(f"data.hf.{key}: not a key of data.hf (keys: {list(HF_KEYS)}){hint}")
    if block.get("conditioning_image_column") is None and not OmegaConf.select(c.cfg, "data.hint.on_the_fly"):
        c.errors.append("data.hf.conditioning_image_column=null: without a conditioning column the hints are "
                        "computed; set data.hint.on_the_fly=true")  # fmt: skip


def check_hf_prep_source(c: _Checker) -> None:
    """source=hf_dataset: the block (its keys are the source's arguments: ``check_target_arguments``), and
    hint=given only with a conditioning column."""
    if OmegaConf.select(c.cfg, "source._target_", throw_on_missing=False, default=None) != HF_SOURCE:
        return
    check_hf_dataset(c, "source")
    given = str(OmegaConf.select(c.cfg, "hint._target_", default="")).endswith("hints.Given")
    if given and OmegaConf.select(c.cfg, "source.conditioning_image_column", throw_on_missing=False) is None:
        c.errors.append("hint=given: the hints are the conditioning column's images, but source."
                        "conditioning_image_column=null; name the column, or compute hints (hint=canny)")  # fmt: skip


LOGGERS = ("tensorboard", "csv", "wandb")  # report_to's names; "all": every one installed, "none": no logger
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")  # a Hub repo id: [owner/]name


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _logger_names(value, key: str) -> list[str]:
    """A ``report_to`` (or ``logger``) value as logger names: one name, ``all`` (tensorboard, csv and, when
    it is installed, wandb: what accelerate's ``all`` means), ``none``, a comma-separated string or a list."""
    items = [value] if isinstance(value, (str, bool, int, float)) else list(value)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    if names == ["none"]:
        return []
    if names == ["all"]:
        return [n for n in LOGGERS if n != "wandb" or installed("wandb")]
    if not names or any(n not in LOGGERS for n in names):
        raise ConfigError(f"{key}={value!r}: expected tensorboard, csv, wandb, all or none (or a list of the first "
                          "three)")  # fmt: skip
    return [n for n in LOGGERS if n in names]


def report_to(cfg: DictConfig) -> list[str]:
    """The run's loggers: ``report_to`` (diffusers' argument), else ``logger`` (its older name here), else
    tensorboard. Both set to different loggers is an error naming both."""
    chosen = {}
    for key in ("report_to", "logger"):
        value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
        if value is not None:
            chosen[key] = (value, _logger_names(value, key))
    if len(chosen) == 2 and chosen["report_to"][1] != chosen["logger"][1]:
        raise ConfigError(f"report_to={chosen['report_to'][0]!r} and logger={chosen['logger'][0]!r} disagree: set "
                          "one of them (logger is the older name of report_to)")  # fmt: skip
    return next(iter(chosen.values()))[1] if chosen else ["tensorboard"]


def check_diffusers_keys(c: _Checker) -> None:
    """The keys named after the diffusers training script's arguments (docs/diffusers_arguments.md)."""
    cfg = c.cfg
    try:
        names = report_to(cfg)
    except ConfigError as e:
        c.errors.append(str(e))
        names = []
    if "wandb" in names and not installed("wandb"):
        key = "report_to" if OmegaConf.select(cfg, "report_to", default=None) is not None else "logger"
        c.errors.append(f"{key}={OmegaConf.select(cfg, key)!r}: Weights & Biases is not installed (pip install "
                        "wandb), or report to tensorboard or csv")  # fmt: skip
    if "wandb" in names:
        c.check("wandb.mode", lambda v: v in ("offline", "online"), "offline or online", required=False)
    c.check("tracker_project_name", lambda v: isinstance(v, str) and v.strip() and "/" not in v and v not in
            (".", ".."), "a project name (no /)", required=False)  # fmt: skip
    c.check("data.max_train_samples", _pos_int, "a positive integer, or null for every sample", required=False)
    c.check("validation.num_images", _pos_int, "a positive integer (images per validation hint)", required=False)
    c.check("optim.lr_num_cycles", _pos_int, "a positive integer (cosine_with_restarts' cycles)", required=False)
    c.check("optim.lr_power", lambda v: _number(v) and v > 0, "a number > 0 (polynomial's power)", required=False)
    for key in ("optim.set_grads_to_none", "optim.use_8bit_adam", "export.push_to_hub"):
        c.check(key, lambda v: isinstance(v, bool), "true or false", required=False)
    if OmegaConf.select(cfg, "optim.use_8bit_adam") is True:
        accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
        import torch

        if accelerator == "cpu" or not torch.cuda.is_available():
            c.errors.append(f"optim.use_8bit_adam=true: 8-bit Adam needs CUDA (bitsandbytes' AdamW8bit); this run is "
                            f"on the CPU (trainer.accelerator={accelerator}, CUDA available: "
                            f"{torch.cuda.is_available()}); set optim.use_8bit_adam=false")  # fmt: skip
        elif not installed("bitsandbytes"):
            c.errors.append("optim.use_8bit_adam=true: bitsandbytes is not installed (pip install bitsandbytes)")
    for key in ("export.hub_model_id", "export.base_model_id"):
        c.check(key, lambda v: isinstance(v, str) and HUB_ID.match(v), "a Hub repo id such as you/controlnet-canny",
                required=False)  # fmt: skip
    if OmegaConf.select(cfg, "export.push_to_hub") is True and OmegaConf.select(cfg, "export.enabled") is False:
        c.errors.append("export.push_to_hub=true uploads what the run exports: set export.enabled=true")


def validate_train_config(cfg: DictConfig) -> None:
    c = _Checker(cfg)
    c.check("run_dir", lambda v: isinstance(v, str) and v.strip(), "a directory path")
    check_output_dir(c, "run_dir")
    c.check("resume", lambda v: isinstance(v, bool), "true or false")
    c.check("seed", _is_int, "an integer")
    check_model(c)
    sources = [k for k in ("shards", "datasets", "folder", "hf") if OmegaConf.select(cfg, f"data.{k}") is not None]
    if len(sources) != 1:
        c.errors.append(f"data: set exactly one of data.shards, data.datasets, data.folder, data.hf (set: "
                        f"{sources or 'none'})")  # fmt: skip
    check_hf_training_data(c)
    c.check("data.augment.crop", lambda v: v in ("center", "random"), "center or random", required=False)
    c.check("data.augment.hflip", lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]", required=False)
    if OmegaConf.select(cfg, "data.resampled"):
        c.check("data.samples_per_epoch", _pos_int, "a positive integer (resampled streams are endless)")
    c.check("data.resolution", lambda v: _pos_int(v) and v % 8 == 0, "a positive multiple of 8")
    c.check("data.batch_size", _pos_int, "a positive integer")
    c.check("data.num_workers", _nonneg_int, "an integer >= 0")
    c.check("data.shuffle_buffer", _nonneg_int, "an integer >= 0")
    c.check("data.access", lambda v: v in ("auto", "indexed", "stream"), "auto, indexed or stream", required=False)
    if OmegaConf.select(cfg, "data.buckets.enabled"):
        c.check("data.buckets.step", lambda v: _pos_int(v) and v % 8 == 0, "a positive multiple of 8")
        c.check("data.buckets.max_aspect", lambda v: _number(v) and v >= 1, "a number >= 1")
        step, res = OmegaConf.select(cfg, "data.buckets.step"), OmegaConf.select(cfg, "data.resolution")
        if _pos_int(step) and _pos_int(res) and res % step:
            c.errors.append(f"data.buckets.step={step}: must divide data.resolution={res}")
    c.check("data.missing_caption", lambda v: v in ("empty", "skip"), "empty or skip", required=False)
    for key in ("image_key", "hint_key", "caption_key"):
        c.check(f"data.{key}", lambda v: isinstance(v, str) and v, "a tar member extension such as jpg")
    if OmegaConf.select(cfg, "data.hint.on_the_fly"):  # only then is the detector built (data/datamodule.py)
        check_target_arguments(c, "data.hint.detector")
    check_trainer(c)
    c.check("trainer.precision", lambda v: str(v) in PRECISIONS, f"one of {sorted(PRECISIONS)}")
    c.check("trainer.max_steps", _pos_int, "a positive integer")
    c.check("trainer.accumulate_grad_batches", _pos_int, "a positive integer", required=False)
    c.check("optim.lr", lambda v: _number(v) and v > 0, "a learning rate > 0")
    if OmegaConf.select(cfg, "model.sd_locked") is False:
        c.check("optim.unet_lr", lambda v: _number(v) and v > 0, "a learning rate > 0 for the unlocked UNet decoder")
    c.check("optim.warmup_steps", _nonneg_int, "an integer >= 0")
    c.check("optim.lr_scheduler", lambda v: v in LR_SCHEDULERS, f"one of {sorted(LR_SCHEDULERS)}")
    c.check("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)")
    c.check("checkpoint.every_n_steps", _nonneg_int, "an integer >= 0 (0: only at the end)")
    c.check("checkpoint.keep_last", _nonneg_int, "an integer >= 0 (0: keep all)")
    c.check("checkpoint.skip_unsafe", lambda v: isinstance(v, bool), "true or false", required=False)
    c.check("perf.cpu_threads", lambda v: v == "auto" or _pos_int(v), "auto or a positive integer", required=False)
    c.check("validation.every_n_steps", _nonneg_int, "an integer >= 0 (0: only at the end)")
    c.check("validation.num_samples", _nonneg_int, "an integer >= 0")
    check_diffusers_keys(c)  # report_to (logger), the 8-bit Adam, scheduler, hub and sample keys
    c.check("export.dtype", lambda v: v in ("fp16", "bf16", "fp32"), "fp16, bf16 or fp32", required=False)
    hint_encoder = OmegaConf.select(cfg, "model.control_stage_config.conditioning_embedding_out_channels")
    pretrained = OmegaConf.select(cfg, "model.control_stage_config.pretrained")
    if (
        OmegaConf.select(cfg, "export.original")
        and not pretrained
        and hint_encoder is not None
        and len(hint_encoder) != 4
    ):
        c.errors.append(
            f"model.control_stage_config.conditioning_embedding_out_channels={list(hint_encoder)}: the original "
            "single-file format (export.original=true) needs 4 entries; set export.original=false or use 4"
        )
    check_aux_loss(c)
    c.raise_if_any("training")


AUX_LOSSES = ("none", "edge_loss", "masked_recon")


def aux_loss_problems(controlnet_cfg, num_train_timesteps: int | None = None,
                      hint_channels: int | None = None) -> list[str]:  # fmt: skip
    """What is wrong with the ``controlnet.aux_*`` keys (training/aux_loss.py), one message per key, naming
    it; the scheduler's range and the hint's channels are checked where they are known."""
    cfg = controlnet_cfg if controlnet_cfg is not None else {}
    kind = cfg.get("aux_loss") or "none"
    if kind not in AUX_LOSSES:
        return [f"controlnet.aux_loss={kind!r}: expected one of {list(AUX_LOSSES)}"]
    problems: list[str] = []
    if kind == "none":
        return problems
    weight = cfg.get("aux_loss_weight", 0.1)
    if not (_number(weight) and weight >= 0):
        problems.append(f"controlnet.aux_loss_weight={weight!r}: expected a number >= 0")
    if kind == "edge_loss":
        t_max, top = cfg.get("aux_t_max", 200), (num_train_timesteps or 0) - 1
        if not (_nonneg_int(t_max) and (not num_train_timesteps or t_max <= top)):
            where = f" (the scheduler's timesteps are 0..{top})" if num_train_timesteps else ""
            problems.append(f"controlnet.aux_t_max={t_max!r}: expected an integer timestep >= 0{where}")
        if hint_channels is not None and hint_channels not in (1, 3):
            problems.append(f"model.hint_channels={hint_channels!r}: expected 1 or 3 for controlnet.aux_loss="
                            "edge_loss (an edge-map hint)")  # fmt: skip
    if kind == "masked_recon":
        dilate, mask_key = cfg.get("aux_mask_dilate", 3), cfg.get("aux_mask_key", "mask")
        if not _nonneg_int(dilate):
            problems.append(f"controlnet.aux_mask_dilate={dilate!r}: expected an integer >= 0 (pixels)")
        if not (isinstance(mask_key, str) and mask_key and "." not in mask_key):
            problems.append(f"controlnet.aux_mask_key={mask_key!r}: expected a member name without extension, "
                            "such as mask (mask.png)")  # fmt: skip
    return problems


def check_aux_loss(c: _Checker) -> None:
    """``controlnet.aux_*`` (training/aux_loss.py), and that the loader reads the mask masked_recon names."""
    node = OmegaConf.select(c.cfg, "controlnet", default=None)
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {}
    steps = OmegaConf.select(c.cfg, "model.scheduler_config.num_train_timesteps", default=None)
    channels = OmegaConf.select(c.cfg, "model.hint_channels", default=None)
    c.errors += aux_loss_problems(values, steps if _pos_int(steps) else None, channels if _is_int(channels) else None)
    mask_key, wanted = OmegaConf.select(c.cfg, "data.mask_key", default=None), values.get("aux_mask_key", "mask")
    if values.get("aux_loss") == "masked_recon" and mask_key != wanted:
        c.errors.append(f"data.mask_key={mask_key!r}: the loader must read the mask that controlnet.aux_mask_key="
                        f"{wanted!r} names (leave data.mask_key at its default, which follows it)")  # fmt: skip


CAPTION_MODES = ("missing", "overwrite", "prefix")
CAPTION_DTYPES = ("auto", "fp32", "bf16", "fp16")


def check_caption(c: _Checker, mode) -> None:
    """The ``caption:`` block of controlnet-prep (prep/caption.py), when ``caption.model`` is set."""
    model = OmegaConf.select(c.cfg, "caption.model", throw_on_missing=False, default=None)
    if model is None:
        return
    if mode != "shards":
        c.errors.append(f"caption.model={model!r}: captioning runs in mode=shards only (mode={mode})")
        return
    problem = readable_path_problem(model, "dir")
    if problem is None and not (Path(model) / "config.json").is_file():
        problem = "not a model directory (no config.json)"
    if problem:
        c.errors.append(f"caption.model={model!r}: {problem}")
    c.check("caption.mode", lambda v: v in CAPTION_MODES, f"one of {list(CAPTION_MODES)}")
    for key in ("prefix", "suffix", "separator"):
        c.check(f"caption.{key}", lambda v: isinstance(v, str), "a string", required=False)
    c.check("caption.prompt", lambda v: isinstance(v, str), "a string, or null for none", required=False)
    for key in ("keep_prompt", "trust_remote_code"):
        c.check(f"caption.{key}", lambda v: isinstance(v, bool), "true or false", required=False)
    for key in ("batch_size", "max_new_tokens", "num_beams"):
        c.check(f"caption.{key}", _pos_int, "a positive integer")
    c.check("caption.dtype", lambda v: v in CAPTION_DTYPES, f"one of {list(CAPTION_DTYPES)}")
    c.check("caption.reader_threads", lambda v: v == "auto" or _pos_int(v), "auto or a positive integer",
            required=False)  # fmt: skip
    c.check(
        "caption.device",
        lambda v: v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()),
        "auto, cpu, cuda, cuda:N or mps",
    )


def validate_prep_config(cfg: DictConfig) -> None:
    """controlnet-prep (prep/job.py): the mode, where the output goes, the pass-through blocks."""
    c = _Checker(cfg)
    c.check("mode", lambda v: v in PREP_MODES, f"one of {list(PREP_MODES)}")
    mode = OmegaConf.select(cfg, "mode", default=None)
    if mode in ("shards", "merge", "encode", "residuals"):
        c.check("out_dir", lambda v: isinstance(v, str) and v.strip(), f"a directory path (required for mode={mode})")
        check_output_dir(c, "out_dir")
    elif mode == "precompute":  # hints go to precompute.hints_dir, by default a folder under source.root
        check_output_dir(c, "precompute.hints_dir" if OmegaConf.select(cfg, "precompute.hints_dir") else "source.root")
    c.check("shard_size", _pos_int, "a positive integer")
    c.check("workers", _nonneg_int, "an integer >= 0")
    if mode == "shards":  # the modes that instantiate these blocks (prep/job.py, prep/encode.py)
        check_target_arguments(c, "source")
        check_hf_prep_source(c)
    if mode in ("shards", "precompute", "encode"):
        check_target_arguments(c, "hint")
        check_hint_fields(c, "hint")
    if mode in ("shards", "encode"):  # precompute keeps the images' size
        check_problem(c, "resolution", control_size_problem)
    check_caption(c, mode)
    c.raise_if_any("prep")
