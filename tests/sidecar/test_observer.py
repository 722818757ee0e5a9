"""The sidecar's observation queue (`_Observer`): bounded, and a bug in reading along is counted every
time and logged once per kind and place."""

from __future__ import annotations

import asyncio
import logging

from edgecatch.integrations.triton.sidecar import _Observer


def test_bugs_are_counted_each_time_and_logged_once_per_place(caplog):
    errors: list[BaseException] = []
    observer = _Observer(lambda: None, on_error=errors.append)

    def reads_a_list(exchange):
        return [][exchange]  # IndexError here

    def reads_a_string(exchange):
        return ""[exchange]  # IndexError too, elsewhere

    with caplog.at_level(logging.ERROR, logger="edgecatch.sidecar"):
        for observe in (reads_a_list, reads_a_list, reads_a_string, reads_a_list):
            observer._pending.append((observe, 1))  # as its handlers queue them
        observer.drain_now()
    assert len(errors) == 4
    logged = [record for record in caplog.records if "observing an exchange failed" in record.getMessage()]
    assert [record.exc_info[2].tb_next.tb_frame.f_code.co_name for record in logged] == \
        ["reads_a_list", "reads_a_string"]


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
