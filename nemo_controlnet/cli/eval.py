"""controlnet-eval: a ControlNet with and without control on held-out samples -> metrics (see conf/eval.yaml)."""

import hydra
from omegaconf import DictConfig

from nemo_controlnet.cli import CONFIG_PATH, VERSION_BASE, entry_point, user_errors


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base=VERSION_BASE)
def task(cfg: DictConfig) -> None:
    from nemo_controlnet.eval.evaluate import evaluate

    with user_errors():
        evaluate(cfg)


main = entry_point(task, "controlnet-eval")

if __name__ == "__main__":
    main()
