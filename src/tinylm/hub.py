"""Hugging Face hub access that fails fast offline: one quick reachability probe, then cache-only mode.

huggingface_hub retries a failed request five times with back-off (and has no setting to turn that off),
so offline a download took 26 to 99 s to fail. We probe the hub's host once (a TCP connect, 3 s at most;
through the HTTPS proxy when one is set) and, when it cannot be reached, switch the Hugging Face libraries
to their documented offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): cached files still load, anything
else fails at once.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse
import urllib.request

PROBE_TIMEOUT_S = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_reachable: dict[tuple[str, int], bool] = {}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_address() -> tuple[str, int]:
    """(host, port) a request to the hub connects to first: the HTTPS proxy if set, else HF_ENDPOINT."""
    proxy = urllib.request.getproxies().get("https")
    url = urllib.parse.urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (or the proxy) opens within `timeout` seconds; probed once."""
    address = hub_address()
    if address not in _reachable:
        try:
            socket.create_connection(address, timeout=timeout).close()
            _reachable[address] = True
        except OSError:  # no DNS, refused, unreachable, timed out
            _reachable[address] = False
    return _reachable[address]


def offline_reason() -> str | None:
    """Why the hub is off limits (offline mode set, or unreachable), after switching to offline mode; else None."""
    set_by_user = [v for v in _OFFLINE_VARS if _truthy(os.environ.get(v))]
    if set_by_user:
        reason = f"{set_by_user[0]} is set"
    elif not hub_reachable():
        host, port = hub_address()
        reason = f"the Hugging Face hub ({host}:{port}) cannot be reached"
    else:
        return None
    _set_offline()
    return reason


def _set_offline() -> None:
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    # The libraries read these once, at import; patch the copies of the ones already imported.
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as datasets_config

        datasets_config.HF_HUB_OFFLINE = True
        if hasattr(datasets_config, "HF_DATASETS_OFFLINE"):
            datasets_config.HF_DATASETS_OFFLINE = True
