"""Hugging Face Hub access for lm_eval: online when the user is, offline when asked or when there is no network.

lm_eval's bundled tasks (cmmlu, ceval, gsm8k, ...) load their datasets from the Hub, or from the local
cache when offline. Offline is chosen by `--offline`, by `HF_HUB_OFFLINE=1` in the environment, or
when the Hub's host cannot be reached (one TCP connection, a few seconds at most).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
TRUE = ("1", "true", "yes", "on")


def hub_host() -> tuple[str, int]:
    """(host, port) of the Hub endpoint ($HF_ENDPOINT, else huggingface.co)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's host opens within `timeout` seconds."""
    try:
        with socket.create_connection(hub_host(), timeout=timeout):
            return True
    except OSError:
        return False


def offline_reason(asked: bool) -> str | None:
    """Why lm_eval should run offline (`--offline`, HF_HUB_OFFLINE, no network), or None to run online."""
    if asked:
        return "--offline"
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").lower() in TRUE:
            return f"{var}={os.environ[var]}"
    if not hub_reachable():
        host, port = hub_host()
        return f"no network: {host}:{port} cannot be reached"
    return None


@contextmanager
def offline() -> Iterator[None]:
    """Hub access off for the duration (env vars, and the flags datasets / huggingface_hub read at import)."""
    import datasets.config
    import huggingface_hub.constants as hub

    env = {k: os.environ.get(k) for k in OFFLINE_VARS}
    flags = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE)
    os.environ.update(dict.fromkeys(OFFLINE_VARS, "1"))
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = flags
