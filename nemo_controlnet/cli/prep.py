"""controlnet-prep: see conf/prep.yaml."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE


@hydra.main(config_path=CONFIG_PATH, config_name="prep", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> None:
    from nemo_controlnet.data.prep import run_prep

    run_prep(cfg)


if __name__ == "__main__":
    main()
