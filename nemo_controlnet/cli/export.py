"""controlnet-export: a run's checkpoint -> diffusers ControlNet directory (see conf/export.yaml)."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE, entry_point, user_errors


@hydra.main(config_path=CONFIG_PATH, config_name="export", version_base=VERSION_BASE)
def task(cfg: DictConfig) -> None:
    from nemo_controlnet.training.run import export_checkpoint

    with user_errors():
        export_checkpoint(cfg.run_dir, cfg.checkpoint, original=cfg.original, dtype=cfg.dtype)


main = entry_point(task, "controlnet-export")

if __name__ == "__main__":
    main()
