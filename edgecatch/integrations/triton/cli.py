"""`edgecatch sidecar --config sidecar/edgecatch.yaml`."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from edgecatch.cli import CommandError
from edgecatch.policies.load import ConfigError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    sidecar = subparsers.add_parser("sidecar", help="run the Triton sidecar (HTTP and gRPC proxies)")
    sidecar.add_argument("--config", type=Path, required=True, help="sidecar config file (YAML)")
    sidecar.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sidecar.set_defaults(handler=run_sidecar)


def run_sidecar(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - an optional speed-up
        uvloop = None
    from edgecatch.integrations.triton.sidecar import serve

    try:
        if uvloop is not None:
            uvloop.run(serve(args.config))
        else:
            asyncio.run(serve(args.config))
    except ConfigError as exc:
        raise CommandError(f"invalid sidecar config:\n{exc}") from None
    except OSError as exc:
        raise CommandError(f"cannot start the sidecar: {exc}") from None
    return 0
