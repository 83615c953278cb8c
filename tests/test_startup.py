"""What a new user sees when a command starts: no notices from dependencies that say nothing about the
run (notices.py), every other warning still shown, and ``--help`` listing the command's own config groups."""

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import nemo_controlnet.cli  # noqa: F401  (registers the command_help resolver of the configs' help)
from nemo_controlnet import notices

SCRIPTS = Path(sys.executable).parent  # the console scripts beside the interpreter (.venv/bin)
CONF = Path(nemo_controlnet.cli.__file__).parents[1] / "conf"

# What each silenced notice prints (notices.py has the filters and why each is safe).
NOTICES = (
    "requires torchvision (not installed); falling back to",  # transformers, at import
    "The `srun` command is available on your system but is not used",  # Lightning, outside a SLURM job
    "Tip: For seamless cloud",  # Lightning's litlogger / litmodels advertisements
    "isinstance(treespec, LeafSpec)` is deprecated",  # torch, from Lightning's own helper
    "You have overridden `on_after_batch_transfer` in `LightningModule`",  # Lightning, on our intended hook
)

# The groups each command's --help lists (conf/<command>.yaml: hydra.help.template); + marks a group
# outside the command's defaults list (+experiment=...).
HELP_GROUPS = {
    "train": ["model", "training_mode", "data", "trainer", "optim", "+experiment", "hydra/launcher"],
    "prep": ["source", "hint", "model"],
    "generate": ["model", "hint"],
    "eval": ["model"],
    "export": [],
    "synth": [],
    "init": ["model"],
    "migrate": [],
}


@pytest.fixture(autouse=True)
def _log_filters_removed():
    """notices.install() adds logging filters to library loggers; other tests get the loggers as they were."""
    yield
    for name, log_filter in notices.LOG_FILTERS.items():
        logging.getLogger(name).removeFilter(log_filter)


def _environment(tmp_path: Path) -> dict[str, str]:
    """Outside any SLURM job, with an `srun` on PATH (a stub: SLURM's client tools installed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "HYDRA_FULL_ERROR"}
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    env.update(HF_HUB_OFFLINE="1", PATH=f"{stub.parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _command(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A console script as the user runs it: the installed entry point itself."""
    return subprocess.run([str(SCRIPTS / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _notices_in(output: str) -> list[str]:
    return [notice for notice in NOTICES if notice in output]


# -- the default job ------------------------------------------------------------------------------------------------


def test_default_training_run_prints_none_of_the_known_notices(tmp_path):
    """controlnet-train as a new user first runs it (the tiny model on generated shapes), made short."""
    run_dir = tmp_path / "run"
    proc = _command(
        "controlnet-train",
        f"run_dir={run_dir}",
        "trainer.max_steps=2",
        "validation.every_n_steps=0",
        "validation.num_samples=1",
        "validation.num_inference_steps=1",
        "data.synthetic.train.num_samples=32",
        "data.synthetic.train.shard_size=16",
        "data.synthetic.val.num_samples=1",
        cwd=tmp_path,
        env=_environment(tmp_path),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in output  # it did train, through Lightning
    assert (run_dir / "controlnet").is_dir()
    assert _notices_in(output) == [], output[-3000:]


# -- each filter matches what the installed libraries emit, and only that --------------------------------------------


def _srun_hint() -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    SLURMEnvironment._validate_srun_used()


def _pytree_deprecation() -> None:
    from lightning.pytorch.utilities._pytree import _tree_flatten

    _tree_flatten(1)


def _batch_hook_notice() -> None:
    import lightning as L
    from lightning.pytorch.trainer.connectors import data_connector

    class Module(L.LightningModule):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            return batch

    data_connector.warning_cache.clear()  # Lightning warns once per process
    data_connector._DataHookSelector(Module(), L.LightningDataModule()).get_instance("on_after_batch_transfer")


def _warnings_of(trigger, install: bool) -> list[str]:
    """The warnings ``trigger`` emits, with or without notices.install()."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if install:
            notices.install()
        trigger()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("trigger", "notice", "slurm_job"),
    [
        (_srun_hint, NOTICES[1], False),
        (_srun_hint, NOTICES[1], True),
        (_pytree_deprecation, NOTICES[3], False),
        (_batch_hook_notice, NOTICES[4], False),
    ],
    ids=["srun-outside-slurm-job", "srun-inside-slurm-job", "pytree", "batch-hook"],
)
def test_warning_filter_matches_the_library_warning(trigger, notice, slurm_job, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _environment(tmp_path)["PATH"])  # the stub srun
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    if slurm_job:  # in an allocation, without srun: the mistake the hint is for, so it stays
        monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert any(notice in m for m in _warnings_of(trigger, False)), "the library no longer emits it: drop its filter"
    assert any(notice in m for m in _warnings_of(trigger, True)) == slurm_job


def test_unrelated_warnings_and_log_records_still_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notices.install({})
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)  # elsewhere
        for message, category, module in [  # from the module that the filter names, another message
            ("You have overridden `on_after_batch_transfer` in both `LightningModule` and `LightningDataModule`.",
             UserWarning, "lightning.pytorch.trainer.connectors.data_connector"),
            ("Some other PossibleUserWarning", UserWarning, "lightning.fabric.plugins.environments.slurm"),
            ("The `srun` command is available on your system but is not used. HINT: ...", UserWarning,
             "lightning.fabric.plugins.environments.slurm"),  # the one silenced
        ]:  # fmt: skip
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
    shown = [str(w.message) for w in caught]
    assert shown[:4] == ["an unrelated warning", "`isinstance(treespec, LeafSpec)` is deprecated",
                         "You have overridden `on_after_batch_transfer` in both `LightningModule` and "
                         "`LightningDataModule`.", "Some other PossibleUserWarning"]  # fmt: skip
    assert len(shown) == 4

    def passes(logger: str, message: str) -> bool:
        log = logging.getLogger(logger)
        return log.filter(log.makeRecord(logger, logging.WARNING, "x.py", 1, message, None, None))

    tip = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://...) ..."
    fallback = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` ..."
    assert passes("lightning.pytorch.utilities.rank_zero", "GPU available: False, used: False")
    assert passes("transformers.utils.import_utils", "`Foo` requires some other backend")
    assert not passes("lightning.pytorch.utilities.rank_zero", tip)
    assert not passes("transformers.utils.import_utils", fallback)
    assert passes("some.other.logger", fallback)  # the same words from elsewhere


def test_a_launcher_job_in_its_own_process_silences_the_notices_too():
    """hydra/launcher=slurm runs the task in a process that entry_point did not start: the job's
    Hydra callback (conf/train.yaml: hydra.callbacks.notices) installs the filters there."""
    from hydra.utils import instantiate

    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    callback = instantiate(cfg.hydra.callbacks.notices)
    hint = "The `srun` command is available on your system but is not used. HINT: ..."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn_explicit(hint, UserWarning, "x.py", 1, module="lightning.fabric.plugins.environments.slurm")
        callback.on_job_start(config=cfg)
        warnings.warn_explicit(hint, UserWarning, "x.py", 1, module="lightning.fabric.plugins.environments.slurm")
    assert len(caught) == (1 if notices.outside_slurm_job(os.environ) else 2)  # before, and inside a SLURM job after


# -- --help ----------------------------------------------------------------------------------------------------------


def _listed_groups(help_text: str) -> list[str]:
    section = re.search(r"== Configuration groups ==\n.*?\n\n(.*?)\n\n== Config ==", help_text, re.S)
    return [line.split(":")[0] for line in section.group(1).splitlines()] if section else []


@pytest.mark.parametrize("command", sorted(HELP_GROUPS))
def test_help_lists_the_command_groups_only(command, tmp_path):
    proc = _command(f"controlnet-{command}", "--help", cwd=tmp_path, env=_environment(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"controlnet-{command} is powered by Hydra.")
    assert _listed_groups(proc.stdout) == HELP_GROUPS[command]
    assert ("== Configuration groups ==" in proc.stdout) == bool(HELP_GROUPS[command])
    assert "== Config ==" in proc.stdout and "Powered by Hydra" in proc.stdout
    lines = proc.stdout.split("== Config ==")[0].splitlines()
    options = [o.strip() for line in lines if ": " in line for o in line.split(": ", 1)[1].split(",")]
    assert not [o for o in options if o.startswith("_") or o == "options"]  # partials are no choices
    if "model" in HELP_GROUPS[command]:  # every model config but the shared options
        models = sorted(path.stem for path in (CONF / "model").glob("*.yaml") if path.stem != "options")
        assert next(line for line in lines if line.startswith("model: ")) == f"model: {', '.join(models)}"
    assert _notices_in(proc.stdout + proc.stderr) == []


@pytest.mark.parametrize("command", sorted(HELP_GROUPS))
def test_help_lists_every_group_of_the_defaults_list(command):
    """A group added to a command's defaults list shows in its --help (or is a partial: data: _common)."""
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        cfg = compose(config_name=command, return_hydra_config=True)
        listed = [group.lstrip("+") for group in _listed_groups(cfg.hydra.help.template)]
    for group, choice in cfg.hydra.runtime.choices.items():
        if not group.startswith("hydra/") and "@" not in group and not str(choice).startswith("_"):
            assert group in listed, f"{command}: {group} is in the defaults list but not in --help"
