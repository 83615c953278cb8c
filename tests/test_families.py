"""Model families as objects: training, validation and export reach the base only through the family
named by ``model.family``; the SD UNet family's objective is diffusers' (epsilon / v-prediction)."""

from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from nemo_controlnet.models.families import family_for
from nemo_controlnet.models.families.sd_unet import SDUNetFamily
from nemo_controlnet.models.stack import build_stack
from nemo_controlnet.training.run import train


class CountingFamily(SDUNetFamily):
    """The SD UNet family, counting which of its methods the recipe calls."""

    calls: Counter = Counter()

    def __getattribute__(self, name):
        if not name.startswith("_") and name != "calls" and name in type(self).__dict__.get("counted", ()):
            CountingFamily.calls[name] += 1
        return super().__getattribute__(name)

    counted = ("build_stack", "make_controlnet", "latents", "conditioning", "noise", "control_residuals", "denoise",
               "pipeline", "resolution_multiple", "export_original_controlnet", "encode_text")


def test_configs_written_before_families_are_sd_unets(train_cfg):
    cfg = train_cfg()
    assert isinstance(family_for(cfg.model), SDUNetFamily)
    legacy = OmegaConf.masked_copy(cfg.model, [k for k in cfg.model if k != "family"])
    assert "family" not in legacy and isinstance(family_for(legacy), SDUNetFamily)
    with pytest.raises(TypeError, match="model.family: collections.Counter is not a ModelFamily"):
        family_for(OmegaConf.create({"family": {"_target_": "collections.Counter"}}))


def test_the_recipe_reaches_the_base_only_through_its_family(train_cfg, tmp_path):
    CountingFamily.calls.clear()
    cfg = train_cfg(f"model.family._target_={__name__}.CountingFamily", "trainer.max_steps=2",
                    "validation.num_samples=1", "validation.every_n_steps=0")  # fmt: skip
    trainer, module = train(cfg)
    assert isinstance(module.family, CountingFamily) and trainer.global_step == 2
    calls = CountingFamily.calls
    # one per step (and one more where the throughput callback counts a step's FLOPs)
    assert calls["noise"] == calls["denoise"] == calls["control_residuals"] == calls["latents"] >= 2
    for name in ("build_stack", "make_controlnet", "resolution_multiple", "pipeline", "export_original_controlnet"):
        assert calls[name] >= 1, name
    assert (tmp_path / "run" / "controlnet" / "config.json").is_file()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_sd_objective_is_diffusers_noise_and_target(train_cfg, prediction_type):
    cfg = train_cfg(f"model.prediction_type={prediction_type}")
    stack, family = build_stack(cfg.model), SDUNetFamily()
    latents = torch.randn(3, 4, 8, 8)
    torch.manual_seed(5)
    noisy, timesteps, target = family.noise(stack, latents)
    torch.manual_seed(5)
    noise = torch.randn(latents.shape)
    expected_t = torch.randint(0, stack.noise_scheduler.config.num_train_timesteps, (3,))
    assert torch.equal(timesteps, expected_t)
    torch.testing.assert_close(noisy, stack.noise_scheduler.add_noise(latents, noise, timesteps), rtol=0, atol=0)
    expected = noise if prediction_type == "epsilon" else stack.noise_scheduler.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(target, expected, rtol=0, atol=0)
