"""Ingest first (queue.ingest_quiet_s): the deliverer waits while queued listeners write, and
never longer than queue.ingest_defer_max_s at a time. Pure logic: the deliverer's wait
against a stand-in for the edge queue's last write time."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from dimse_relay.delivery import Deliverer


def _deliverer(quiet: float, defer_max: float, last_write: float) -> Any:
    deliverer = Deliverer.__new__(Deliverer)
    deliverer.qcfg = SimpleNamespace(ingest_quiet_s=quiet, ingest_defer_max_s=defer_max)
    deliverer.queue = SimpleNamespace(last_write=last_write)
    deliverer._stopping = False
    return deliverer


def _waited(deliverer: Any, writer: Any = None) -> float:
    async def run() -> float:
        task = asyncio.ensure_future(writer()) if writer else None
        started = time.monotonic()
        await deliverer._yield_to_ingest()
        if task is not None:
            task.cancel()
        return time.monotonic() - started

    return asyncio.run(run())


def test_no_wait_when_nothing_was_written_lately() -> None:
    assert _waited(_deliverer(0.3, 1.0, time.monotonic() - 5)) < 0.05


def test_waits_for_the_quiet_period_after_a_write() -> None:
    assert 0.25 <= _waited(_deliverer(0.3, 1.0, time.monotonic())) < 0.6


def test_continuous_writes_defer_at_most_the_maximum() -> None:
    deliverer = _deliverer(0.3, 0.8, time.monotonic())

    async def keep_writing() -> None:
        while True:
            deliverer.queue.last_write = time.monotonic()
            await asyncio.sleep(0.01)

    assert 0.75 <= _waited(deliverer, keep_writing) < 1.2


def test_zero_turns_it_off() -> None:
    assert _waited(_deliverer(0.0, 1.0, time.monotonic())) < 0.05
