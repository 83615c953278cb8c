"""controlnet-generate: hints (or images + a detector) and prompts -> images (see conf/generate.yaml)."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE


@hydra.main(config_path=CONFIG_PATH, config_name="generate", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> None:
    from nemo_controlnet.inference.generate import generate

    generate(cfg)


if __name__ == "__main__":
    main()
