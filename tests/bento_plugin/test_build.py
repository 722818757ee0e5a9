"""`bentoml build` with the repository's bentofile.yaml succeeds and packs what the service needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bentoml_build(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    bentoml = str(Path(sys.executable).parent / "bentoml")
    result = subprocess.run([bentoml, "build", "--output", "tag"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("edgecatch-detector:")
    bento = tmp_path / "home" / "bentos" / "edgecatch-detector" / tag.split(":")[1]
    src = bento / "src"
    for needed in ("bento_service/service.py", "bento_service/detector.py", "bento_service/edgecatch.yaml",
                   "edgecatch/collector.py", "edgecatch/integrations/bentoml.py", "policies/default.yaml"):
        assert (src / needed).exists(), needed
    assert not list(src.rglob("test_*.py"))
    assert "EDGECATCH_CONFIG" in (bento / "bento.yaml").read_text()
