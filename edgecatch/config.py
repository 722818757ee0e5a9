"""The edgecatch configuration file (what `EDGECATCH_CONFIG` points at).

```yaml
enabled: true
policies: ../policies/default.yaml     # relative paths are relative to this file
recall: {max_items: 10000, max_bytes: 268435456, max_age_seconds: 300}
feedback: {token_env: EDGECATCH_FEEDBACK_TOKEN}
metrics: {max_class_labels: 50}
delivery: {...}                         # spool, sink and uploader: see the README
```
Validated like policy files: unknown keys and bad values fail with file, line and path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

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


class EdgecatchConfig(_Strict):
    enabled: bool = True
    policies: Path = Field(Path("policies/default.yaml"), description="Policy file, hot-reloaded.")
    policy_reload_seconds: Annotated[float, Field(gt=0)] = 1.0
    recall: RecallConfig = Field(default_factory=RecallConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)

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
    return load_model(EdgecatchConfig, path).resolve_paths(path.resolve().parent)


__all__ += ["ConfigError", "MetricsConfig"]
