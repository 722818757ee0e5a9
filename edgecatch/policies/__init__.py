"""The policy engine: which predictions are worth labeling. Knows nothing of HTTP, gRPC or BentoML."""

from edgecatch.policies.decision import Decision
from edgecatch.policies.engine import EngineState, PolicySet
from edgecatch.policies.limits import Limiter, MemoryLimiter
from edgecatch.policies.load import ConfigError, ConfigProblem, load_policy_file, load_policy_text
from edgecatch.policies.schema import ImageSettings, Limits, Policy, PolicyDocument
from edgecatch.policies.store import PolicyStore

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "Decision",
    "EngineState",
    "ImageSettings",
    "Limiter",
    "Limits",
    "MemoryLimiter",
    "Policy",
    "PolicyDocument",
    "PolicySet",
    "PolicyStore",
    "load_policy_file",
    "load_policy_text",
]
