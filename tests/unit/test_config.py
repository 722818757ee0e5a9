"""The edgecatch config file: both shipped examples load, paths resolve against the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecatch.config import ConfigError, EdgecatchConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def test_the_example_services_config_loads_with_paths_relative_to_it():
    config = load_config(REPO / "bento_service" / "edgecatch.yaml")
    assert type(config) is EdgecatchConfig
    assert config.policies == REPO / "bento_service" / ".." / "policies" / "default.yaml"
    assert config.delivery.spool_dir == REPO / "bento_service" / ".." / "var" / "spool"


def test_the_sidecars_config_loads_through_the_same_function():
    config = load_config(REPO / "sidecar" / "edgecatch.yaml")
    assert "people_detector" in config.sidecar.models  # a SidecarConfig: spool commands accept the file


def test_errors_name_the_line(tmp_path):
    path = tmp_path / "edgecatch.yaml"
    path.write_text("enabled: true\nrecall: {max_age_seconds: -1}\n")
    with pytest.raises(ConfigError, match=r"edgecatch.yaml:2: recall.max_age_seconds: Input should be greater than 0"):
        load_config(path)


def test_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "edgecatch.yaml"
    path.write_text("enabled: false\n")
    monkeypatch.setenv("EDGECATCH_CONFIG", str(path))
    assert load_config().enabled is False
