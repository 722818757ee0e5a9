"""`edgecatch validate`, `edgecatch replay` and `edgecatch schema`: checking policies before they ship."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from edgecatch.cli import CommandError
from edgecatch.config import load_config
from edgecatch.policies import ConfigError, Policy, PolicyDocument, load_policy_file
from edgecatch.policies.engine import describe_conditions
from edgecatch.replay import RecordError, ReplayResult, decision_record, read_records, replay

__all__ = ["register", "json_schema"]


def register(subparsers: argparse._SubParsersAction) -> None:
    validate = subparsers.add_parser(
        "validate", help="check policy files (or a service's config file and its policy file); exit 1 on any error")
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.set_defaults(handler=run_validate)

    backtest = subparsers.add_parser(
        "replay", help="run recorded predictions through a policy file and report what it would collect")
    backtest.add_argument("policy", type=Path, metavar="POLICY")
    backtest.add_argument("predictions", type=Path, metavar="PREDICTIONS.jsonl")
    backtest.add_argument("--seed", type=int, default=None, help="seed for random/sample draws (repeatable runs)")
    backtest.add_argument("--decisions", type=Path, metavar="OUT.jsonl", help="write every decision here")
    backtest.add_argument("--no-progress", action="store_true", help="no progress bar")
    backtest.set_defaults(handler=run_replay)

    schema = subparsers.add_parser("schema", help="print the policy files' JSON Schema")
    schema.set_defaults(handler=run_schema)


# -- validate -----------------------------------------------------------------------------------

def run_validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            if _is_service_config(path):
                config = load_config(path)
                print(f"{path}: OK, service config; its policy file:")
                path = config.policies
            document = load_policy_file(path)
        except ConfigError as exc:
            failed = True
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            continue
        print(f"{path}: OK, {len(document.policies)} {'policy' if len(document.policies) == 1 else 'policies'}"
              + (f", global limits {_limits_text(document.limits)}" if document.limits else ""))
        for policy in document.policies:
            print(f"  - {summarize(policy)}")
    return 1 if failed else 0


# Keys only a service's config file has (a policy file has `version`, and `policies` as a list).
_CONFIG_KEYS = frozenset(("enabled", "delivery", "recall", "feedback", "metrics", "sidecar"))


def _is_service_config(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # the policy loader reports it, with the line
    return isinstance(data, dict) and "version" not in data and (
        isinstance(data.get("policies"), str) or not _CONFIG_KEYS.isdisjoint(data))


def summarize(policy: Policy) -> str:
    """One line per policy: what it matches, how much of it it keeps, and its limits."""
    conditions = describe_conditions(policy, braces=False)
    parts = [f"{policy.name}:"]
    if policy.feedback is not None:
        parts.append(f"feedback {policy.feedback.value}")
    if conditions:
        parts.append(conditions)
    if policy.models:
        parts.append(f"models {', '.join(policy.models)}")
    if policy.sample < 1.0:
        parts.append(f"sample {policy.sample:g}")
    if policy.limits:
        parts.append(f"limits {_limits_text(policy.limits)}")
    if policy.tags:
        parts.append(f"tags {', '.join(policy.tags)}")
    if not policy.enabled:
        parts.append("(disabled)")
    return " ".join(parts[:1]) + " " + "; ".join(parts[1:])


def _limits_text(limits) -> str:
    names = {60.0: "minute", 3600.0: "hour", 86400.0: "day"}
    return ", ".join(f"{budget}/{names[seconds]}" for seconds, budget in limits.windows()) or "none"


# -- replay -------------------------------------------------------------------------------------

def run_replay(args: argparse.Namespace) -> int:
    try:
        document = load_policy_file(args.policy)
    except ConfigError as exc:
        raise CommandError(f"invalid policy file:\n{exc}") from None
    if not args.predictions.is_file():
        raise CommandError(f"{args.predictions}: no such file")

    from tqdm import tqdm

    total = args.predictions.stat().st_size
    out = None
    try:
        if args.decisions is not None:
            try:
                out = args.decisions.open("w", encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"{args.decisions}: cannot write: {exc.strerror}") from None
        with tqdm(total=total, unit="B", unit_scale=True, desc="replay", file=sys.stderr,
                  disable=True if args.no_progress else None, leave=False) as bar:
            on_decision = (lambda n, o, d: out.write(decision_record(n, o, d) + "\n")) if out else None
            try:
                result = replay(document, read_records(args.predictions, bar.update),
                                seed=args.seed, on_decision=on_decision, source=str(args.predictions))
            except RecordError as exc:
                raise CommandError(str(exc)) from None
    finally:
        if out is not None:
            out.close()
    print(report(result, args.policy, args.predictions))
    return 0


def report(result: ReplayResult, policy_path: Path, predictions_path: Path) -> str:
    hours = result.span_seconds / 3600.0
    lines = [
        f"{predictions_path}: {result.records} records ({result.predictions} predictions, "
        f"{result.feedback_events} feedback events) over {hours:.1f} h",
        f"{policy_path}: selected {result.selected}"
        + _per_day_text(result, result.selected),
        "",
    ]
    header = ("policy", "matches", "selected", "limited", "sampled out", "per day")
    rows = [header]
    for name, stats in result.policies.items():
        per_day = result.per_day(stats.selections)
        rows.append((name, str(stats.matches), str(stats.selections), str(stats.limited),
                     str(stats.sampled_out), f"{per_day:.1f}" if per_day is not None else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)))
    lines.append("")
    lines.append("per day: selections extrapolated to 24 h at the recorded rate, limits included")
    return "\n".join(lines)


def _per_day_text(result: ReplayResult, count: int) -> str:
    per_day = result.per_day(count)
    return f" (about {per_day:.0f} per day at the recorded rate)" if per_day is not None else ""


# -- schema -------------------------------------------------------------------------------------

def json_schema() -> dict:
    schema = PolicyDocument.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://edgecatch.dev/schema/policies-v1.json",
        "title": "edgecatch policy file",
        **schema,
    }


def run_schema(args: argparse.Namespace) -> int:
    json.dump(json_schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0
