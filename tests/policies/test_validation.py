"""Every invalid document fails with the file, the line and the path in the document."""

from __future__ import annotations

import json
import textwrap

import pytest

from edgecatch.policies import ConfigError, load_policy_file, load_policy_text
from edgecatch.policy_cli import json_schema


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_policy_text(textwrap.dedent(text).lstrip("\n"), "p.yaml")
    return [str(problem) for problem in caught.value.problems]


def test_the_issue_document_is_accepted(example_policy_path):
    document = load_policy_file(example_policy_path)
    assert [p.name for p in document.policies][:2] == ["random-baseline", "low-confidence"]
    assert document.limits.per_hour == 500 and document.image.max_size == 1280


def test_every_shipped_policy_file_is_valid(repo_root):
    files = sorted((repo_root / "policies").rglob("*.yaml"))
    assert files
    for path in files:
        load_policy_file(path)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # a typo must not silently disable a policy
        ("    confidence_bellow: 0.5\n",
         "p.yaml:4: policies[0].confidence_bellow: unknown key 'confidence_bellow' (did you mean 'confidence_below'?)"),
        # probability outside [0, 1]
        ("    random: 1.5\n", "p.yaml:4: policies[0].random: Input should be less than or equal to 1"),
        ("    random: 0.1\n    sample: -0.1\n", "p.yaml:5: policies[0].sample: Input should be greater than or equal to 0"),
        # wrong types
        ("    random: yes\n", "p.yaml:4: policies[0].random: Input should be a valid number"),
        ("    classes: person\n", "p.yaml:4: policies[0].classes: Input should be a valid list"),
        ("    every_nth: '10'\n", "p.yaml:4: policies[0].every_nth: Input should be a valid integer"),
        ("    every_nth: 0\n", "p.yaml:4: policies[0].every_nth: Input should be greater than or equal to 1"),
        # min greater than max
        ("    detections: {min: 5, max: 2}\n", "p.yaml:4: policies[0].detections: min (5) is greater than max (2)"),
        ("    confidence_between: [0.6, 0.3]\n",
         "p.yaml:4: policies[0].confidence_between: low (0.6) is greater than high (0.3)"),
        ("    detections: {}\n", "p.yaml:4: policies[0].detections: give at least one of min, max"),
        # nested blocks are checked too
        ("    any_of:\n      - {confidence_below: 0.2}\n      - {confidence_abov: 0.9}\n",
         "p.yaml:6: policies[0].any_of[1].confidence_abov: unknown key 'confidence_abov' (did you mean 'confidence_above'?)"),
        ("    not: {random: 2}\n", "p.yaml:4: policies[0].not.random: Input should be less than or equal to 1"),
        ("    any_of: []\n", "p.yaml:4: policies[0].any_of: needs at least one condition block"),
        # a policy without any condition would select everything by accident
        ("    tags: [x]\n",
         "p.yaml:3: policies[0]: a policy needs at least one condition (random: 1.0 selects everything on purpose)"),
        ("    feedback: wrong\n",
         "p.yaml:4: policies[0].feedback: Input should be 'incorrect', 'correct' or 'silent'"),
        ("    random: 0.1\n    limits: {per_hour: -1}\n",
         "p.yaml:5: policies[0].limits.per_hour: Input should be greater than or equal to 0"),
        ("    random: 0.1\n    limits: {per_week: 1}\n",
         "p.yaml:5: policies[0].limits.per_week: unknown key 'per_week'"),
        # what the JSON Schema refuses, validate refuses too: no coercion, no Python spellings
        ("    random: 0.1\n    enabled: 'no'\n", "p.yaml:5: policies[0].enabled: Input should be a valid boolean"),
        ("    random: 0.1\n    enabled: 0\n", "p.yaml:5: policies[0].enabled: Input should be a valid boolean"),
        ("    not_: {random: 0.5}\n", "p.yaml:3: policies[0]: unknown key 'not_' (did you mean 'not'?)"),
        # blocks and lists that hold always, or never
        ("    any_of: [{}]\n", "p.yaml:4: policies[0].any_of: a condition block needs at least one condition "
                              "(an empty one always holds)"),
        ("    not: {}\n", "p.yaml:4: policies[0].not: a condition block needs at least one condition "
                         "(an empty one always holds)"),
        ("    classes: []\n    random: 1.0\n", "p.yaml:4: policies[0].classes: List should have at least 1 item "
                                               "after validation, not 0"),
        ("    models: []\n    random: 1.0\n", "p.yaml:4: policies[0].models: List should have at least 1 item "
                                              "after validation, not 0"),
    ],
)
def test_policy_errors_name_line_and_path(body, expected):
    text = "version: 1\npolicies:\n  - name: p\n" + body
    assert problems(text) == [expected]


def test_duplicate_policy_name_points_at_the_duplicate():
    assert problems("""
        version: 1
        policies:
          - name: a
            random: 0.1
          - name: b
            random: 0.1
          - name: a
            random: 0.2
    """) == ["p.yaml:7: policies[2].name: duplicate policy name 'a' (first used by policies[0])"]


def test_every_duplicate_policy_name_is_reported_with_the_other_errors():
    assert problems("""
        version: 1
        policies:
          - name: a
            random: 0.1
          - name: b
            random: 0.1
          - name: a
            random: 2
          - name: b
            random: 0.1
    """) == ["p.yaml:7: policies[2].name: duplicate policy name 'a' (first used by policies[0])",
             "p.yaml:8: policies[2].random: Input should be less than or equal to 1",
             "p.yaml:9: policies[3].name: duplicate policy name 'b' (first used by policies[1])"]


def test_duplicate_yaml_key_is_an_error_not_last_one_wins():
    assert problems("""
        version: 1
        policies:
          - name: a
            random: 0.1
            random: 0.9
    """) == ["p.yaml:5: policies[0]: duplicate key 'random' (first on line 4)"]


def test_a_duplicate_key_is_reported_with_the_other_errors():
    assert problems("""
        version: 1
        policies:
          - name: a
            random: 0.1
            random: 0.9
            confidence_bellow: 0.5
    """) == ["p.yaml:5: policies[0]: duplicate key 'random' (first on line 4)",
             "p.yaml:6: policies[0].confidence_bellow: unknown key 'confidence_bellow' "
             "(did you mean 'confidence_below'?)"]


def test_document_level_errors():
    assert problems("""
        version: 2
        batch: "x-{day}"
        image: {max_size: 10, jpeg_quality: 101}
        policies: []
        colour: blue
    """) == [
        "p.yaml:1: version: Input should be 1",
        "p.yaml:2: batch: unknown placeholder {day}; known: {date}, {week}, {month}, {model}",
        "p.yaml:3: image.max_size: Input should be greater than or equal to 32",
        "p.yaml:3: image.jpeg_quality: Input should be less than or equal to 100",
        "p.yaml:5: colour: unknown key 'colour'",
    ]


def test_missing_keys_and_non_mapping_documents():
    assert problems("policies: []\n") == ["p.yaml:1: version: Field required"]
    assert problems("- a\n- b\n") == ["p.yaml:1: the document must be a mapping"]
    assert problems("") == ["p.yaml:1: the document is empty"]


@pytest.mark.parametrize("version", ["true", "1.0", "'1'"])
def test_the_version_is_the_number_1(version):
    assert problems(f"version: {version}\npolicies:\n  - name: p\n    random: 1.0\n") == [
        "p.yaml:1: version: Input should be 1"]


def test_a_character_yaml_refuses_is_one_line_with_its_line():
    assert problems("version: 1\npolicies:\n  - name: p\n    random: 1.0\n    tags: [\"\x00\"]\n") == [
        "p.yaml:5: invalid YAML: special characters are not allowed (#x0000)"]


def test_yaml_syntax_error_has_a_line():
    (problem,) = problems("version: 1\npolicies:\n  - name: [unclosed\n")
    assert problem.startswith("p.yaml:4: invalid YAML")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_policy_file(tmp_path / "missing.yaml")
    assert str(caught.value) == f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"


def test_committed_json_schema_is_current(repo_root):
    committed = json.loads((repo_root / "policies" / "schema.json").read_text())
    assert committed == json_schema(), "policies/schema.json is stale: run `edgecatch schema > policies/schema.json`"


def test_json_schema_rejects_unknown_keys_for_editors():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Policy"]["additionalProperties"] is False
    assert "not" in schema["$defs"]["Condition"]["properties"]
