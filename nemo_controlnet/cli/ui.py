"""controlnet-ui: see conf/ui.yaml and docs/ui.md."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE, entry_point, user_errors


@hydra.main(config_path=CONFIG_PATH, config_name="ui", version_base=VERSION_BASE)
def task(cfg: DictConfig) -> None:
    from nemo_controlnet.ui.server import serve

    with user_errors():
        serve(cfg.ui)


main = entry_point(task, "controlnet-ui")

if __name__ == "__main__":
    main()
