"""nemo_controlnet: config-driven ControlNet training over a locked Stable Diffusion."""

__version__ = "0.1.0"
