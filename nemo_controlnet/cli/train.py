"""controlnet-train: see conf/train.yaml."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE, entry_point, user_errors


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base=VERSION_BASE)
def task(cfg: DictConfig) -> None:
    from nemo_controlnet.training.run import train

    with user_errors():
        train(cfg)


main = entry_point(task, "controlnet-train")

if __name__ == "__main__":
    main()
