"""Thin Hydra mains; the configs ship inside the package so the commands work from any directory."""

CONFIG_PATH = "../conf"
VERSION_BASE = "1.3"
