"""The API key never appears in logs, metrics, spool files, dead letters or exception texts."""

from __future__ import annotations

import logging

from prometheus_client import generate_latest

from edgecatch.delivery import Delivery

from .conftest import UploadApiServer, fill_spool, open_spool, wait_for

KEY = "rf-Secr3t+Key/with=odd&chars"


def test_api_key_is_never_written_anywhere(tmp_path, roboflow_config, metrics, registry, caplog, monkeypatch):
    server = UploadApiServer(api_key=KEY).up()
    try:
        monkeypatch.setenv("TEST_ROBOFLOW_KEY", KEY)
        config = roboflow_config(concurrency=2, sink={"base_url": server.url, "timeout_seconds": 0.3},
                                 retry={"auth_pause_seconds": 0.1})
        ids = fill_spool(open_spool(config, metrics), 12)
        caplog.set_level(logging.DEBUG)  # everything, aiohttp's own loggers included
        server.down()  # connection refused first
        delivery = Delivery(config, metrics=metrics)
        delivery.start()
        try:
            wait_for(lambda: (registry.get_sample_value(
                "edgecatch_uploads_total", {"sink": "roboflow", "outcome": "transient_error"}) or 0) >= 3,
                what="failures while down")
            server.fault("400", step="upload", times=1)     # rejected: the answer echoes the URL with the key
            server.fault("400", step="annotate", times=1)
            server.fault("401", step="upload", times=2)     # paused: the alarm names the sink, not the key
            server.fault("500", step="any", times=2)
            server.fault("slow", step="upload", times=1, delay=1.0)  # a timeout
            server.up()
            wait_for(lambda: len(delivery.spool) == 0, what="the rest")
        finally:
            delivery.stop()
    finally:
        server.down()

    # The scenario really happened, and the key really was sent.
    assert len(list((config.spool_dir / "dead").glob("*.answer.json"))) == 2
    assert registry.get_sample_value("edgecatch_uploads_total", {"sink": "roboflow", "outcome": "auth_error"}) == 2
    assert any("api_key=" in target for _, _, target in server.store.log)
    assert len(server.annotated()) == len(ids) - 2

    forms = {KEY, "rf-Secr3t%2BKey%2Fwith%3Dodd%26chars", "rf-Secr3t+Key%2Fwith%3Dodd%26chars", "Secr3t"}
    texts = {"log": caplog.text, "metrics": generate_latest(registry).decode()}
    for record in caplog.records:
        texts[f"log record {record.name}"] = f"{record.getMessage()} {record.exc_text or ''} {record.args!r}"
    for path in config.spool_dir.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("latin-1")
    for where, text in texts.items():
        for form in forms:
            assert form not in text, f"the API key ({form}) leaked into {where}"
    dead_answers = [p.read_text() for p in (config.spool_dir / "dead").glob("*.answer.json")]
    assert all("api_key=***" in answer for answer in dead_answers)


def test_the_redactor_finds_the_key_in_every_form_an_answer_may_echo_it():
    import json
    import re
    from urllib.parse import quote

    from edgecatch.delivery.errors import Redactor

    redact = Redactor([KEY])
    lower_hex = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(KEY, safe=""))
    for echoed in (KEY, quote(KEY, safe=""), lower_hex,
                   json.dumps(KEY)[1:-1].replace("/", "\\/"), json.dumps({"key": KEY})):
        assert "Secr3t" not in redact(f"the answer: {echoed} (end)"), echoed
    # Hex digits in lower case (%2b, as some servers write them), and nothing else changed.
    assert redact("x rf-Secr3t%2bKey%2fwith%3dodd%26chars y") == "x *** y"


def test_an_answer_is_redacted_before_it_is_cut(roboflow_config, monkeypatch):
    """The answer kept in dead letters and logs is cut to MAX_ANSWER_CHARS: cut first, a key that
    straddles the cut would keep its first part."""
    from edgecatch.delivery.sinks.roboflow import MAX_ANSWER_CHARS, RoboflowSink, _Answer

    monkeypatch.setenv("TEST_ROBOFLOW_KEY", KEY)
    sink = RoboflowSink(roboflow_config().sink)
    text = "x" * (MAX_ANSWER_CHARS - 9) + KEY
    error = sink._error(_Answer(400, {"Location": ""}, text.encode()), "upload")
    assert "Secr3t" not in error.answer and "rf-Secr" not in error.answer
    redirect = sink._error(_Answer(302, {"Location": "https://h/" + "p" * 180 + "?api_key=" + KEY}, b""), "upload")
    assert "rf-" not in str(redirect)
