"""Delivery settings: the spool, the uploader and the sink (the `delivery:` section of the config).

```yaml
delivery:
  spool_dir: /var/lib/edgecatch/spool    # relative paths are relative to the config file
  max_bytes: 1073741824                  # the spool's bounds; past them `overflow` decides
  max_items: 100000
  overflow: drop_oldest                  # or drop_newest
  queue_size: 1000                       # in-memory hand-off queue (full => drop + count)
  concurrency: 4                         # uploads in flight per process
  retry: {initial_seconds: 1, max_seconds: 300, multiplier: 2, jitter: 0.5, max_attempts: 50}
  windows: ["01:00-05:00"]               # local time; empty = always
  max_bytes_per_second: 500000           # per process; unset = unlimited
  drain_seconds: 10                      # graceful stop: deliver what can be delivered, keep the rest
  sink:
    type: roboflow
    dataset: my-dataset
    api_key_env: ROBOFLOW_API_KEY
```
Every model forbids unknown keys, like the policy files.
"""

from __future__ import annotations

import os
import re
from datetime import time as dtime
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = [
    "DeliveryConfig",
    "DirectorySinkConfig",
    "RetryConfig",
    "RoboflowSinkConfig",
    "SinkConfig",
    "Window",
    "parse_window",
]

_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Window = tuple[dtime, dtime]
"""A daily connectivity window, start inclusive, end exclusive; end <= start wraps past midnight."""


def parse_window(text: str) -> Window:
    """`"01:00-05:00"` -> (01:00, 05:00). `"22:00-02:00"` crosses midnight; `"00:00-24:00"` is all day."""
    match = _WINDOW.match(text)
    if not match:
        raise ValueError(f"window {text!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(group) for group in match.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
        raise ValueError(f"window {text!r} has an hour or minute out of range")
    end = dtime(23, 59, 59, 999999) if h2 == 24 else dtime(h2, m2)
    start = dtime(h1, m1)
    if start == end:
        raise ValueError(f"window {text!r} is empty (start equals end)")
    return start, end


class RetryConfig(_Strict):
    """Backoff after a transient failure (connection error, timeout, 5xx): per sink, not per sample."""

    initial_seconds: Annotated[float, Field(gt=0)] = 1.0
    max_seconds: Annotated[float, Field(gt=0)] = 300.0
    multiplier: Annotated[float, Field(ge=1)] = 2.0
    jitter: Annotated[float, Field(ge=0, le=1)] = Field(
        0.5, description="Each delay is drawn uniformly from [delay*(1-jitter), delay].")
    max_attempts: Annotated[int, Field(ge=1)] | None = Field(
        50, description="Transient failures of one sample before it goes to the dead-letter folder; "
                        "null retries forever.")
    max_retry_after_seconds: Annotated[float, Field(gt=0)] = Field(
        3600.0, description="A server's Retry-After is honoured up to this long.")
    auth_pause_seconds: Annotated[float, Field(gt=0)] = Field(
        600.0, description="After 401/403 the sink is paused; one probe is sent after this long.")

    @model_validator(mode="after")
    def _order(self) -> RetryConfig:
        if self.max_seconds < self.initial_seconds:
            raise ValueError("max_seconds must be at least initial_seconds")
        return self


class DirectorySinkConfig(_Strict):
    """A local dataset folder a trainer can use as is (YOLO layout, class folders, manifest.jsonl)."""

    type: Literal["directory"] = "directory"
    path: Path = Path("edgecatch-dataset")


class RoboflowSinkConfig(_Strict):
    """The Upload API (Roboflow's contract): image, then the prediction as an annotation."""

    type: Literal["roboflow"]
    base_url: str = "https://api.roboflow.com"
    dataset: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")]
    api_key: SecretStr | None = Field(None, description="Prefer api_key_env: a key in a file is easy to leak.")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the key.")
    split: Literal["train", "valid", "test"] | None = None
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/?#]+", value) or "?" in value or "#" in value:
            raise ValueError("base_url must be http(s)://host[:port][/path] without a query")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_key(self) -> RoboflowSinkConfig:
        if (self.api_key is None) == (self.api_key_env is None):
            raise ValueError("give exactly one of api_key and api_key_env")
        return self

    def resolved_api_key(self) -> str:
        """The key; raises ConfigError (without the key, of course) when the variable is unset."""
        if self.api_key is not None:
            key = self.api_key.get_secret_value()
        else:
            key = os.environ.get(self.api_key_env or "", "")
            if not key:
                from edgecatch.policies.load import ConfigError

                raise ConfigError.from_message(
                    "sink.api_key_env", f"the environment variable {shown_variable(self.api_key_env or '')} is not set")
        return key


def shown_variable(name: str) -> str:
    """An environment variable's name as messages may show it: only a conventional name (capitals,
    digits, underscores). Anything else may be the secret itself pasted where its name belongs."""
    if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,99}", name):
        return name
    return "(name not shown: not in capitals, is it the secret itself?)"


SinkConfig = Annotated[Union[DirectorySinkConfig, RoboflowSinkConfig], Field(discriminator="type")]


class DeliveryConfig(_Strict):
    """Where selected samples wait (the spool) and where they go (the sink)."""

    spool_dir: Path = Path("edgecatch-spool")
    max_bytes: Annotated[int, Field(ge=1)] = 1024**3
    max_items: Annotated[int, Field(ge=1)] = 100_000
    overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    queue_size: Annotated[int, Field(ge=1)] = Field(
        1000, description="In-memory hand-off queue; when full, samples are dropped and counted.")
    concurrency: Annotated[int, Field(ge=1, le=256)] = Field(
        4, description="Uploads in flight per process (each BentoML worker is a process).")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    windows: tuple[str, ...] = Field((), description='Daily local-time windows like "01:00-05:00"; empty = always.')
    max_bytes_per_second: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Upload budget per process (with N workers sharing a spool, N times this).")
    drain_seconds: Annotated[float, Field(ge=0)] = 10.0
    poll_seconds: Annotated[float, Field(gt=0)] = Field(
        1.0, description="How often an idle uploader looks for samples spooled by other processes.")
    sink: SinkConfig = Field(default_factory=DirectorySinkConfig)

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for text in value:
            parse_window(text)
        return value

    def parsed_windows(self) -> tuple[Window, ...]:
        return tuple(parse_window(text) for text in self.windows)

    def resolve_paths(self, base: Path) -> DeliveryConfig:
        """Relative paths are relative to the config file's folder."""
        update: dict[str, object] = {}
        if not self.spool_dir.is_absolute():
            update["spool_dir"] = base / self.spool_dir
        if isinstance(self.sink, DirectorySinkConfig) and not self.sink.path.is_absolute():
            update["sink"] = self.sink.model_copy(update={"path": base / self.sink.path})
        return self.model_copy(update=update) if update else self
