"""controlnet-init: a Stable Diffusion checkpoint -> an initial ControlNet (see conf/init.yaml)."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE, entry_point, user_errors


@hydra.main(config_path=CONFIG_PATH, config_name="init", version_base=VERSION_BASE)
def task(cfg: DictConfig) -> None:
    from nemo_controlnet.models.init_controlnet import init_controlnet

    with user_errors():
        init_controlnet(cfg.base, cfg.out, cfg.model, hint_channels=cfg.hint_channels, dtype=cfg.dtype,
                        original=cfg.original, overwrite=cfg.overwrite)  # fmt: skip


main = entry_point(task, "controlnet-init")

if __name__ == "__main__":
    main()
