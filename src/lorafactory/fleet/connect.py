"""Connecting the fleet's driver to Ray: a private local Ray, or a cluster at an address that answers.

Ray itself waits minutes for a cluster address where nothing listens (printing a warning every few
seconds), and its errors read as file errors once they reach the command line; here an address is
tried first, and what goes wrong is said in one line that names the address.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from lorafactory.errors import ConfigError, first_line

REACH_TIMEOUT_S = 10.0


def host_and_port(address: str) -> tuple[str, int] | None:
    """The host and port of a Ray address (``host:port``, ``ray://host:port``); None for ``auto`` or an
    address without a port, which Ray resolves itself."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--address {address!r} has no valid port; give HOST:PORT or ray://HOST:PORT") from None
    return (parts.hostname, port) if parts.hostname and port else None


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Refuse at once an address where nothing accepts a connection."""
    target = host_and_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(
            f"no Ray cluster answers at {address} ({reason}); start Ray there (`ray start --head`), or fix --address"
        ) from None


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None):
    """Ray, initialised: at ``address`` (a cluster; ``ray://`` for Ray Client from outside it), or, without
    one, a fresh local Ray with ``num_cpus`` and ``num_gpus`` (never a cluster that happens to run here)."""
    import ray

    if ray.is_initialized():
        return ray
    if not address:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
        return ray
    check_reachable(address)
    try:
        if address.startswith("ray://"):
            ray.init(address=address)
        else:
            ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:  # e.g. `auto` with no Ray running on this machine
        raise ConfigError(f"cannot connect to Ray at {address}: {first_line(exc)}") from None
    return ray
