"""Starting the page: where it binds (127.0.0.1 unless ``ui.host`` says otherwise, and then only
with ``ui.auth``), which directories it may touch (``ui.roots``), no analytics, no network lookups."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig

from nemo_controlnet.config import ConfigError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if auth in (None, ""):
        return None
    user, sep, password = str(auth).partition(":")
    if not sep or not user or not password:
        raise ConfigError("ui.auth: expected user:password")
    return user, password


def check(ui: DictConfig) -> tuple[tuple[str, str] | None, "Roots", Path]:  # noqa: F821
    """ui.* checked before gradio is imported: a bad value fails in seconds, naming its key."""
    from nemo_controlnet.ui.paths import Roots

    auth = parse_auth(ui.get("auth"))
    host = str(ui.host)
    if not is_loopback(host) and auth is None:
        raise ConfigError(f"ui.host={host}: binding beyond this machine needs ui.auth=user:password")
    if not isinstance(ui.port, int) or not 0 < ui.port < 65536:
        raise ConfigError(f"ui.port={ui.port!r}: expected a port number 1-65535")
    roots = Roots(list(ui.roots))
    runs_root = roots.resolve(ui.runs_root or roots.roots[0] / "runs", "ui.runs_root")
    runs_root.mkdir(parents=True, exist_ok=True)
    return auth, roots, runs_root


def serve(ui: DictConfig, block: bool = True):
    """Build and launch the app; returns (app, url) when ``block`` is False (tests)."""
    started = time.monotonic()
    auth, roots, runs_root = check(ui)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nemo_controlnet.ui.app import App, build

    page = build(App(roots, runs_root, int(ui.prep_workers)))
    _, url, _ = page.launch(
        server_name=str(ui.host), server_port=int(ui.port), auth=auth, prevent_thread_lock=True, quiet=True,
        allowed_paths=[str(r) for r in roots], show_error=True, ssr_mode=False, footer_links=[],
    )  # fmt: skip
    log.info("controlnet-ui serving %s (roots: %s; runs: %s) %.1f s after start", url,
             ", ".join(map(str, roots)), runs_root, time.monotonic() - started)  # fmt: skip
    print(f"controlnet-ui: serving {url}", flush=True)
    if not block:
        return page, url
    try:
        page.block_thread()
    finally:
        page.close()
    return page, url
