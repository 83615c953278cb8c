"""The UI's server side without a browser: roots, the dataset form's checks and the overrides it
hands to controlnet-prep, the bind/auth rules of controlnet-ui."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from nemo_controlnet.config import ConfigError
from nemo_controlnet.ui import datasets as ds
from nemo_controlnet.ui.paths import OutsideRoots, Roots
from nemo_controlnet.ui.server import check


@pytest.fixture
def roots(tmp_path):
    (tmp_path / "data" / "photos").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    return Roots([tmp_path / "data", tmp_path / "out"])


def test_paths_outside_the_roots_are_refused_through_dotdot_absolute_and_symlinks(roots, tmp_path):
    assert roots.resolve("photos") == (tmp_path / "data" / "photos").resolve()
    assert roots.resolve(tmp_path / "out" / "new" / "x") == (tmp_path / "out" / "new" / "x").resolve()
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", tmp_path / "data" / "link")
    for bad in ("../secret", "photos/../../secret", str(tmp_path / "secret"), "/etc/passwd", "link", "link/x"):
        with pytest.raises(OutsideRoots, match="outside"):
            roots.resolve(bad, "source path")
    with pytest.raises(ValueError, match="empty"):
        roots.resolve("  ")


def form(roots_dir, **values) -> ds.DatasetForm:
    defaults = dict(source=str(roots_dir / "data" / "photos"), name="set1", out_root=str(roots_dir / "out"))
    return ds.DatasetForm(**{**defaults, **values})


@pytest.mark.parametrize(
    "values, field",
    [
        (dict(low_threshold=200, high_threshold=100), "high_threshold"),
        (dict(low_threshold=100, high_threshold=100), "high_threshold"),
        (dict(high_threshold=300), "high_threshold"),
        (dict(low_threshold=-1), "low_threshold"),
        (dict(blur=4), "blur"),
        (dict(control_size=100), "control_size"),
        (dict(control_size=8192), "control_size"),
        (dict(name="../up"), "name"),
        (dict(name="a/b"), "name"),
        (dict(name=".."), "name"),
        (dict(source="/nonexistent/dir"), "source"),
        (dict(out_root="/etc"), "out_root"),
        (dict(shard_size=0), "shard_size"),
        (dict(hint_layout="folder", layout="shards"), "hint_layout"),
    ],
)
def test_each_bad_value_is_named_at_its_field(roots, tmp_path, values, field):
    problems = ds.form_problems(form(tmp_path, **values), roots)
    assert field in problems, problems


def test_a_good_form_has_no_problems_and_composes_the_commands_config(roots, tmp_path):
    good = form(tmp_path, caption="a photo, with a comma", low_threshold=50, high_threshold=150, blur=3,
                control_size=256, shard_size=7)  # fmt: skip
    assert ds.form_problems(good, roots) == {}
    overrides = ds.prep_overrides(good, roots)
    cfg = ds.compose_prep(overrides)
    assert cfg.mode == "shards" and cfg.out_dir == str((tmp_path / "out" / "set1").resolve())
    assert cfg.source._target_.endswith("ImageFolder") and cfg.source.caption == "a photo, with a comma"
    assert (cfg.hint.low_threshold, cfg.hint.high_threshold, cfg.hint.blur) == (50, 150, 3)
    assert (cfg.resolution, cfg.shard_size) == (256, 7)
    hf = ds.compose_prep(ds.prep_overrides(form(tmp_path, layout="hf_dataset"), roots))
    assert hf.source._target_.endswith("HfDatasetSource") and hf.source.conditioning_image_column is None
    folder = ds.compose_prep(ds.prep_overrides(form(tmp_path, hint_layout="folder"), roots))
    assert folder.mode == "precompute" and folder.source.root == str((tmp_path / "data" / "photos").resolve())


def test_saved_settings_are_the_config_the_job_ran(roots, tmp_path):
    good = form(tmp_path)
    overrides = ds.prep_overrides(good, roots)
    cfg = ds.compose_prep(overrides)
    out = ds.output_dir(good, roots)
    ds.save_settings(out, cfg, overrides, good, roots)
    saved = OmegaConf.load(out / ds.PREP_CONFIG)
    assert saved.hydra.run.dir.startswith(f"{out}/.prep-logs/")
    del saved["hydra"]
    assert saved == cfg
    assert (out / ds.PREP_COMMAND).read_text().startswith("controlnet-prep ")
    assert (out / ds.TRAIN_COMMAND).read_text() == f"controlnet-train data=shards data.shards={out}\n"
    listed = ds.list_datasets(roots)
    assert [d["path"] for d in listed] == [str(out)]
    assert listed[0]["train_overrides"][0] == "data=shards"


def ui_config(**values):
    return OmegaConf.create({"host": "127.0.0.1", "port": 7860, "auth": None, "roots": ["."], "runs_root": None,
                             "prep_workers": 1, **values})  # fmt: skip


def test_binding_beyond_loopback_needs_auth(tmp_path):
    with pytest.raises(ConfigError, match="ui.auth"):
        check(ui_config(host="0.0.0.0", roots=[str(tmp_path)]))
    with pytest.raises(ConfigError, match="user:password"):
        check(ui_config(host="0.0.0.0", auth="nocolon", roots=[str(tmp_path)]))
    auth, roots, runs = check(ui_config(host="0.0.0.0", auth="me:secret", roots=[str(tmp_path)]))
    assert auth == ("me", "secret") and runs == tmp_path.resolve() / "runs"
    with pytest.raises(OutsideRoots):
        check(ui_config(roots=[str(tmp_path)], runs_root="/tmp/elsewhere-runs"))


def test_the_command_refuses_an_open_bind_without_auth_in_one_line(tmp_path):
    command = [sys.executable, "-m", "nemo_controlnet.cli.ui", "ui.host=0.0.0.0", f"ui.roots=[{tmp_path}]",
               f"hydra.run.dir={tmp_path / 'log'}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "ui.auth" in result.stderr and "Traceback" not in result.stderr


def test_the_folder_layout_from_the_form_is_what_training_reads(roots, tmp_path):
    """Into: folder -> controlnet-prep mode=precompute: <dataset>/canny/<stem>_canny.png and a manifest
    mapping each image to its control file; data=folder reads the pairs back."""
    import time

    from PIL import Image

    from nemo_controlnet.data.folder import FolderSource

    photos = tmp_path / "data" / "photos"
    for i in range(5):
        Image.new("RGB", (96, 64), (40 * i, 90, 200 - 30 * i)).save(photos / f"p{i}.jpg")
    good = form(tmp_path, hint_layout="folder", control_size=None)
    assert ds.form_problems(good, roots) == {}
    overrides = ds.prep_overrides(good, roots)
    out = ds.output_dir(good, roots)
    runner = ds.PrepRunner()
    state = runner.start(out, ds.compose_prep(overrides), overrides)
    end = time.monotonic() + 60
    while state.state in ("starting", "running") and time.monotonic() < end:
        time.sleep(0.1)
    assert state.state == "done", state.error
    mapping = ds.json.loads((out / "manifest.json").read_text())["hints"]
    assert sorted(mapping) == [f"p{i}.jpg" for i in range(5)]
    assert all((out / hint).is_file() and hint.endswith("_canny.png") for hint in mapping.values())
    source = FolderSource(str(photos))
    samples = list(source.samples("0", "0", False, None))
    assert len(samples) == 5 and all(s["png"] == (out / mapping[Path(s["__url__"]).name]).read_bytes() for s in samples)
    train = ds.train_overrides(good, roots)
    assert train == ["data=folder", f"data.folder.root={photos.resolve()}"]


@pytest.mark.parametrize("model,group", [("tiny", "local_diffusers"), ("tiny_sdxl", "local_diffusers_xl"),
                                         ("tiny_sd3", "local_sd3"), ("tiny_flux", "local_flux")])  # fmt: skip
def test_a_diffusers_directory_in_the_runs_form_trains_over_that_base(tmp_path, model, group):
    """The Runs form's model field takes a diffusers directory of any family: its pipeline class picks the
    local_* config, and the config built from the form's overrides is that base (same fingerprint)."""
    from nemo_controlnet.models.families import family_for
    from nemo_controlnet.models.stack import fingerprint
    from nemo_controlnet.ui.overrides import compose, run_overrides

    tiny = compose("train", [f"model={model}"]).model
    family = family_for(tiny)
    stack = family.build_stack(tiny)
    family.pipeline(stack, None).save_pretrained(tmp_path / "base")
    overrides, problems = run_overrides(str(tmp_path / "base"), 2, 1, 1e-5, "32", 0)
    assert problems == {} and f"model={group}" in overrides
    built = compose("train", overrides).model
    loaded = family_for(built).build_stack(built)
    assert fingerprint(loaded.unet, loaded.vae, *loaded.text_encoders()) == fingerprint(
        stack.unet, stack.vae, *stack.text_encoders()
    )

    (tmp_path / "other" / "transformer").mkdir(parents=True)
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "AuraFlowPipeline"}')
    _, problems = run_overrides(str(tmp_path / "other"), 2, 1, 1e-5, "32", 0)
    assert "AuraFlowPipeline" in problems["model"]
