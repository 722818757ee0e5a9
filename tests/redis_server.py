"""A real redis-server for tests: started on a free loopback port, killed and restarted at will.

No persistence (`--save ''`, `--appendonly no`): a restart comes back empty, like a fresh
replacement after a crash. CI installs Debian's `redis-server` (see `.ci/run`); elsewhere the tests
that need it are skipped with the command to install it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

__all__ = ["RedisServer", "redis_server_binary"]


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server not installed (apt-get install -y --no-install-recommends redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: missing there is a broken pipeline, not a skip
        pytest.skip(message)
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None, password: str | None = None) -> None:
        self.binary = redis_server_binary()
        self.password = password
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
             "--enable-debug-command", "local",  # DEBUG SLEEP: a real Redis that stalls
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log")
                raise RuntimeError(f"redis-server exited: {log.read_text() if log.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)
                    if reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the way a crashed or evicted Redis goes away."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0, password=self.password)
