"""controlnet-synth: write the fill50k-style shapes dataset (see conf/synth.yaml)."""

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE


@hydra.main(config_path=CONFIG_PATH, config_name="synth", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> None:
    from nemo_controlnet.data.synthetic import write_shapes_dataset

    write_shapes_dataset(**OmegaConf.to_container(cfg.dataset, resolve=True))


if __name__ == "__main__":
    main()
