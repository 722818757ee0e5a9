"""Stopping the servers the tests start in their own process group (bentoml serve, prometheus)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group (a graceful stop), SIGKILL it if it outlives `grace` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
