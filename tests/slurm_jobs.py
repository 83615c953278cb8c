"""What the SLURM tests' jobs import (the jobs get this repository on PYTHONPATH)."""

import os
import time

from nemo_controlnet.data.hints import Canny


class SlowCanny(Canny):
    """Canny that takes ``SLOW_CANNY_SECONDS`` per image, so an array task is still running when the
    test cancels it (a hint detector by ``_target_``, as users plug in their own)."""

    def __call__(self, image, conditioning=None, rng=None):
        time.sleep(float(os.environ.get("SLOW_CANNY_SECONDS", "0")))
        return super().__call__(image, conditioning, rng)
