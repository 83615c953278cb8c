"""controlnet-export: a run's checkpoint -> diffusers ControlNet directory (see conf/export.yaml)."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE


@hydra.main(config_path=CONFIG_PATH, config_name="export", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> None:
    from nemo_controlnet.training.run import export_checkpoint

    export_checkpoint(cfg.run_dir, cfg.checkpoint, original=cfg.original, dtype=cfg.dtype)


if __name__ == "__main__":
    main()
