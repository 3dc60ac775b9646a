"""A real ``redis-server`` for the user-state store's tests: on a free loopback port, its
files in a temporary folder, persisting every write before it answers (AOF, fsync
always), as docs/serving.md recommends."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = "redis-server is not installed (Debian: apt-get install redis-server)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process, restartable on the same port and folder.

    Attributes:
        folder: its working folder (the append-only file, the log).
        port: its loopback port, the same across restarts.
        url: ``redis://127.0.0.1:PORT/0``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Starts the server (loading what its folder holds) and waits until it answers."""
        assert REDIS_SERVER is not None, NO_REDIS
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.folder),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--logfile", "redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stops the server with ``sig`` (SIGKILL: as if the machine lost it) and waits."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)  # a paused server must run to stop
                self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def pause(self) -> None:
        """Freezes the server (SIGSTOP): connections open, no answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Lets a paused server run again."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@contextlib.contextmanager
def running_redis(folder: Path) -> Iterator[RedisServer]:
    """A started ``RedisServer`` in ``folder``, stopped on exit; skips without one."""
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` of this test's own (``.url``), stopped after it."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for a test module whose tests use keys of their own."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server
