"""Stopping a proxy without cutting the calls in progress (both proxies, on SIGTERM)."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Connection(Protocol):
    def finish(self) -> None:
        """Take no new request or call; close once those in progress are answered."""

    def abort(self) -> None:
        """Close now."""


async def close_gracefully(server: asyncio.base_events.Server | None, connections: set[Any], grace: float) -> None:
    """Stop accepting connections, let each open one finish for up to `grace` seconds, then abort
    what is left. `connections` is the live set the proxy keeps of its `Connection`s (each removes
    itself when closed)."""
    loop = asyncio.get_running_loop()
    if server is not None:
        server.close()
    for connection in list(connections):
        connection.finish()
    deadline = loop.time() + grace
    while connections and loop.time() < deadline:
        await asyncio.sleep(0.02)
    for connection in list(connections):
        connection.abort()
    if server is not None:
        await server.wait_closed()
