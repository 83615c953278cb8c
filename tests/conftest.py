import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from nemo_controlnet.prep.synthetic import write_shapes_dataset  # noqa: E402
from tests.slurm_cluster import SlurmCluster, missing_parts  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small shapes dataset: 4 train shards of 16 samples, 1 validation shard of 4."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root / "train", num_samples=64, shard_size=16, resolution=64, seed=0)
    write_shapes_dataset(root / "val", num_samples=4, shard_size=4, resolution=64, seed=1)
    return root


def compose_train(overrides: list[str] = ()) -> DictConfig:
    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def tiny_family(model: str):
    """(train config, its model family, the family's stack built from the config's random init)."""
    from nemo_controlnet.models.families import family_for

    cfg = compose_train([f"model={model}"])
    family = family_for(cfg.model)
    return cfg, family, family.build_stack(cfg.model)


@pytest.fixture
def train_cfg(tmp_path, shapes_dir):
    """The embedded default config, shrunk for tests, pointing at tmp dirs. Call with overrides."""

    def make(*overrides: str) -> DictConfig:
        base = [
            f"run_dir={tmp_path / 'run'}",
            f"data.shards={shapes_dir / 'train'}",
            f"data.validation_shards={shapes_dir / 'val'}",
            "data.synthetic=null",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=16",
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "checkpoint.every_n_steps=2",
            "validation.every_n_steps=0",
            "validation.num_samples=2",
            "validation.num_inference_steps=2",
            "logger=csv",
        ]
        cfg = compose_train(base + list(overrides))
        OmegaConf.set_struct(cfg, False)
        return cfg

    return make


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM cluster (munged, slurmctld, two slurmd nodes) for the whole test run."""
    why = missing_parts()
    if why:
        pytest.skip(why)
    cluster = SlurmCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pretrained_controlnet(tmp_path_factory):
    """A 'pretrained' ControlNet for the tiny base: copied from its UNet, zero convs made non-zero."""
    import torch
    from diffusers import ControlNetModel

    from nemo_controlnet.models.stack import build_stack

    cfg = compose_train([])
    net = ControlNetModel.from_unet(build_stack(cfg.model).unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    torch.manual_seed(0)
    for name, p in net.named_parameters():
        if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
            p.data.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("pretrained") / "controlnet"
    net.save_pretrained(path)
    return path
