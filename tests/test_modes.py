"""Training modes as objects: each says what trains; a checkpoint records its mode and refuses another;
a new mode is a class and a config entry, with no edit elsewhere."""

import json

import pytest
import torch

from nemo_controlnet.training.modes import TrainingMode, make_mode
from nemo_controlnet.training.modes.controlnet import ControlNetMode
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.run import train


class HintEmbeddingMode(ControlNetMode):
    """A mode defined outside the package: only the ControlNet's hint encoder trains."""

    name = "hint_embedding"

    def unlock(self, module) -> None:
        module.controlnet.requires_grad_(False)
        module.controlnet.controlnet_cond_embedding.requires_grad_(True)

    def param_groups(self, module, optim):
        return [{"params": list(module.controlnet.controlnet_cond_embedding.parameters()), "lr": optim.lr,
                 "name": "hint_embedding"}]  # fmt: skip


def trainable(module) -> set[str]:
    return {name.split(".")[0] for name in module.trainable_named_parameters()}


@pytest.mark.parametrize("overrides, mode, parts, groups", [
    ([], "controlnet", {"controlnet"}, ["controlnet"]),
    (["model.sd_locked=false"], "controlnet", {"controlnet", "unet"}, ["controlnet", "unet_decoder"]),
    (["model.control_stage_config=null"], "base", {"unet"}, ["unet"]),
    (["training_mode=base"], "base", {"unet"}, ["unet"]),  # chosen by name: the config's ControlNet is not built
])  # fmt: skip
def test_each_mode_builds_freezes_and_groups_its_own_parts(train_cfg, overrides, mode, parts, groups):
    cfg = train_cfg(*overrides)
    module = ControlNetModule(cfg.model, cfg.optim, mode=cfg.get("training_mode"))
    assert module.training_mode.name == mode and trainable(module) == parts
    assert (module.controlnet is None) == (mode == "base")
    assert [g["name"] for g in module.training_mode.param_groups(module, cfg.optim)] == groups
    grouped = {id(p) for g in module.training_mode.param_groups(module, cfg.optim) for p in g["params"]}
    assert grouped == {id(p) for p in module.trainable_named_parameters().values()}  # every trainable one, once
    assert module.vae in module.locked_modules() and module.text_encoder in module.locked_modules()
    assert (module.unet in module.locked_modules()) == (mode != "base")  # (sd_locked=false: its decoder unlocked)


def test_a_mode_is_named_clearly_when_its_config_is_missing(train_cfg):
    cfg = train_cfg()
    with pytest.raises(ValueError, match="training_mode=adapter needs the adapter block"):
        make_mode("adapter", cfg.model)
    with pytest.raises(ValueError, match="training_mode=.bogus."):
        make_mode("bogus", cfg.model)
    with pytest.raises(ValueError, match="training_mode=controlnet needs model.control_stage_config"):
        ControlNetModule(train_cfg("model.control_stage_config=null").model, cfg.optim, mode="controlnet")


def test_a_checkpoint_records_its_mode_and_refuses_another(train_cfg, tmp_path):
    train(train_cfg("trainer.max_steps=2", "validation.num_samples=0", "export.enabled=false"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step=0000002.ckpt", weights_only=True)
    assert ckpt["nemo_controlnet"]["mode"] == "controlnet" and ckpt["nemo_controlnet"]["family"] == "sd_unet"
    with pytest.raises(RuntimeError, match="written in mode 'controlnet', but this run trains in mode 'base'"):
        train(train_cfg("trainer.max_steps=4", "validation.num_samples=0", "training_mode=base"))


def test_a_new_mode_is_a_class_and_a_config_entry(train_cfg, tmp_path):
    cfg = train_cfg("training_mode=controlnet", f"training_mode._target_={__name__}.HintEmbeddingMode",
                    "trainer.max_steps=2", "optim.lr=1e-2", "validation.num_samples=0",
                    "export.original=false")  # fmt: skip
    start = ControlNetModule(cfg.model, cfg.optim, mode=cfg.training_mode)
    before = {k: v.clone() for k, v in start.controlnet.state_dict().items()}
    trainer, module = train(cfg)
    assert isinstance(module.training_mode, HintEmbeddingMode) and isinstance(module.training_mode, TrainingMode)
    after = module.controlnet.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"controlnet_cond_embedding"}
    ckpt = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))[-1], weights_only=True)
    assert ckpt["nemo_controlnet"]["mode"] == "hint_embedding"
    assert {k.split(".")[1] for k in ckpt["state_dict"]} == {"controlnet_cond_embedding"}  # only what trains
    exported = json.loads((tmp_path / "run" / "controlnet" / "config.json").read_text())
    assert exported["_class_name"] == "ControlNetModel"
