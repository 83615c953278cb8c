"""controlnet-migrate: a NeMo ControlNet config -> an experiment config of ours (see conf/migrate.yaml)."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE, entry_point, user_errors


@hydra.main(config_path=CONFIG_PATH, config_name="migrate", version_base=VERSION_BASE)
def task(cfg: DictConfig) -> None:
    from nemo_controlnet.migration import migrate_file

    with user_errors():
        print(migrate_file(cfg.nemo_config, cfg.out, overwrite=cfg.overwrite))


main = entry_point(task, "controlnet-migrate")

if __name__ == "__main__":
    main()
