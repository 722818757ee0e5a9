"""Real processes for the sidecar tests and benchmark: `tritonserver` from the wheel, and the sidecar.

Both run in their own process group on 127.0.0.1 and free ports, and are stopped by group, so the
Python-backend stubs Triton forks never outlive a test session.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
START_TRITON = REPO / "sidecar" / "start_triton.sh"
INSTALL_TRITON = REPO / "sidecar" / "install_triton.sh"

__all__ = ["SidecarProcess", "TritonProcess", "free_port", "http_status", "triton_available"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of `GET path` on 127.0.0.1:port, or None when nothing answers."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("GET", path)
        status = connection.getresponse().status
        connection.close()
        return status
    except OSError:
        return None


def triton_available() -> str | None:
    """None when tritonserver can run here, else why not."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        return "nvidia-pytriton is not installed"
    var = Path(os.environ.get("EDGECATCH_VAR", REPO / "var"))
    if not (var / "triton" / "backends" / "python" / "triton_python_backend_stub").exists():
        result = subprocess.run([str(INSTALL_TRITON), sys.prefix], capture_output=True, text=True)
        if result.returncode != 0:
            return f"install_triton.sh failed: {result.stderr[-2000:]}"
    return None


class _Process:
    name = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
        finally:
            log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _wait_until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited while starting:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not {what} after {timeout} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal the whole process group, wait, and SIGKILL what is left."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the leader's pid is the group id
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # stragglers (Triton's stubs) included
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None


class TritonProcess(_Process):
    """`sidecar/start_triton.sh` on free ports; `stop()`/`start()` again reuse the same ports."""

    name = "tritonserver"

    def __init__(self, log_path: Path, *, args: tuple[str, ...] = ()) -> None:
        super().__init__(log_path)
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.args = args

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 60.0) -> TritonProcess:
        env = dict(os.environ, VENV=sys.prefix, TRITON_ADDRESS="127.0.0.1",
                   TRITON_HTTP_PORT=str(self.http_port), TRITON_GRPC_PORT=str(self.grpc_port),
                   TRITON_METRICS_PORT=str(self.metrics_port))
        self._spawn([str(START_TRITON), *self.args], env)
        self._wait_until(lambda: http_status(self.http_port, "/v2/health/ready") == 200, timeout, "ready")
        return self

    def kill(self) -> None:
        """An abrupt stop (SIGKILL to the server and its stubs): what a crash looks like to the sidecar."""
        self.stop(signal.SIGKILL)


class SidecarProcess(_Process):
    """`python -m edgecatch sidecar --config <tmp>/edgecatch.yaml` on free ports."""

    name = "edgecatch sidecar"

    def __init__(self, workdir: Path, triton: TritonProcess, *, policies: Path, sink: dict,
                 models: dict | None = None, extra: dict | None = None) -> None:
        super().__init__(workdir / "sidecar.log")
        self.workdir = workdir
        self.http_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        config = {
            "policies": str(policies),
            "policy_reload_seconds": 60,
            "delivery": {"spool_dir": str(workdir / "spool"), "sink": sink,
                         "retry": {"initial_seconds": 0.1, "max_seconds": 1}},
            "sidecar": {
                "triton": {"http": triton.http, "grpc": triton.grpc},
                "listen": {"http": f"127.0.0.1:{self.http_port}", "grpc": f"127.0.0.1:{self.grpc_port}",
                           "admin": f"127.0.0.1:{self.admin_port}"},
                "models": models if models is not None else example_models(),
            },
            **(extra or {}),
        }
        self.config_path = workdir / "edgecatch.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> SidecarProcess:
        argv = [sys.executable, "-m", "edgecatch", "sidecar", "--config", str(self.config_path)]
        self._spawn(argv, dict(os.environ, **(env or {})))
        self._wait_until(lambda: http_status(self.admin_port, "/edgecatch/healthz") is not None, timeout,
                         "answering")
        return self


def example_models() -> dict:
    """How to read the two example models (as in sidecar/edgecatch.yaml)."""
    detections = {"boxes": "BOXES", "scores": "SCORES", "classes": "CLASSES", "box_format": "xyxy",
                  "normalized": False}
    names = ["person", "face", "cat_face"]
    return {
        "people_detector": {"model": "people-detector", "image": {"input": "IMAGE"}, "detections": detections,
                            "class_names": names},
        "trivial_detector": {"model": "trivial-detector", "image": {"input": "IMAGE"}, "detections": detections,
                             "class_names": names},
    }
