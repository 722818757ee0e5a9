"""`edgecatch validate`, `replay` and `schema` as a user runs them: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "policies" / "examples"


def edgecatch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgecatch", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_validate_ok_prints_a_line_per_policy():
    result = edgecatch("validate", str(EXAMPLES / "packages.yaml"), str(REPO / "policies" / "default.yaml"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{EXAMPLES / 'packages.yaml'}: OK, 9 policies, global limits 500/hour, 5000/day"
    assert "  - low-confidence: confidence_below: 0.5; sample 0.25; limits 10/minute, 1000/day" in lines
    assert "  - user-says-wrong: feedback incorrect" in lines


def test_validate_errors_exit_1_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npolicies:\n  - name: a\n    sample: 2\n    random: 0.1\n")
    result = edgecatch("validate", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip() == f"{bad}:4: policies[0].sample: Input should be less than or equal to 1"
    assert "Traceback" not in result.stderr


def test_validate_a_service_config_checks_it_and_its_policy_file(tmp_path):
    """Ops point `validate` at the file they edit: a service's config is checked as one (not as a
    policy file, which gave nine "unknown key" errors), and so is the policy file it names."""
    for config in (REPO / "bento_service" / "edgecatch.yaml", REPO / "sidecar" / "edgecatch.yaml"):
        result = edgecatch("validate", str(config))
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f"{config}: OK, service config; its policy file:"
        assert lines[1].endswith("policies/default.yaml: OK, 7 policies, global limits 300/hour, 2000/day")
    wrong_key = tmp_path / "edgecatch.yaml"
    wrong_key.write_text("enabled: true\npolicies: p.yaml\ndelivery:\n  spool_dir: s\n  sinc: {type: directory}\n")
    result = edgecatch("validate", str(wrong_key))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{wrong_key}:5: delivery.sinc"), result.stderr
    (tmp_path / "p.yaml").write_text("version: 1\npolicies:\n  - name: a\n    sample: 2\n    random: 0.1\n")
    wrong_key.write_text("enabled: true\npolicies: p.yaml\n")
    result = edgecatch("validate", str(wrong_key))
    assert result.returncode == 1
    assert result.stderr.strip() == f"{tmp_path / 'p.yaml'}:4: policies[0].sample: Input should be less than or equal to 1"


def test_replay_reports_per_policy_and_is_repeatable_with_a_seed(tmp_path):
    out = tmp_path / "decisions.jsonl"
    args = ["replay", str(EXAMPLES / "packages.yaml"), str(EXAMPLES / "predictions.jsonl"), "--seed", "1"]
    first = edgecatch(*args, "--decisions", str(out))
    second = edgecatch(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert "records" in first.stdout and "per day" in first.stdout
    table = {line.split()[0]: line.split()[1:] for line in first.stdout.splitlines()
             if line.split() and line.split()[0] in ("low-confidence", "user-says-wrong", "crowded")}
    assert set(table) == {"low-confidence", "user-says-wrong", "crowded"}
    decisions = [json.loads(line) for line in out.read_text().splitlines()]
    records = sum(1 for line in (EXAMPLES / "predictions.jsonl").read_text().splitlines() if line.strip())
    assert len(decisions) == records
    selected = [d for d in decisions if d["selected"]]
    assert selected and all(d["policy"] in d["matched"] and d["batch"].startswith("edgecatch-") for d in selected)
    # The table's selection counts are the decisions' counts.
    assert int(table["low-confidence"][1]) == sum(d["policy"] == "low-confidence" for d in selected)
    assert int(table["user-says-wrong"][1]) == sum(d["policy"] == "user-says-wrong" for d in selected)


def test_replay_limits_follow_the_recorded_timestamps(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\npolicies:\n  - name: all\n    random: 1.0\n    limits: {per_hour: 2}\n")
    records = tmp_path / "r.jsonl"
    lines = [json.dumps({"timestamp": 1000.0 + 600 * i, "model": "m", "detections": []}) for i in range(12)]
    records.write_text("\n".join(lines) + "\n")
    result = edgecatch("replay", str(policy), str(records), "--no-progress")
    assert result.returncode == 0, result.stderr
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("all "))
    # 12 records over 110 minutes, 2 per rolling hour: selections at t=0,10 then 60,70 min.
    assert row[1:5] == ["12", "4", "8", "0"]


def test_replay_bad_record_names_the_line(tmp_path):
    policy = EXAMPLES / "packages.yaml"
    records = tmp_path / "r.jsonl"
    good = json.dumps({"timestamp": 1.0, "model": "m", "detections": []})
    records.write_text(good + "\n\n" + '{"timestamp": 2, "model": "m", "detections": [{"class": "a", '
                       '"confidence": 1.5, "box": [0, 0, 1, 1]}]}\n')
    result = edgecatch("replay", str(policy), str(records))
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"{records}:3: detections[0].confidence: Input should be less than or equal to 1")
    assert "Traceback" not in result.stderr
    records.write_text(good + "\n{not json\n")
    result = edgecatch("replay", str(policy), str(records))
    assert result.returncode == 1 and f"{records}:2: not valid JSON" in result.stderr
    records.write_text(json.dumps({"timestamp": 1.0, "model": "m"}) + "\n")
    result = edgecatch("replay", str(policy), str(records))
    assert result.returncode == 1
    assert "r.jsonl:1: give exactly one of 'detections' (a list, may be empty) and 'classification'" in result.stderr


@pytest.mark.parametrize("timestamp, problem", [
    (1795162000500, "is not seconds since the epoch (milliseconds? divide by 1000)"),
    (-5, "is not seconds since the epoch (from 0 to 253402300799)"),
    (1e300, "is not seconds since the epoch (from 0 to 253402300799)"),
    (True, "expected seconds since the epoch or an ISO 8601 time, got a boolean"),
])
def test_replay_refuses_timestamps_that_are_not_seconds(tmp_path, timestamp, problem):
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"timestamp": timestamp, "model": "m", "detections": []}) + "\n")
    result = edgecatch("replay", str(EXAMPLES / "packages.yaml"), str(records))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "r.jsonl:1: timestamp: " in result.stderr and problem in result.stderr


def test_replay_refuses_records_out_of_time_order(tmp_path):
    records = tmp_path / "r.jsonl"
    stamps = [100.0, 100.5, 99.8, 0.0]  # within a second of the latest is clock skew, not disorder
    records.write_text("".join(json.dumps({"timestamp": t, "model": "m", "detections": []}) + "\n" for t in stamps))
    result = edgecatch("replay", str(EXAMPLES / "packages.yaml"), str(records))
    assert result.returncode == 1
    assert "r.jsonl:4: timestamp 0.000 is 100.5 s before line 2's: records must be in time order" in result.stderr


def test_replay_missing_files_are_clear_errors(tmp_path):
    result = edgecatch("replay", str(tmp_path / "nope.yaml"), str(EXAMPLES / "predictions.jsonl"))
    assert result.returncode == 1 and "cannot read" in result.stderr and "Traceback" not in result.stderr
    result = edgecatch("replay", str(EXAMPLES / "packages.yaml"), str(tmp_path / "nope.jsonl"))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_schema_command_prints_the_committed_schema():
    result = edgecatch("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout) == json.loads((REPO / "policies" / "schema.json").read_text())
