"""controlnet-generate: hints (or images + a detector) and prompts -> images (see conf/generate.yaml)."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE, entry_point, user_errors


@hydra.main(config_path=CONFIG_PATH, config_name="generate", version_base=VERSION_BASE)
def task(cfg: DictConfig) -> None:
    from nemo_controlnet.inference.generate import generate

    with user_errors():
        generate(cfg)


main = entry_point(task, "controlnet-generate")

if __name__ == "__main__":
    main()
