"""Runs the HTTP service with uvicorn on a socket bound here (port 0: any free port).

Binding the socket before uvicorn starts lets the caller learn the real port (and
tests and benchmarks start a server on a free one) and fails early, with one line,
when the address is taken.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from twotower.errors import ConfigError, DataError
from twotower.serving.settings import ServiceConfig
from twotower.serving.workers import Supervisor, serve_app

log = logging.getLogger(__name__)

ADMIN_TOKEN_VARIABLE = "TWOTOWER_ADMIN_TOKEN"
INGEST_TOKEN_VARIABLE = "TWOTOWER_INGEST_TOKEN"


def read_token(path: Path | None, variable: str, what: str = "token") -> str | None:
    """A token from ``path`` (its first line) or the environment ``variable``.

    Never from the command line itself, where other users of the machine could read
    it in the process list.

    Raises:
        DataError: the file cannot be read, or holds fewer than 16 characters.
    """
    if path is None:
        return os.environ.get(variable) or None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the {what} ({err})") from None
    if len(token) < 16:
        raise DataError(f"{path}: the {what} must be at least 16 characters")
    return token


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host!r}: not an address to bind ({err})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror})") from None
    sock.listen(2048)
    return sock


def serve(
    folder: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServiceConfig | None = None,
    on_ready: Callable[[str], None] | None = None,
    workers: int = 1,
) -> None:
    """Loads the artifact, binds ``host:port`` and serves until SIGINT or SIGTERM.

    Args:
        folder: the artifact folder; verified before anything listens.
        host: the address to bind; 127.0.0.1 unless the service should be reachable
            from other machines.
        port: the TCP port; 0 picks a free one.
        config: the service's settings.
        on_ready: called with the base URL once the socket listens (and, with several
            workers, every worker serves).
        workers: processes accepting on the socket (``workers.py``); 1: this one.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    config = config or ServiceConfig()
    app = None
    if workers == 1:  # else the parent imports neither torch nor the web framework
        from twotower.serving.http import create_app

        app = create_app(folder, config)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
    if not _is_loopback(bound_host) and config.admin_token is None:
        log.warning("listening on %s without an admin token: /admin/* answers loopback only", url)
    if app is None:
        supervisor = Supervisor(folder, config, sock, workers)
        try:
            supervisor.start()
            if on_ready is not None:
                on_ready(url)
            supervisor.run()
        finally:
            supervisor.stop()
            sock.close()
        return
    if on_ready is not None:
        on_ready(url)
    try:
        serve_app(app, sock)
    finally:
        sock.close()


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
