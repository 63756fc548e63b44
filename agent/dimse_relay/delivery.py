"""The queued-mode deliverer: takes instances off the edge queue and stores them at the far
target through the ordinary relay protocol (session.py), as the modality would have.

Per item (docs/queued-mode.md):
- the far side unreachable (no agent subscribed: NATS, the leaf link or the far agents
  down): an outage, not a failed attempt. The deliverer keeps the item (extending its ack
  deadline) and asks again every ``outage_probe_s``; nothing is dead-lettered however long
  the outage lasts.
- the target answered Success or a Warning: acknowledged, its object deleted.
- a permanent failure (association rejected permanently, SOP class or transfer syntax not
  accepted, a status of ``is_permanent_status``): dead-lettered at once.
- any other failure: retried after an exponential backoff; after ``max_attempts``
  deliveries, dead-lettered with the last reason.

Runs on the NATS loop. One fetch loop per far AE title (its own consumer, queue.py) hands
messages to at most ``concurrency`` tasks, so an outage of one far AE title does not hold up
delivery to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from dimse_relay import envelope, metrics, statuses
from dimse_relay.config import AgentConfig, ListenerTimeouts
from dimse_relay.envelope import ContextProposal, EnvelopeError, QueuedHeader, RequestHeader
from dimse_relay.queue import EdgeQueue, consumer_name, file_digest
from dimse_relay.session import RelayError, close_session, open_session, store_instance
from dimse_relay.transport import NatsTransport, NotConnected

LOG = logging.getLogger("dimse_relay.delivery")
OUTAGE_PROBE_S = 5.0
# Far-side failures that mean "nobody to deliver to right now" rather than "this item failed".
_OUTAGE_REASONS = {"unavailable"}


class PermanentFailure(Exception):
    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class TransientFailure(Exception):
    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Outage(Exception):
    """No agent serves the far AE title right now (or NATS is down)."""


def is_permanent_status(status: int) -> bool:
    """C-STORE failure statuses that a retry cannot fix (PS3.4 B.2.3, PS3.7 C)."""
    return (
        0xA900 <= status <= 0xA9FF
        or 0xC000 <= status <= 0xCFFF
        or status in (0x0111, 0x0122, 0x0124, 0x0211, 0x0117, 0x0118)
    )


def backoff_s(attempt: int, initial: float, maximum: float) -> float:
    return float(min(maximum, initial * 2 ** max(0, attempt - 1)))


class Deliverer:
    def __init__(self, cfg: AgentConfig, transport: NatsTransport, queue: EdgeQueue):
        self.cfg = cfg
        self.qcfg = cfg.queue
        self.transport = transport
        self.queue = queue
        self.spool = cfg.work_dir / "queue-spool"
        self.spool.mkdir(exist_ok=True, mode=0o700)
        # Timeouts of the queued listener that accepted an item: by its AE title and far AE.
        self._timeouts = {
            (lst.ae_title, lst.far_ae_title): lst.timeouts
            for lst in cfg.listeners
            if lst.mode == "queued"
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._active: dict[str, set[asyncio.Task[None]]] = {}
        self._stopping = False
        self.outage_probe_s = min(OUTAGE_PROBE_S, self.qcfg.backoff_max_s)

    def start(self) -> None:
        async def begin() -> None:
            if any(not task.done() for task in self._tasks):
                return
            self._tasks = [asyncio.ensure_future(self._stats_loop())] + [
                asyncio.ensure_future(self._run(far)) for far in self.queue.far_ae_titles
            ]

        self.transport.on_connect(begin)

    def stop(self) -> None:
        """Stop fetching and put every item in hand back in the queue at once (nak)."""
        self._stopping = True

        async def cancel() -> None:
            tasks = [*self._tasks, *(t for mine in self._active.values() for t in mine)]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.transport.submit(cancel()).result(5.0)

    async def _stats_loop(self) -> None:
        while not self._stopping:
            try:
                if not self.queue.ready and self.transport.connected:
                    # Set up again after an error invalidated it (C-ECHO and /readyz answer
                    # from this), even when no C-STORE comes to do it.
                    await self.queue.setup()
                if self.queue.ready:
                    await self.queue.refresh_stats()
            except NotFoundError:
                self.queue.invalidate()  # a stream or the bucket is gone: set up again
            except Exception:  # noqa: S110 - NATS hiccups: the next poll tries again
                pass
            await asyncio.sleep(self.qcfg.stats_interval_s)

    async def _run(self, far_ae_title: str) -> None:
        delay = 1.0
        while not self._stopping:
            psub: Any = None
            try:
                if not self.queue.ready:
                    await self.queue.setup()
                await self.queue.ensure_consumer(far_ae_title)
                js = self.queue.js()
                psub = await js.pull_subscribe_bind(
                    consumer_name(far_ae_title), stream=self.qcfg.stream
                )
                delay = 1.0
                await self._fetch_loop(psub, far_ae_title)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # This far AE title's delivery only: the queue itself is checked by the
                # statistics poll, and a C-STORE that fails sets it up again.
                LOG.warning(
                    "edge queue delivery paused, retrying",
                    extra={"error": type(exc).__name__, "retry_s": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            finally:
                if psub is not None:
                    with contextlib.suppress(Exception):
                        await psub.unsubscribe()

    async def _fetch_loop(self, psub: Any, far_ae_title: str) -> None:
        # Items of this far AE title in hand. They outlive a failed fetch loop (acks do not
        # go through the subscription), and the next loop counts them: never more than
        # ``concurrency`` per far AE title.
        mine = self._active.setdefault(far_ae_title, set())
        while not self._stopping:
            free = self.qcfg.concurrency - len(mine)
            if free <= 0:
                await asyncio.wait(set(mine), return_when=asyncio.FIRST_COMPLETED)
                continue
            await self._yield_to_ingest()
            try:
                msgs = await psub.fetch(free, timeout=2.0)
            except TimeoutError:
                continue
            except Exception as exc:
                if "Timeout" in type(exc).__name__:
                    continue
                raise
            for msg in msgs:
                task = asyncio.ensure_future(self._deliver(msg))
                mine.add(task)
                task.add_done_callback(mine.discard)

    async def _yield_to_ingest(self) -> None:
        """Wait while the queued listeners are writing (queue.ingest_quiet_s), at most
        queue.ingest_defer_max_s: on a small machine, deliveries running beside a modality's
        C-STOREs slow its acknowledgements down; once it pauses, they catch up."""
        quiet = self.qcfg.ingest_quiet_s
        if quiet <= 0:
            return
        deadline = time.monotonic() + self.qcfg.ingest_defer_max_s
        while not self._stopping:
            now = time.monotonic()
            wait = min(self.queue.last_write + quiet, deadline) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    # -- one item --------------------------------------------------------------------------
    async def _deliver(self, msg: Msg) -> None:
        try:
            header, body = envelope.decode(msg.data)
        except EnvelopeError as exc:
            metrics.WIRE_REJECTED.labels(reason=exc.reason).inc()
            LOG.error("undecodable message in the edge queue; dropped", extra={"why": exc.reason})
            await msg.term()
            return
        if not isinstance(header, QueuedHeader):
            metrics.WIRE_REJECTED.labels(reason="unexpected_kind").inc()
            await msg.term()
            return
        attempt = int(msg.metadata.num_delivered)
        log = {"item": header.item_id, "attempt": attempt}
        keepalive = asyncio.ensure_future(self._keep_in_progress(msg))
        spooled: Path | None = None
        try:
            command = bytes(body[: header.command_length])
            source: Path | bytes
            if header.object_name:
                spooled = await self._fetch_object(header)
                source = spooled
            else:
                source = bytes(body[header.command_length :])
            await self._check_digest(header, source)
            while True:
                try:
                    status = await self._store(header, command, source)
                    break
                except Outage:
                    # Hold the item and ask again; the ack deadline is kept alive meanwhile.
                    await asyncio.sleep(self.outage_probe_s)
                    if self._stopping:
                        raise
            await self._ack(msg, header)
            if header.object_name:
                await self.queue.delete_object(header.object_name)
            metrics.QUEUE_ATTEMPTS.labels(result="delivered").inc()
            LOG.info("queued instance delivered", extra={**log, "status": f"0x{status:04X}"})
        except PermanentFailure as exc:
            await self._dead_letter(msg, header, bytes(body), exc.reason, exc.status, attempt)
        except TransientFailure as exc:
            if attempt >= self.qcfg.max_attempts:
                await self._dead_letter(msg, header, bytes(body), exc.reason, exc.status, attempt)
            else:
                delay = backoff_s(attempt, self.qcfg.backoff_initial_s, self.qcfg.backoff_max_s)
                metrics.QUEUE_ATTEMPTS.labels(result="retry").inc()
                LOG.warning(
                    "queued instance not delivered; will retry",
                    extra={**log, "why": exc.reason, "retry_s": delay},
                )
                with contextlib.suppress(Exception):
                    await msg.nak(delay=delay)
        except asyncio.CancelledError:
            # Shutting down: the item goes back to the queue at once (nak without delay).
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Outage:  # held through an outage until the agent stops
            with contextlib.suppress(Exception):
                await msg.nak()
        except Exception as exc:  # a bug or a JetStream hiccup: retry, never lose the item
            LOG.error("queued delivery error", extra={**log, "error": type(exc).__name__})
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.qcfg.backoff_initial_s)
        finally:
            keepalive.cancel()
            if spooled is not None:
                spooled.unlink(missing_ok=True)

    async def _ack(self, msg: Msg, header: QueuedHeader) -> None:
        """Acknowledge a delivered item. If the acknowledgement is not confirmed, the item may
        still come again (its object must stay) or be gone (its object is nobody's)."""
        try:
            await msg.ack_sync(timeout=self.qcfg.write_timeout_s)
        except Exception:
            seq = int(msg.metadata.sequence.stream)
            if header.object_name and not await self.queue.still_queued(seq):
                await self.queue.delete_object(header.object_name)
            raise

    async def _keep_in_progress(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.qcfg.ack_wait_s / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _dead_letter(
        self,
        msg: Msg,
        header: QueuedHeader,
        body: bytes,
        reason: str,
        status: int | None,
        attempt: int,
    ) -> None:
        seq = int(msg.metadata.sequence.stream)
        try:
            await self.queue.dead_letter(header, body, reason, status, attempt, seq)
        except Exception as exc:  # e.g. the dead-letter stream is full: keep the item queued
            LOG.error(
                "could not dead-letter a queued instance; it stays queued",
                extra={"item": header.item_id, "error": type(exc).__name__, "why": reason},
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.qcfg.backoff_max_s)
            return
        try:
            await msg.ack_sync(timeout=self.qcfg.write_timeout_s)
        except Exception as exc:
            # The dead letter is stored (once, by its Nats-Msg-Id); the item comes again and
            # is dead-lettered again without a second copy.
            LOG.warning(
                "dead-lettered item not acknowledged; it will come again",
                extra={"item": header.item_id, "error": type(exc).__name__},
            )
            return
        metrics.QUEUE_ATTEMPTS.labels(result="dead_letter").inc()
        LOG.error(
            "queued instance moved to the dead-letter stream",
            extra={"item": header.item_id, "attempt": attempt, "why": reason},
        )

    async def _fetch_object(self, header: QueuedHeader) -> Path:
        assert header.object_name is not None
        path = self.spool / f"{header.item_id}.part"
        # Bounded: a read whose chunks vanish (a purged bucket) would otherwise wait forever.
        budget = self.qcfg.write_timeout_s * (2 + header.dataset_length // (1 << 20))
        try:
            with path.open("wb") as fh:
                await asyncio.wait_for(
                    self.queue.objects().get(header.object_name, writeinto=fh), budget
                )
        except Exception as exc:
            path.unlink(missing_ok=True)
            if "NotFound" in type(exc).__name__:
                raise PermanentFailure("object missing from the edge bucket") from None
            raise TransientFailure(f"edge bucket read failed: {type(exc).__name__}") from None
        return path

    async def _check_digest(self, header: QueuedHeader, source: Path | bytes) -> None:
        if isinstance(source, bytes):
            digest = hashlib.sha256(source).hexdigest()
        else:
            digest = await asyncio.get_running_loop().run_in_executor(None, file_digest, source, 0)
        if digest != header.digest:
            raise PermanentFailure("dataset digest mismatch in the edge queue")

    async def _store(self, header: QueuedHeader, command: bytes, source: Path | bytes) -> int:
        """One delivery attempt; returns the target's Success/Warning status."""
        timeouts = self._timeouts.get(
            (header.listener_ae_title, header.called_ae_title), ListenerTimeouts()
        )
        prefix = self.cfg.nats.subject_prefix
        proposal = ContextProposal(
            id=1,
            abstract_syntax=header.abstract_syntax,
            transfer_syntaxes=[header.transfer_syntax],
        )
        if not self.transport.connected:
            raise Outage()
        try:
            result = await open_session(
                self.transport,
                prefix,
                assoc_id=f"q{header.item_id[:15]}",
                calling_ae_title=header.calling_ae_title,
                far_ae_title=header.called_ae_title,
                proposals=[proposal],
                timeout_s=timeouts.open_s,
            )
        except RelayError as exc:
            # No responders (the link or the far agents are down) is an outage; a timeout
            # (a far agent answering slowly, e.g. its SCP host not answering) is an attempt.
            if exc.failure.reason in _OUTAGE_REASONS:
                raise Outage() from None
            raise TransientFailure(str(exc)) from None
        except (
            NotConnected,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
        ):
            raise Outage() from None  # NATS went away while asking
        except Exception as exc:  # anything else counts as an attempt, so it ends somewhere
            raise TransientFailure(f"could not open a session: {type(exc).__name__}") from None
        if result.result == "rejected":
            why = f"association rejected by the target ({result.reject_reason})"
            if result.reject_result == 1:
                raise PermanentFailure(why)
            raise TransientFailure(why)
        if result.result == "failed" and result.failure == "no_contexts":
            raise PermanentFailure(
                "SOP class or transfer syntax not accepted by the target",
                statuses.SOP_CLASS_NOT_SUPPORTED,
            )
        if result.result != "accepted" or not result.session_subject:
            raise TransientFailure("target SCP unreachable")
        session = result.session_subject
        try:
            accepted = [c for c in result.accepted if c.id == 1]
            if not accepted:
                raise PermanentFailure(
                    "SOP class or transfer syntax not accepted by the target",
                    statuses.SOP_CLASS_NOT_SUPPORTED,
                )
            request = RequestHeader(
                op_id=1,
                service="C-STORE",
                abstract_syntax=header.abstract_syntax,
                transfer_syntax=accepted[0].transfer_syntax,
                command_length=len(command),
                dataset_length=header.dataset_length,
            )
            try:
                response = await store_instance(
                    self.transport,
                    session,
                    request,
                    command,
                    source,
                    0,
                    window=self.cfg.nats.window_chunks,
                    chunk_ack_s=timeouts.chunk_ack_s,
                    request_s=timeouts.request_s,
                )
            except RelayError as exc:
                raise TransientFailure(str(exc)) from None
            status = int(response.Status)
            if metrics.status_class(status) in ("success", "warning"):
                return status
            why = f"target returned 0x{status:04X}"
            if status == 0x0111:
                why = "target already holds another instance with this SOP Instance UID"
            if is_permanent_status(status):
                raise PermanentFailure(why, status)
            raise TransientFailure(why, status)
        finally:
            await close_session(self.transport, session, "release")
