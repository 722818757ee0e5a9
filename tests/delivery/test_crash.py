"""`kill -9` of a real delivering process, then a restart: everything arrives exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import fill_spool, open_spool, wait_for

PROC = Path(__file__).with_name("deliver_proc.py")


def spawn(config, server) -> subprocess.Popen:
    env = {**os.environ, "TEST_ROBOFLOW_KEY": server.api_key}
    proc = subprocess.Popen([sys.executable, str(PROC), str(config.spool_dir), server.url, server.dataset],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert out.split() == ["started", "done"]


def annotated_once(server, ids: list[str]) -> None:
    images = server.images_by_name()
    assert set(images) == {f"{i}.jpg" for i in ids}
    assert all(server.store.stored_names[name] == 1 for name in images)
    assert all(image.annotation is not None for image in images.values())


def test_kill_between_image_and_annotation_redoes_only_the_annotation(server, roboflow_config, metrics):
    config = roboflow_config()
    ids = fill_spool(open_spool(config, metrics), 200)
    server.fault("hang", step="annotate")  # every worker stores its image, then waits on the annotation
    proc = spawn(config, server)
    wait_for(lambda: server.in_flight["annotate"] == 4, what="four annotations in flight")
    kill9(proc)
    server.clear()  # the held requests now fail (503), storing nothing
    wait_for(lambda: server.in_flight["annotate"] == 0, what="the held requests to end")
    stored_before = set(server.images_by_name())
    assert len(stored_before) == 4 and not server.annotated()
    states = list((config.spool_dir / "ready").glob("*.state"))
    assert len(states) == 4  # the image ids were on disk before the annotation was attempted

    finish(spawn(config, server))
    annotated_once(server, ids)
    # No image was uploaded twice: the restart read the image ids and only redid the annotations.
    assert set(server.store.upload_requests.values()) == {1}
    assert len(open_spool(config, metrics)) == 0


@pytest.mark.parametrize("kill_points", [(60, 250, 400)])
def test_repeated_kills_mid_delivery_lose_and_repeat_nothing(server, roboflow_config, metrics, kill_points):
    config = roboflow_config()
    ids = fill_spool(open_spool(config, metrics), 600)
    for point in kill_points:
        proc = spawn(config, server)
        wait_for(lambda: len(server.annotated()) >= point, timeout=120, what=f"{point} samples delivered")
        kill9(proc)
    finish(spawn(config, server))
    annotated_once(server, ids)
    # Only requests in flight at a kill (4 workers) can have been repeated.
    repeated_uploads = sum(server.store.upload_requests.values()) - len(ids)
    repeated_annotations = sum(server.store.annotate_requests.values()) - len(ids)
    assert 0 <= repeated_uploads <= 4 * len(kill_points)
    assert 0 <= repeated_annotations <= 4 * len(kill_points)
    assert len(open_spool(config, metrics)) == 0
    assert not list((config.spool_dir / "quarantine").iterdir())


def test_two_processes_sharing_one_spool_deliver_each_sample_once(server, roboflow_config, metrics):
    config = roboflow_config()
    ids = fill_spool(open_spool(config, metrics), 400)
    first, second = spawn(config, server), spawn(config, server)
    finish(first)
    finish(second)
    annotated_once(server, ids)
    assert set(server.store.upload_requests.values()) == {1}  # no sample was even attempted twice
    assert set(server.store.annotate_requests.values()) == {1}
