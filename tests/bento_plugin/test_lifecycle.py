"""Delivery starts and stops with the BentoML service: what could not be delivered before a stop
waits in the spool and is delivered, once, by the next start."""

from __future__ import annotations

import textwrap

from tests.upload_api_server import UploadApiServer

from .harness import start_bento, stop_bento, wait_for, write_config

POLICY = textwrap.dedent("""
    version: 1
    policies:
      - name: everything
        random: 1.0
""")


def test_samples_spooled_at_stop_are_delivered_after_restart(tmp_path, unique_jpeg):
    upload_api = UploadApiServer().up()
    upload_api.down()  # the destination is away for the whole first run
    config_path, policy_path = write_config(
        tmp_path, POLICY,
        delivery={"drain_seconds": 1, "retry": {"initial_seconds": 0.05, "max_seconds": 0.2},
                  "sink": {"type": "roboflow", "base_url": upload_api.url, "dataset": upload_api.dataset,
                           "api_key_env": "TEST_ROBOFLOW_KEY"}})
    env = {"TEST_ROBOFLOW_KEY": upload_api.api_key}
    server = start_bento("bento_service.trivial_service:TrivialDetectionService", tmp_path, config_path,
                         policy_path, env=env, workers=2)
    ids = []
    try:
        with server.client() as client:
            for name in ("coffee", "rocket", "horse"):
                response = client.post("/detect", files={"image": ("x.jpg", unique_jpeg(name), "image/jpeg")})
                assert response.status_code == 200
                ids.append(response.headers["x-edgecatch-inference-id"])
        ready = tmp_path / "spool" / "ready"
        assert wait_for(lambda: len(list(ready.iterdir())) == 3 if ready.exists() else False)
    finally:
        stop_bento(server)
    assert server.process.returncode is not None
    assert len(list((tmp_path / "spool" / "ready").iterdir())) == 3  # the graceful stop kept them

    upload_api.up()
    server = start_bento("bento_service.trivial_service:TrivialDetectionService", tmp_path, config_path,
                         policy_path, env=env, workers=2)
    try:
        def delivered() -> list[str]:
            return sorted(img.params["inference_id"][0] for img in upload_api.annotated().values())

        assert wait_for(lambda: delivered() == sorted(ids), timeout=60)
        assert sum(upload_api.store.stored_names.values()) == 3  # each exactly once, two workers or not
    finally:
        stop_bento(server)
        upload_api.down()
