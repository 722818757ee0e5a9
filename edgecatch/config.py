"""The edgecatch configuration file (what `EDGECATCH_CONFIG` points at).

```yaml
enabled: true
policies: ../policies/default.yaml     # relative paths are relative to this file
recall: {max_items: 10000, max_bytes: 268435456, max_age_seconds: 300}
feedback: {token_env: EDGECATCH_FEEDBACK_TOKEN}
metrics: {max_class_labels: 50}
limits: {backend: memory}               # or redis://host:6379/0 to share budgets across a fleet
delivery: {...}                         # spool, sink and uploader: see the README
```
Validated like policy files: unknown keys and bad values fail with file, line and path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from edgecatch.delivery.config import DeliveryConfig
from edgecatch.policies.load import ConfigError, load_model

__all__ = ["CONFIG_ENV", "EdgecatchConfig", "FeedbackConfig", "RecallConfig", "load_config"]

CONFIG_ENV = "EDGECATCH_CONFIG"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecallConfig(_Strict):
    """How long predictions stay recallable by a verdict (and when a `silent` event fires)."""

    max_items: Annotated[int, Field(ge=0)] = 10_000
    max_bytes: Annotated[int, Field(ge=0)] = 256 * 1024 * 1024
    max_age_seconds: Annotated[float, Field(gt=0)] = 300.0


class FeedbackConfig(_Strict):
    """The feedback route. A token, when set, must come as `Authorization: Bearer <token>`."""

    token: SecretStr | None = Field(None, description="Prefer token_env: a token in a file is easy to leak.")
    token_env: str | None = Field(None, description="Name of the environment variable holding the token.")
    max_image_bytes: Annotated[int, Field(ge=0)] = 20 * 1024 * 1024

    @model_validator(mode="after")
    def _one_source(self) -> FeedbackConfig:
        if self.token is not None and self.token_env is not None:
            raise ValueError("give token or token_env, not both")
        return self

    def resolved_token(self) -> str | None:
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_env:
            return os.environ.get(self.token_env) or None
        return None


class MetricsConfig(_Strict):
    max_class_labels: Annotated[int, Field(ge=1)] = Field(
        50, description="Class names beyond this many (per model) are reported as class=\"other\".")


class LimitsConfig(_Strict):
    """Where the policies' rolling-window budgets are kept: per process, or in Redis for a fleet."""

    backend: str = Field(
        "memory", repr=False,  # a Redis URL may carry a password: never in a repr
        description="`memory` (each process has its own budgets) or a Redis URL (redis://, rediss://, "
                    "unix://) whose budgets every process with the same `fleet` shares.")
    fleet: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = Field(
        "default", description="Name of the fleet sharing budgets: fleets on one Redis never share.")
    on_unavailable: Literal["fail_open", "fail_closed"] = Field(
        "fail_open", description="Redis unreachable or slow: fail_open uses local budgets divided by "
                                 "expected_replicas; fail_closed selects nothing that has a limit (global "
                                 "limits: count for every policy).")
    expected_replicas: Annotated[int, Field(ge=1)] = Field(
        1, description="Processes in the fleet; local budgets during an outage are divided by it.")
    timeout_ms: Annotated[float, Field(gt=0, le=10_000)] = Field(
        20.0, description="Longest a prediction waits for Redis (to connect, and for the answer).")
    retry_seconds: Annotated[float, Field(gt=0)] = Field(
        5.0, description="During an outage, how often a background thread tries Redis again.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        # The message must not echo the value: it may hold a password.
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be memory or a redis://, rediss:// or unix:// URL")
        return value

    backend_env: str | None = Field(
        None, description="Name of an environment variable holding the backend (a Redis URL with its "
                          "password stays out of the file); when set and non-empty it wins over `backend`.")

    def resolved_backend(self) -> str:
        if self.backend_env:
            value = os.environ.get(self.backend_env)
            if value:
                self._known_backend(value)
                return value
        return self.backend


class EdgecatchConfig(_Strict):
    enabled: bool = True
    policies: Path = Field(Path("policies/default.yaml"), description="Policy file, hot-reloaded.")
    policy_reload_seconds: Annotated[float, Field(gt=0)] = 1.0
    recall: RecallConfig = Field(default_factory=RecallConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    def resolve_paths(self, base: Path) -> EdgecatchConfig:
        """Relative paths in the file are relative to the file's folder."""
        policies = self.policies if self.policies.is_absolute() else base / self.policies
        return self.model_copy(update={"policies": policies, "delivery": self.delivery.resolve_paths(base)})


def load_config(path: str | os.PathLike[str] | None = None) -> EdgecatchConfig:
    """The config at `path`, or at $EDGECATCH_CONFIG, or the defaults (relative to the working directory)."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is None:
        return EdgecatchConfig().resolve_paths(Path.cwd())
    path = Path(path)
    return load_model(_model_for(path), path).resolve_paths(config_folder(path))


def config_folder(path: Path) -> Path:
    """The folder a config file's relative paths start from: the one it was named in, symlinks not
    followed. A Kubernetes ConfigMap mounts `edgecatch.yaml -> ..data/edgecatch.yaml` with `..data`
    a link to a timestamped folder that the next update replaces and deletes: resolved, relative
    paths would stay pinned to that folder and every reload after the first update would fail."""
    return Path(os.path.abspath(path)).parent


def _model_for(path: Path) -> type[EdgecatchConfig]:
    """The sidecar's file is this file plus a `sidecar:` section: read it with the sidecar's model,
    so that commands such as `edgecatch spool status --config sidecar/edgecatch.yaml` accept it."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return EdgecatchConfig  # load_model reports the problem with its line
    if isinstance(data, dict) and "sidecar" in data:
        from edgecatch.integrations.triton.sidecar import SidecarConfig

        return SidecarConfig
    return EdgecatchConfig


__all__ += ["ConfigError", "LimitsConfig", "MetricsConfig"]
