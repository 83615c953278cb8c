"""controlnet-synth: write the fill50k-style shapes dataset (see conf/synth.yaml)."""

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE, entry_point, user_errors


@hydra.main(config_path=CONFIG_PATH, config_name="synth", version_base=VERSION_BASE)
def task(cfg: DictConfig) -> None:
    from nemo_controlnet.prep.synthetic import write_shapes_dataset

    with user_errors():
        write_shapes_dataset(**OmegaConf.to_container(cfg.dataset, resolve=True))


main = entry_point(task, "controlnet-synth")

if __name__ == "__main__":
    main()
