from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def example_policy_path() -> Path:
    return REPO / "policies" / "examples" / "packages.yaml"
