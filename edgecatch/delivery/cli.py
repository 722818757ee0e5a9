"""`edgecatch spool status|retry-dead-letters|purge`: the spool for ops.

The spool folder comes from `--spool-dir`, or from the config (`--config`, else $EDGECATCH_CONFIG,
else the defaults). Safe while delivering processes run: they share the folder by design.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from edgecatch.cli import CommandError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    spool = subparsers.add_parser("spool", help="inspect and manage the delivery spool")
    actions = spool.add_subparsers(dest="spool_command", metavar="ACTION")
    actions.required = True

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", type=Path, metavar="FILE", help="edgecatch config file")
        parser.add_argument("--spool-dir", type=Path, metavar="DIR", help="the spool folder (overrides the config)")

    status = actions.add_parser("status", help="what is waiting, dead-lettered and quarantined")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=run_status)

    retry = actions.add_parser("retry-dead-letters", help="move every dead letter back to be delivered again")
    common(retry)
    retry.set_defaults(handler=run_retry)

    purge = actions.add_parser("purge", help="delete the entries of one folder (cannot be undone)")
    common(purge)
    purge.add_argument("what", choices=["ready", "dead", "quarantine"],
                       help="ready: samples waiting for delivery; dead: dead letters; quarantine: corrupt entries")
    purge.add_argument("--yes", action="store_true", help="really delete")
    purge.set_defaults(handler=run_purge)


def _open(args: argparse.Namespace):
    from edgecatch.delivery.spool import Spool
    from edgecatch.metrics import Metrics

    spool_dir = args.spool_dir
    config = None
    if spool_dir is None or args.config is not None:
        from edgecatch.config import ConfigError, load_config

        try:
            config = load_config(args.config).delivery
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        spool_dir = spool_dir or config.spool_dir
    if not Path(spool_dir).is_dir():
        raise CommandError(f"no spool at {spool_dir} (a service creates it when it starts with this config)")
    if not (Path(spool_dir) / "FORMAT").is_file():  # opening it would turn any folder into a spool
        raise CommandError(f"{spool_dir} is not an edgecatch spool (it has no FORMAT file)")
    # A private registry: this command's view must not touch a serving process's metrics.
    return Spool(spool_dir, max_bytes=config.max_bytes if config else 2**62,
                 max_items=config.max_items if config else 2**62, metrics=Metrics(CollectorRegistry())).open()


def run_status(args: argparse.Namespace) -> int:
    spool = _open(args)
    status = spool.status()
    if args.json:
        print(json.dumps({"spool_dir": str(spool.directory), **status.as_dict()}))
        return 0
    age = ""
    if status.oldest_created is not None:
        age = f", oldest {_duration(time.time() - status.oldest_created)} old"
    print(f"spool {spool.directory}")
    print(f"  waiting:     {status.ready_items} samples, {_size(status.ready_bytes)}{age}"
          + (f" ({status.with_image_stored} with the image stored, annotation pending)"
             if status.with_image_stored else ""))
    print(f"  dead letters: {status.dead_items}" + (" (see dead/*.answer.json; `edgecatch spool "
                                                    "retry-dead-letters` sends them again)" if status.dead_items else ""))
    print(f"  quarantined: {status.quarantined_items}" + (" (corrupt entries, see quarantine/*.reason.txt)"
                                                          if status.quarantined_items else ""))
    return 0


def run_retry(args: argparse.Namespace) -> int:
    moved = _open(args).retry_dead_letters()
    print(f"{moved} dead letter{'s' if moved != 1 else ''} moved back for delivery")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    spool = _open(args)
    if not args.yes:
        raise CommandError(f"purge deletes every entry in {spool.directory / args.what}; add --yes to confirm",
                           exit_code=2)
    removed = spool.purge(args.what)
    print(f"{removed} entr{'ies' if removed != 1 else 'y'} deleted from {args.what}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
