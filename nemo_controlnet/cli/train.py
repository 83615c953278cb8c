"""controlnet-train: see conf/train.yaml."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> None:
    from nemo_controlnet.training.run import train

    train(cfg)


if __name__ == "__main__":
    main()
