"""Running real `bentoml serve` processes on 127.0.0.1, configured through EDGECATCH_CONFIG."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tests.process_groups import stop_group

REPO = Path(__file__).resolve().parents[2]
BENTOML = Path(sys.executable).parent / "bentoml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class BentoServer:
    url: str
    workdir: Path
    config_path: Path
    policy_path: Path
    log_path: Path
    process: subprocess.Popen

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value from the service's own /metrics (summed over workers by BentoML)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(workdir: Path, policy_text: str, delivery: dict, **extra) -> tuple[Path, Path]:
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(policy_text)
    config = {
        "policies": str(policy_path),
        "policy_reload_seconds": 0.2,
        "recall": {"max_items": 1000, "max_age_seconds": 120},
        "delivery": {"spool_dir": str(workdir / "spool"), **delivery},
        **extra,
    }
    config_path = workdir / "edgecatch.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return config_path, policy_path


def start_bento(service: str, workdir: Path, config_path: Path, policy_path: Path, env: dict[str, str],
                workers: int = 1) -> BentoServer:
    port = free_port()
    log_path = workdir / "bentoml.log"
    environment = {**os.environ, "EDGECATCH_CONFIG": str(config_path), "DETECTOR_WORKERS": str(workers),
                   "BENTOML_HOME": str(workdir / "bentoml-home"), **env}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(BENTOML), "serve", service, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = BentoServer(f"http://127.0.0.1:{port}", workdir, config_path, policy_path, log_path, process)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_bento(server)
    raise RuntimeError(f"bentoml serve did not become ready:\n{server.log()[-4000:]}")


def stop_bento(server: BentoServer) -> None:
    stop_group(server.process, grace=30)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    """Poll until predicate() is truthy (returns its value) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value
