"""controlnet-prep: see conf/prep.yaml."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE, entry_point, user_errors


@hydra.main(config_path=CONFIG_PATH, config_name="prep", version_base=VERSION_BASE)
def task(cfg: DictConfig) -> None:
    from nemo_controlnet.prep.job import run_prep

    with user_errors():
        run_prep(cfg)


main = entry_point(task, "controlnet-prep")

if __name__ == "__main__":
    main()
