"""Pure parts: the delivery config's validation, windows, the byte-rate limiter, backoff, sample ids."""

from __future__ import annotations

import random
from datetime import datetime, time

import pytest
from pydantic import ValidationError

from edgecatch.delivery.config import DeliveryConfig, parse_window
from edgecatch.delivery.errors import Redactor
from edgecatch.delivery.sample import is_sample_id, new_sample_id
from edgecatch.delivery.schedule import ByteRateLimiter, Windows
from edgecatch.policies.load import ConfigError


def test_defaults_are_a_local_directory_sink():
    config = DeliveryConfig()
    assert config.sink.type == "directory" and config.overflow == "drop_oldest"


@pytest.mark.parametrize("data, message", [
    ({"spool_dirr": "x"}, "Extra inputs are not permitted"),
    ({"overflow": "drop_random"}, "drop_oldest"),
    ({"windows": ["25:00-26:00"]}, "out of range"),
    ({"windows": ["1-5"]}, "HH:MM-HH:MM"),
    ({"sink": {"type": "s3"}}, "does not match any of the expected tags"),
    ({"sink": {"type": "roboflow", "dataset": "d"}}, "exactly one of api_key and api_key_env"),
    ({"sink": {"type": "roboflow", "dataset": "d", "api_key": "k", "base_url": "ftp://x"}}, "base_url"),
    ({"sink": {"type": "roboflow", "dataset": "a/b", "api_key": "k"}}, "pattern"),
    ({"retry": {"initial_seconds": 10, "max_seconds": 1}}, "max_seconds"),
])
def test_bad_configs_fail_clearly(data, message):
    with pytest.raises(ValidationError) as info:
        DeliveryConfig.model_validate(data)
    assert message in str(info.value)


def test_api_key_is_secret_and_env_is_resolved(monkeypatch):
    config = DeliveryConfig.model_validate({"sink": {"type": "roboflow", "dataset": "d", "api_key": "sekrit-1"}})
    assert "sekrit-1" not in repr(config) and "sekrit-1" not in str(config.model_dump())
    assert config.sink.resolved_api_key() == "sekrit-1"
    config = DeliveryConfig.model_validate({"sink": {"type": "roboflow", "dataset": "d", "api_key_env": "RF_K"}})
    monkeypatch.delenv("RF_K", raising=False)
    with pytest.raises(ValueError, match="RF_K"):
        config.sink.resolved_api_key()
    monkeypatch.setenv("RF_K", "from-env")
    assert config.sink.resolved_api_key() == "from-env"
    # The key pasted where the variable's name belongs: the message must not repeat it.
    pasted = DeliveryConfig.model_validate({"sink": {"type": "roboflow", "dataset": "d",
                                                     "api_key_env": "AbCdEf0123456789XyZ9qW"}})
    with pytest.raises(ConfigError) as caught:
        pasted.sink.resolved_api_key()
    assert "AbCdEf0123456789XyZ9qW" not in str(caught.value) and "is it the secret itself" in str(caught.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    config = DeliveryConfig.model_validate({"spool_dir": "spool", "sink": {"type": "directory", "path": "ds"}})
    resolved = config.resolve_paths(tmp_path)
    assert resolved.spool_dir == tmp_path / "spool" and resolved.sink.path == tmp_path / "ds"


def test_windows():
    assert parse_window("01:00-05:00") == (time(1), time(5))
    windows = Windows((parse_window("01:00-05:00"), parse_window("22:30-00:30")))
    day = datetime(2026, 11, 24)
    assert windows.is_open(day.replace(hour=1)) and windows.is_open(day.replace(hour=4, minute=59))
    assert not windows.is_open(day.replace(hour=5)) and not windows.is_open(day.replace(hour=12))
    assert windows.is_open(day.replace(hour=23)) and windows.is_open(day.replace(hour=0, minute=10))
    assert windows.seconds_until_open(day.replace(hour=12)) == 10.5 * 3600
    assert windows.seconds_until_open(day.replace(hour=5, minute=30)) == 17 * 3600
    assert windows.seconds_until_open(day.replace(hour=2)) == 0
    assert Windows(()).is_open(day)
    assert Windows((parse_window("00:00-24:00"),)).is_open(day.replace(hour=23, minute=59, second=59))


def test_byte_rate_limiter_holds_the_average_rate():
    now = [100.0]
    limiter = ByteRateLimiter(1000, monotonic=lambda: now[0])
    assert limiter.reserve(1000) == 0  # one second's burst
    assert limiter.reserve(500) == 0.5
    now[0] += 0.5
    assert limiter.reserve(500) == 0.5  # the debt of the previous one was paid off, this one waits
    now[0] += 10
    assert limiter.reserve(3000) == 2.0  # a sample larger than the bucket still goes, later
    assert ByteRateLimiter(None).reserve(10**9) == 0


def test_backoff_is_exponential_capped_and_jittered(tmp_path):
    from prometheus_client import CollectorRegistry

    from edgecatch.delivery.uploader import Uploader
    from edgecatch.metrics import Metrics

    class NullSink:
        name = "null"

    config = DeliveryConfig.model_validate({"retry": {"initial_seconds": 1, "max_seconds": 30, "jitter": 0.5}})
    uploader = Uploader(None, NullSink(), config, Metrics(CollectorRegistry()), rng=random.Random(1))
    delays = [uploader.backoff_delay(n) for n in range(1, 10)]
    caps = [1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert all(cap * 0.5 <= d <= cap for d, cap in zip(delays, caps))
    assert len(set(delays)) == len(delays)  # jittered


def test_sample_ids_sort_by_creation_and_are_safe():
    ids = [new_sample_id(1_800_000_000.0) for _ in range(1000)] + [new_sample_id(1_800_000_000.002)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(is_sample_id(i) for i in ids)
    assert not is_sample_id("../x") and not is_sample_id("A" * 32)


def test_redactor_catches_encoded_forms():
    redact = Redactor(["a b+c/d"])
    assert redact("key=a%20b%2Bc%2Fd&x=a+b%2Bc%2Fd and a b+c/d") == "key=***&x=*** and ***"
