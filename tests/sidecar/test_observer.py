"""The sidecar's observation queue (`_Observer`): bounded; what does not fit is served and counted."""

from __future__ import annotations

import asyncio

from edgecatch.integrations.triton.sidecar import _Observer


def test_what_does_not_fit_the_queue_is_served_and_counted():
    dropped: list[None] = []
    observed: list[int] = []
    observer = _Observer(lambda: dropped.append(None), max_pending=3, delay=0.001)

    async def run():
        put = observer.handler(observed.append)
        for n in range(5):
            put(n)
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert observed == [0, 1, 2] and len(dropped) == 2
