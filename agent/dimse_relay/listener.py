"""Listeners: local DICOM SCPs that stand in for remote AE titles.

When an SCU asks for an association, the listener sends the proposal (calling AE title,
presentation contexts, role selection) to the agent serving the called AE title, which opens
the same association with the real SCP. The listener then accepts exactly what the real SCP
accepted, or rejects with the same reason. If the far side cannot be asked (no agent, NATS
down, timeout) it accepts its local fallback contexts and answers every request with a
documented failure status (see statuses.py), so modalities see a status rather than an abort.

Each DIMSE request is relayed on the session subject and the real response written back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from dimse_relay import envelope, metrics, statuses
from dimse_relay.config import AgentConfig, ListenerConfig
from dimse_relay.dicom import (
    SOCKET_HANDLERS,
    contexts_from_results,
    dataset_offset,
    decode_command,
    decode_dataset,
    dimse_tls_context,
    fallback_contexts,
    proposals_from_primitive,
    request_command,
)
from dimse_relay.direct_listener import DirectGroup
from dimse_relay.envelope import (
    CancelHeader,
    ContextProposal,
    ContextResult,
    EnvelopeError,
    ErrorHeader,
    OpenResultHeader,
    QueuedHeader,
    RequestHeader,
    ResponseHeader,
)
from dimse_relay.queue import EdgeQueue, QueueFull, QueueUnavailable, file_digest, new_item_id
from dimse_relay.retrieve import (
    InstanceMessage,
    RetrieveCollector,
    RetrieveStream,
    is_instance_message,
    split_request,
)
from dimse_relay.session import (
    FAILURES,
    RelayError,
    close_session,
    open_session,
    store_instance,
    took_no_context,
    valid_reject,
)
from dimse_relay.statuses import RelayFailure
from dimse_relay.streaming import FAR_SIDE_GONE, StreamAborted, await_response, far_side_gone
from dimse_relay.transport import NatsTransport

LOG = logging.getLogger("dimse_relay.listener")
# A C-GET in this SOP class makes pynetdicom strip bulk data from every instance it sends.
COMPOSITE_RETRIEVE_WITHOUT_BULK_DATA = "1.2.840.10008.5.1.4.1.2.5.3"
# How long a session liveness probe waits: a live session does not answer it at all (so this
# is what a far-side timeout on a live session costs in addition), a gone one is reported by
# NATS ("no responders") within a round trip.
SESSION_PROBE_S = 0.25
# How long a stopping agent lets its pynetdicom associations end on their own before it
# aborts them.
STOP_GRACE_S = 2.0


def _reject(assoc: Any, result: int, source: int, reason: int) -> None:
    """Send A-ASSOCIATE-RJ from an EVT_REQUESTED handler and wait until it is on the wire.

    pynetdicom closes the socket as soon as the handler returns; without waiting for the DUL
    to finish (as its own reject path does) the SCU sees a dropped connection, not the RJ.
    """
    assoc.acse.send_reject(result, source, reason)
    assoc.kill()


@dataclass
class RelayedAssociation:
    """Listener-side state of one association from a local SCU."""

    assoc_id: str
    listener: ListenerConfig
    calling_ae_title: str
    proposals: list[ContextProposal]
    session_subject: str | None = None
    op_counter: int = 0
    log_extra: dict[str, Any] = field(default_factory=dict)
    assoc: Any = None  # the pynetdicom association (kept so its id() is not reused)
    closed: bool = False  # the SCU's association ended (possibly while the OPEN was pending)

    def next_op(self) -> int:
        self.op_counter += 1
        return self.op_counter


class ListenerServer:
    """All listeners of one agent, grouped by (bind address, port)."""

    def __init__(
        self, agent_cfg: AgentConfig, transport: NatsTransport, queue: EdgeQueue | None = None
    ):
        self.agent_cfg = agent_cfg
        self.transport = transport
        self.queue = queue
        self.nats_cfg = agent_cfg.nats
        self.servers: list[Any] = []
        self._fallback = fallback_contexts()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.retrieve_dir = agent_cfg.work_dir / "retrieved"
        self.retrieve_dir.mkdir(exist_ok=True, mode=0o700)
        self.incoming_dir = agent_cfg.work_dir / "incoming"
        self.incoming_dir.mkdir(exist_ok=True, mode=0o700)
        self._direct_tasks: set[Any] = set()
        self._relayed: dict[int, RelayedAssociation] = {}
        # Queued listeners: what the real target accepted, per (listener, calling AET,
        # proposal), used while the far side cannot be asked.
        self._negotiated: dict[tuple[Any, ...], list[ContextResult]] = {}

    # -- server lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        groups: dict[tuple[str, int], list[ListenerConfig]] = {}
        for lcfg in self.agent_cfg.listeners:
            groups.setdefault((lcfg.bind, lcfg.port), []).append(lcfg)
        for (bind, port), lcfgs in groups.items():
            ae = AE(ae_title=lcfgs[0].ae_title)
            ae.require_called_aet = False  # checked per listener in EVT_REQUESTED
            ae.maximum_associations = sum(c.max_associations for c in lcfgs)
            first = lcfgs[0]
            ae.acse_timeout = first.timeouts.acse_s
            ae.dimse_timeout = first.timeouts.dimse_s
            ae.network_timeout = first.timeouts.network_s
            ae.maximum_pdu_size = first.max_pdu
            ae.supported_contexts = self._fallback
            by_aet = {c.ae_title: c for c in lcfgs}
            handlers: list[Any] = [
                *SOCKET_HANDLERS,
                (evt.EVT_REQUESTED, self._on_requested, [by_aet]),
                (evt.EVT_C_ECHO, self._on_echo),
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_C_FIND, self._on_find),
                (evt.EVT_C_GET, self._on_get),
                (evt.EVT_C_MOVE, self._on_move),
                (evt.EVT_RELEASED, self._on_closed, ["release"]),
                (evt.EVT_ABORTED, self._on_closed, ["abort"]),
                (evt.EVT_CONN_CLOSE, self._on_closed, ["abort"]),
            ]
            group = None
            if self.agent_cfg.direct_dimse and first.tls is None:
                group = DirectGroup(self, by_aet, ae.maximum_associations)
            server = cast(
                RelayAssociationServer,
                ae.make_server(
                    (bind, port),
                    evt_handlers=handlers,
                    ssl_context=dimse_tls_context(first.tls) if first.tls else None,
                    server_class=RelayAssociationServer,
                ),
            )
            server.direct = group
            if group is not None:
                group.pynetdicom_server = server
            ae._servers.append(server)
            threading.Thread(
                target=server.serve_forever, name=f"listener-{port}", daemon=True
            ).start()
            self.servers.append(server)
            LOG.info(
                "listener bound",
                extra={
                    "bind": bind,
                    "port": port,
                    "ae_titles": sorted(by_aet),
                    "tls": first.tls is not None,
                },
            )
        threading.Thread(
            target=self._sweep_dead_associations, name="listener-sweeper", daemon=True
        ).start()

    def track_direct(self, coro: Any) -> None:
        """(loop) Run ``coro`` in the background, keeping a reference until it is done."""
        task = asyncio.ensure_future(coro)
        self._direct_tasks.add(task)
        task.add_done_callback(self._direct_tasks.discard)

    def stop(self) -> None:
        """Stop accepting; operations waiting for the far side answer their SCU with a
        failure at once (``_stopping``). Associations still open after STOP_GRACE_S (an SCU
        that keeps its association, a sub-operation still running) are aborted: their
        threads would otherwise keep the process from exiting."""
        self._stopping.set()
        for server in self.servers:
            server.shutdown()
        active = [assoc for server in self.servers for assoc in server.active_associations]
        self.servers.clear()
        deadline = time.monotonic() + STOP_GRACE_S
        while any(assoc.is_established for assoc in active) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in active:
            if assoc.is_established:
                with contextlib.suppress(Exception):
                    assoc.abort(block=False)

    @property
    def bound(self) -> bool:
        return bool(self.servers) or not self.agent_cfg.listeners

    # -- association negotiation ------------------------------------------------------------
    def _on_requested(self, event: evt.Event, by_aet: dict[str, ListenerConfig]) -> None:
        assoc = event.assoc
        prim = assoc.requestor.primitive
        assert prim is not None  # EVT_REQUESTED fires after the A-ASSOCIATE-RQ is read
        called = str(prim.called_ae_title).strip()
        calling = str(prim.calling_ae_title).strip()
        assoc_id = uuid.uuid4().hex[:16]
        lcfg = by_aet.get(called)
        log_extra = {"assoc_id": assoc_id}
        if lcfg is None:
            LOG.info("association rejected: called AE title not served", extra=log_extra)
            metrics.ASSOCIATIONS.labels(role="listener", result="rejected_called_aet").inc()
            _reject(assoc, 0x01, 0x01, 0x07)
            return
        log_extra["listener"] = lcfg.ae_title
        if lcfg.allowed_calling_aets and calling not in lcfg.allowed_calling_aets:
            LOG.info("association rejected: calling AE title not allowed", extra=log_extra)
            metrics.ASSOCIATIONS.labels(role="listener", result="rejected_calling_aet").inc()
            _reject(assoc, 0x01, 0x01, 0x03)
            return
        proposals = proposals_from_primitive(assoc)
        relayed = RelayedAssociation(
            assoc_id=assoc_id,
            listener=lcfg,
            calling_ae_title=calling,
            proposals=proposals,
            log_extra=log_extra,
        )
        relayed.assoc = assoc
        with self._lock:
            self._relayed[id(assoc)] = relayed
        if lcfg.mode == "queued":
            self._negotiate_queued(relayed)
            return
        try:
            result = self._open_far(relayed)
        except RelayError as exc:
            LOG.warning(
                "far side unavailable at association time; accepting locally",
                extra={**log_extra, "why": exc.failure.reason},
            )
            metrics.ASSOCIATIONS.labels(role="listener", result="accepted_fallback").inc()
            assoc.acceptor.supported_contexts = self._fallback
            return
        if result.result == "accepted":
            assert result.session_subject is not None  # checked by _open_far
            if not self._attach_session(relayed, result.session_subject):
                return
            assoc.acceptor.supported_contexts = contexts_from_results(result.accepted)
            metrics.ASSOCIATIONS.labels(role="listener", result="accepted").inc()
            LOG.info("association relayed", extra={**log_extra, "contexts": len(result.accepted)})
            return
        if result.result == "rejected":
            metrics.ASSOCIATIONS.labels(role="listener", result="rejected_by_target").inc()
            LOG.info("association rejected by the target", extra=log_extra)
            _reject(assoc, *valid_reject(result))
            with self._lock:
                self._relayed.pop(id(assoc), None)
            return
        if took_no_context(result):
            # The target took none of the proposed contexts: neither does the listener.
            LOG.info("target accepted no presentation context", extra=log_extra)
            metrics.ASSOCIATIONS.labels(role="listener", result="no_contexts").inc()
            assoc.acceptor.supported_contexts = []
            with self._lock:
                self._relayed.pop(id(assoc), None)
            return
        # The far agent answered but could not reach its SCP: accept locally, fail requests.
        LOG.warning("target SCP unreachable; accepting locally", extra=log_extra)
        metrics.ASSOCIATIONS.labels(role="listener", result="accepted_fallback").inc()
        assoc.acceptor.supported_contexts = self._fallback

    def _negotiate_queued(self, relayed: RelayedAssociation) -> None:
        """Queued mode: accept what the real target accepts when the far side answers (the
        SCU then sends the transfer syntax the target would get in sync mode, and a SOP class
        the target refuses is refused now rather than dead-lettered later); during an outage
        accept what it accepted for the same proposal before, else the fallback contexts.
        The far session, when there is one, serves the other services (C-FIND, ...)."""
        assoc = relayed.assoc
        try:
            result: OpenResultHeader | None = self._open_far(relayed)
        except RelayError:
            result = None
        if result is not None and result.result == "rejected":
            metrics.ASSOCIATIONS.labels(role="listener", result="rejected_by_target").inc()
            LOG.info("association rejected by the target", extra=relayed.log_extra)
            _reject(assoc, *valid_reject(result))
            with self._lock:
                self._relayed.pop(id(assoc), None)
            return
        accepted: list[ContextResult] | None = None
        if result is not None and took_no_context(result):
            # The target answered and took none of the contexts: the SCU hears that now
            # (every context rejected), not a Success followed by a dead letter.
            accepted = []
        elif result is not None and result.result == "accepted":
            assert result.session_subject is not None  # checked by open_session
            if not self._attach_session(relayed, result.session_subject):
                return
            accepted = result.accepted
        accepted, source = self.remembered_negotiation(
            relayed.listener, relayed.calling_ae_title, relayed.proposals, accepted
        )
        metrics.ASSOCIATIONS.labels(
            role="listener", result="no_contexts" if accepted == [] else "accepted_queued"
        ).inc()
        assoc.acceptor.supported_contexts = (
            contexts_from_results(accepted) if accepted is not None else self._fallback
        )
        LOG.info(
            "association accepted for the edge queue",
            extra={**relayed.log_extra, "negotiated": source},
        )

    def remembered_negotiation(
        self,
        lcfg: ListenerConfig,
        calling: str,
        proposals: list[ContextProposal],
        accepted: list[ContextResult] | None,
    ) -> tuple[list[ContextResult] | None, str]:
        """Queued listeners: remember what the target accepted for this proposal (when it
        answered, ``accepted`` not None), or look up what it accepted before. Returns the
        contexts (None: never seen) and where they come from: target, remembered or local."""
        key = (
            lcfg.ae_title,
            lcfg.port,
            lcfg.far_ae_title,
            calling,
            tuple((p.id, p.abstract_syntax, tuple(p.transfer_syntaxes)) for p in proposals),
        )
        with self._lock:
            if accepted is not None:
                self._negotiated[key] = accepted
                while len(self._negotiated) > 1024:
                    self._negotiated.pop(next(iter(self._negotiated)))
                return accepted, "target"
            found = self._negotiated.get(key)
        return found, "remembered" if found is not None else "local"

    def _open_far(self, relayed: RelayedAssociation) -> OpenResultHeader:
        lcfg = relayed.listener
        timeout_s = lcfg.timeouts.open_s
        coro = open_session(
            self.transport,
            self.nats_cfg.subject_prefix,
            assoc_id=relayed.assoc_id,
            calling_ae_title=relayed.calling_ae_title,
            far_ae_title=lcfg.far_ae_title,
            proposals=relayed.proposals,
            timeout_s=timeout_s,
        )
        return cast(OpenResultHeader, self._call(coro, timeout_s + 1.0))

    def _call(self, coro: Any, timeout: float) -> Any:
        try:
            return self.transport.call(coro, timeout)
        except RelayError:
            raise
        except TimeoutError:
            raise RelayError(statuses.FAR_SIDE_TIMEOUT) from None
        except Exception as exc:
            raise RelayError(statuses.FAR_SIDE_UNAVAILABLE, type(exc).__name__) from None

    def _ensure_session(self, relayed: RelayedAssociation) -> str:
        """The session subject; after a fallback accept, try once more to reach the far side."""
        if relayed.session_subject:
            return relayed.session_subject
        result = self._open_far(relayed)
        if result.result != "accepted" or not result.session_subject:
            raise RelayError(
                statuses.TARGET_UNREACHABLE
                if result.result == "failed"
                else statuses.FAR_SIDE_UNAVAILABLE
            )
        if not self._attach_session(relayed, result.session_subject):
            raise RelayError(statuses.FAR_SIDE_UNAVAILABLE, "association closed")
        return result.session_subject

    def _after_failure(self, relayed: RelayedAssociation, failure: RelayFailure) -> None:
        """A far session NATS reported gone is dropped; after a timeout or an ERROR
        ``unavailable`` (e.g. its agent stopping) it is probed first."""
        if failure is statuses.FAR_SESSION_GONE:
            self._forget_lost_session(relayed, known_gone=True)
        elif failure in (statuses.FAR_SIDE_TIMEOUT, statuses.FAR_SIDE_UNAVAILABLE):
            self._forget_lost_session(relayed)

    def _forget_lost_session(self, relayed: RelayedAssociation, known_gone: bool = False) -> None:
        """After a far-side timeout: is the far session still there? A far agent that died
        (its session subscription gone) would make every later request of the association
        fail or wait out its own timeout; instead the next request opens a new far session,
        with whichever agent serves the far AE title now."""
        subject = relayed.session_subject
        if not subject:
            return
        if not known_gone:
            try:
                gone = bool(self._call(self._session_gone(subject), SESSION_PROBE_S + 1.0))
            except Exception:
                return
            if not gone:
                return
        with self._lock:
            if relayed.session_subject != subject or relayed.closed:
                return
            relayed.session_subject = None
        metrics.ACTIVE_SESSIONS.labels(role="listener").dec()
        # In case "no responders" was a reconnecting far agent: it then closes its session.
        self._send_close(subject, "abort")
        LOG.warning("far session lost; the next request opens a new one", extra=relayed.log_extra)

    async def _session_gone(self, subject: str) -> bool:
        """True if nobody is subscribed to ``subject`` (NATS answers "no responders"). The
        probe is a CANCEL for no operation, which a live session ignores (no answer)."""
        probe = envelope.encode(CancelHeader(op_id=0))
        try:
            await self.transport.client().request(subject, probe, timeout=SESSION_PROBE_S)
        except Exception as exc:
            return "NoResponders" in type(exc).__name__
        return False

    def _attach_session(self, relayed: RelayedAssociation, subject: str) -> bool:
        """Record the far session; if the SCU's association ended while the OPEN was in
        flight (pynetdicom keeps reading meanwhile), close the far session right away."""
        with self._lock:
            if not relayed.closed:
                relayed.session_subject = subject
                metrics.ACTIVE_SESSIONS.labels(role="listener").inc()
                return True
        LOG.info("association ended while being relayed", extra=relayed.log_extra)
        self._send_close(subject, "abort")
        return False

    def _send_close(self, subject: str, mode: str) -> None:
        with contextlib.suppress(Exception):
            self.transport.submit(close_session(self.transport, subject, mode))

    # -- DIMSE services ---------------------------------------------------------------------
    def _failure_status(self, service: str, failure: RelayFailure) -> Dataset:
        ds = Dataset()
        ds.Status = failure.status_for(service)
        ds.ErrorComment = failure.comment[:64]
        return ds

    def _relay(self, event: evt.Event, service: str, run: Any) -> Dataset | int:
        relayed = self._relayed.get(id(event.assoc))
        started = time.monotonic()
        if relayed is None:
            return self._failure_status(service, statuses.PROTOCOL_ERROR)
        try:
            subject = self._ensure_session(relayed)
            status: Dataset = run(relayed, subject)
        except RelayError as exc:
            LOG.warning(
                "relay failed", extra={**relayed.log_extra, "service": service, "why": str(exc)}
            )
            status = self._failure_status(service, exc.failure)
            self._after_failure(relayed, exc.failure)
        except Exception as exc:  # a bug must give a failure status, never a false Success
            LOG.error(
                "relay error",
                extra={**relayed.log_extra, "service": service, "error": type(exc).__name__},
            )
            status = self._failure_status(service, statuses.PROTOCOL_ERROR)
        metrics.LATENCY.labels(service=service).observe(time.monotonic() - started)
        metrics.REQUESTS.labels(
            role="listener", service=service, status=metrics.status_class(int(status.Status))
        ).inc()
        return status

    def _on_echo(self, event: evt.Event) -> Dataset | int:
        relayed = self._relayed.get(id(event.assoc))
        if relayed is not None and relayed.listener.mode == "queued":
            # Answered here: what a queued listener promises is the edge queue, not the target.
            ok = self.queue is not None and self.queue.ready and self.transport.connected
            status = statuses.SUCCESS if ok else statuses.PROCESSING_FAILURE
            metrics.REQUESTS.labels(
                role="listener", service="C-ECHO", status=metrics.status_class(status)
            ).inc()
            return status

        def run(relayed: RelayedAssociation, subject: str) -> Dataset:
            command, _ = request_command(event.request, C_ECHO_RQ(), None)
            hdr = RequestHeader(
                op_id=relayed.next_op(),
                service="C-ECHO",
                abstract_syntax=str(event.context.abstract_syntax),
                transfer_syntax=str(event.context.transfer_syntax),
                command_length=len(command),
                dataset_length=-1,
            )
            timeout = relayed.listener.timeouts.request_s
            return self._call(self._single(subject, hdr, command, timeout), timeout + 1.0)  # type: ignore[no-any-return]

        return self._relay(event, "C-ECHO", run)

    def _on_store(self, event: evt.Event) -> Dataset | int:
        path: Path = event.dataset_path
        relayed = self._relayed.get(id(event.assoc))
        if relayed is not None and relayed.listener.mode == "queued":
            return self._queue_store(event, relayed, path)

        def run(relayed: RelayedAssociation, subject: str) -> Dataset:
            # The dataset is in the temp file; only the command set goes in the header message.
            command, _ = request_command(event.request, C_STORE_RQ(), "DataSet")
            offset = dataset_offset(path)
            length = path.stat().st_size - offset
            lcfg = relayed.listener
            coro = self._send_store(relayed, subject, event, command, path, offset, length)
            # The whole transfer is bounded by per-chunk timeouts; the final wait by request_s.
            budget = lcfg.timeouts.request_s + lcfg.timeouts.chunk_ack_s * (
                2 + length // self.transport.chunk_size
            )
            return self._call(coro, budget)  # type: ignore[no-any-return]

        return self._relay(event, "C-STORE", run)

    def _queue_store(self, event: evt.Event, relayed: RelayedAssociation, path: Path) -> Dataset:
        """Queued mode: Success once the instance is durably in the edge queue."""
        started = time.monotonic()
        lcfg = relayed.listener
        try:
            if self.queue is None:
                raise QueueUnavailable("no edge queue")
            command, _ = request_command(event.request, C_STORE_RQ(), "DataSet")
            offset = dataset_offset(path)
            length = path.stat().st_size - offset
            header = QueuedHeader(
                item_id=new_item_id(),
                listener_ae_title=lcfg.ae_title,
                calling_ae_title=relayed.calling_ae_title,
                called_ae_title=lcfg.far_ae_title,
                abstract_syntax=str(event.context.abstract_syntax),
                transfer_syntax=str(event.context.transfer_syntax),
                sop_instance_uid=str(cast(C_STORE, event.request).AffectedSOPInstanceUID),
                command_length=len(command),
                dataset_length=length,
                digest=file_digest(path, offset),
                queued_at=time.time(),
            )
            qcfg = self.agent_cfg.queue
            budget = qcfg.write_timeout_s * (2 + length // qcfg.object_chunk_bytes)
            self.transport.call(self.queue.enqueue(header, command, path, offset), budget)
            status = Dataset()
            status.Status = statuses.SUCCESS
        except QueueFull:
            metrics.QUEUE_REFUSED.labels(reason="full").inc()
            LOG.warning("edge queue full; C-STORE refused", extra=relayed.log_extra)
            status = self._failure_status("C-STORE", statuses.QUEUE_FULL)
        except Exception as exc:  # JetStream down, timeout, NATS not connected
            metrics.QUEUE_REFUSED.labels(reason="unavailable").inc()
            LOG.warning(
                "edge queue unavailable; C-STORE refused",
                extra={**relayed.log_extra, "error": type(exc).__name__},
            )
            status = self._failure_status("C-STORE", statuses.QUEUE_UNAVAILABLE)
        metrics.LATENCY.labels(service="C-STORE").observe(time.monotonic() - started)
        metrics.REQUESTS.labels(
            role="listener", service="C-STORE", status=metrics.status_class(int(status.Status))
        ).inc()
        return status

    async def _single(
        self, subject: str, hdr: RequestHeader, body: bytes, timeout_s: float
    ) -> Dataset:
        inbox, queue = self.transport.replies.new_inbox()
        try:
            await self.transport.publish(subject, envelope.encode(hdr, body), reply=inbox)
            return await self._await_response(queue, hdr.op_id, timeout_s)
        finally:
            self.transport.replies.release(inbox)

    async def _await_response(
        self, queue: asyncio.Queue[Any], op_id: int, timeout_s: float
    ) -> Dataset:
        try:
            return await await_response(queue, op_id, timeout_s)
        except StreamAborted as exc:
            raise RelayError(FAILURES[exc.reason], exc.comment) from None

    def _decode_reply(self, msg: Any) -> tuple[Any, memoryview]:
        try:
            return envelope.decode(msg.data)
        except EnvelopeError as exc:
            metrics.WIRE_REJECTED.labels(reason=exc.reason).inc()
            return None, memoryview(b"")

    async def _send_store(
        self,
        relayed: RelayedAssociation,
        subject: str,
        event: evt.Event,
        command: bytes,
        path: Path,
        offset: int,
        length: int,
    ) -> Dataset:
        lcfg = relayed.listener
        request = RequestHeader(
            op_id=relayed.next_op(),
            service="C-STORE",
            abstract_syntax=str(event.context.abstract_syntax),
            transfer_syntax=str(event.context.transfer_syntax),
            command_length=len(command),
            dataset_length=length,
        )
        return await store_instance(
            self.transport,
            subject,
            request,
            command,
            path,
            offset,
            window=self.nats_cfg.window_chunks,
            chunk_ack_s=lcfg.timeouts.chunk_ack_s,
            request_s=lcfg.timeouts.request_s,
        )

    def _on_find(self, event: evt.Event) -> Iterator[tuple[Dataset | int, Dataset | None]]:
        """C-FIND: every pending response is yielded to pynetdicom as it arrives from the far
        side; a C-CANCEL from the SCU is relayed to the real SCP, whose final status the SCU
        then gets."""
        command, raw = split_request(cast(C_FIND, event.request), C_FIND_RQ())
        yield from self._relay_streamed(event, "C-FIND", command, raw)

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET: the far agent retrieves from the real SCP; the instances come back over NATS
        and pynetdicom sends them to the SCU as C-STORE sub-operations on its association."""
        command, raw = split_request(cast(C_GET, event.request), C_GET_RQ())
        stream = self._retrieve_stream(event, "C-GET", command, raw)
        decode = str(event.context.abstract_syntax) == COMPOSITE_RETRIEVE_WITHOUT_BULK_DATA
        announced = stream.announced(need_contexts=False)
        if announced is None:
            yield from stream.finished().suboperations(decode=decode)
        else:
            yield from stream.suboperations(announced, decode=decode)

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE: as C-GET on the far side; this agent stores the instances to the move
        destination, found in its own AE table (move_destinations), never on the far side."""
        req = cast(C_MOVE, event.request)
        destination = self.agent_cfg.move_destinations.get(str(req.MoveDestination).strip())
        if destination is None:
            LOG.info("C-MOVE to an unknown destination", extra=self._log_extra(event))
            metrics.REQUESTS.labels(role="listener", service="C-MOVE", status="failure").inc()
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        command, raw = split_request(req, C_MOVE_RQ())
        stream = self._retrieve_stream(event, "C-MOVE", command, raw)
        announced = stream.announced(need_contexts=True)
        suboperations: Iterator[Any]
        if announced is None:
            # Nothing announced (the retrieve is over, or the SCP sends no counts): the
            # destination gets one context per (SOP class, transfer syntax) retrieved.
            retrieved = stream.finished()
            contexts = retrieved.contexts()
            suboperations = retrieved.suboperations()
        else:
            contexts = announced.destination_contexts()
            suboperations = stream.suboperations(announced)
        # pynetdicom opens the destination association itself: give it our socket handlers
        # (TCP_NODELAY, timeouts) too, or every sub-operation waits for Nagle's delayed ACK.
        yield (
            destination.host,
            destination.port,
            {"contexts": contexts, "evt_handlers": SOCKET_HANDLERS},
        )
        yield from suboperations

    def _log_extra(self, event: evt.Event) -> dict[str, Any]:
        relayed = self._relayed.get(id(event.assoc))
        return relayed.log_extra if relayed is not None else {}

    def _retrieve_stream(
        self, event: evt.Event, service: str, command: bytes, identifier: bytes
    ) -> RetrieveStream:
        """Start a C-GET/C-MOVE on the far side; its instances are collected on their own
        thread while the handler sends those that have arrived."""
        collector = RetrieveCollector(self.transport, self.retrieve_dir)
        return RetrieveStream(
            collector, lambda: self._retrieve(event, service, command, identifier, collector)
        )

    def _retrieve(
        self,
        event: evt.Event,
        service: str,
        command: bytes,
        identifier: bytes,
        collector: RetrieveCollector,
    ) -> None:
        """(collecting thread) Run a C-GET/C-MOVE on the far side to its final response,
        spooling every instance it streams back (each acknowledged once it is on disk)."""
        relayed = self._relayed.get(id(event.assoc))
        if relayed is None:
            collector.fail(self._failure_status(service, statuses.PROTOCOL_ERROR))
            return
        try:
            for item in self._stream_responses(
                event, relayed, service, command, identifier, instances=True
            ):
                if isinstance(item, InstanceMessage):
                    collector.on_instance(item)
                else:
                    collector.on_response(*item)
                if collector.abandoned:
                    break  # the SCU or destination is gone: cancel the far retrieve
        except Exception:
            LOG.exception("retrieve failed", extra={**relayed.log_extra, "service": service})
            collector.fail(self._failure_status(service, statuses.PROTOCOL_ERROR))
        finally:
            collector.close()
        final = collector.result.final
        metrics.REQUESTS.labels(
            role="listener",
            service=service,
            status=metrics.status_class(int(final.Status)) if final else "none",
        ).inc()

    def _relay_streamed(
        self, event: evt.Event, service: str, command: bytes, identifier: bytes
    ) -> Iterator[tuple[Dataset | int, Dataset | None]]:
        """Relay one request whose responses come as a stream (C-FIND, C-GET, C-MOVE)."""
        relayed = self._relayed.get(id(event.assoc))
        started = time.monotonic()
        if relayed is None:
            yield self._failure_status(service, statuses.PROTOCOL_ERROR), None
            return
        last_status = 0
        for status, dataset in self._stream_responses(event, relayed, service, command, identifier):
            last_status = int(status.Status)
            yield status, dataset
        metrics.LATENCY.labels(service=service).observe(time.monotonic() - started)
        metrics.REQUESTS.labels(
            role="listener", service=service, status=metrics.status_class(last_status)
        ).inc()

    def _stream_responses(
        self,
        event: evt.Event,
        relayed: RelayedAssociation,
        service: str,
        command: bytes,
        identifier: bytes,
        instances: bool = False,
    ) -> Iterator[Any]:
        """Send one request and yield its responses as (status, dataset) as they arrive; with
        ``instances``, also the messages of sub-operation instances as InstanceMessage items."""
        lcfg = relayed.listener
        transfer_syntax = UID(str(event.context.transfer_syntax))
        try:
            subject = self._ensure_session(relayed)
        except RelayError as exc:
            yield self._failure_status(service, exc.failure), None
            return
        op_id = relayed.next_op()
        hdr = RequestHeader(
            op_id=op_id,
            service=service,  # type: ignore[arg-type]
            abstract_syntax=str(event.context.abstract_syntax),
            transfer_syntax=str(transfer_syntax),
            command_length=len(command),
            dataset_length=len(identifier),
            inline=True,
            digest=hashlib.sha256(identifier).hexdigest(),
        )
        inbox, replies = self.transport.replies.new_thread_inbox()
        finished = False
        cancel_sent = False
        timeout_s = lcfg.timeouts.request_s
        try:
            self._call(
                self.transport.publish(subject, envelope.encode(hdr, command + identifier), inbox),
                timeout_s,
            )
            deadline = time.monotonic() + timeout_s
            while True:
                if event.is_cancelled and not cancel_sent:
                    cancel_sent = True
                    self._publish_cancel(subject, op_id)
                if self._stopping.is_set():
                    # the agent is stopping: answer the SCU now (the far operation is
                    # cancelled below) rather than hold the shutdown for request_s
                    raise RelayError(statuses.FAR_SIDE_UNAVAILABLE, "listener agent stopping")
                try:
                    msg = replies.get(timeout=0.05)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise RelayError(statuses.FAR_SIDE_TIMEOUT) from None
                    continue
                if far_side_gone(msg):
                    raise RelayError(statuses.FAR_SESSION_GONE, FAR_SIDE_GONE)
                header, body = self._decode_reply(msg)
                if instances and is_instance_message(header, op_id):
                    deadline = time.monotonic() + timeout_s
                    yield InstanceMessage(header, body, msg.reply)
                    continue
                if header is None or getattr(header, "op_id", None) != op_id:
                    continue
                if isinstance(header, ErrorHeader):
                    raise RelayError(FAILURES[header.reason], header.comment)
                if not isinstance(header, ResponseHeader):
                    continue
                deadline = time.monotonic() + timeout_s
                status, dataset = self._decode_response(header, body, transfer_syntax)
                if header.final:
                    finished = True
                if instances:
                    yield status, dataset, header.storage_contexts
                else:
                    yield status, dataset
                if finished:
                    return
        except RelayError as exc:
            LOG.warning(
                "relay failed", extra={**relayed.log_extra, "service": service, "why": str(exc)}
            )
            self._after_failure(relayed, exc.failure)
            yield self._failure_status(service, exc.failure), None
        finally:
            # Without a final response the far operation may still run (we timed out, the
            # SCU went away, pynetdicom stopped asking): cancel it there too.
            if not finished and not cancel_sent:
                # The SCU went away or pynetdicom stopped asking: stop the far operation too.
                self._publish_cancel(subject, op_id)
            self.transport.replies.release(inbox)

    def _decode_response(
        self, header: ResponseHeader, body: memoryview, transfer_syntax: UID
    ) -> tuple[Dataset, Dataset | None]:
        try:
            status = decode_command(body[: header.command_length])
            dataset = None
            if header.dataset_length > 0:
                raw = body[header.command_length : header.command_length + header.dataset_length]
                dataset = decode_dataset(bytes(raw), transfer_syntax)
        except Exception:
            metrics.WIRE_REJECTED.labels(reason="bad_command").inc()
            raise RelayError(statuses.PROTOCOL_ERROR) from None
        if "Status" not in status:
            raise RelayError(statuses.PROTOCOL_ERROR, "response without a status")
        return status, dataset

    def _publish_cancel(self, subject: str, op_id: int) -> None:
        with contextlib.suppress(Exception):
            self.transport.submit(
                self.transport.publish(subject, envelope.encode(CancelHeader(op_id=op_id)))
            )

    def _on_closed(self, event: evt.Event, mode: str) -> None:
        self._close(id(event.assoc), mode)

    def _close(self, key: int, mode: str) -> None:
        with self._lock:
            relayed = self._relayed.pop(key, None)
            if relayed is None:
                return
            relayed.closed = True
            subject = relayed.session_subject
        if not subject:
            return
        metrics.ACTIVE_SESSIONS.labels(role="listener").dec()
        LOG.info("association closed", extra={**relayed.log_extra, "mode": mode})
        self._send_close(subject, mode)

    def _sweep_dead_associations(self) -> None:
        """pynetdicom can lose an association without an event (an exception in its DUL
        thread, e.g. a P-DATA for a context that was never accepted): close those too, so
        the far session and its association with the real SCP do not linger."""
        while not self._stopping.wait(2.0):
            with self._lock:
                dead = [k for k, r in self._relayed.items() if not r.assoc.is_alive()]
            for key in dead:
                self._close(key, "abort")


class RelayAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, except that a connection whose association only needs
    C-ECHO and C-STORE is handed to the direct path (direct_listener.py) before pynetdicom
    reads from it."""

    direct: DirectGroup | None = None

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.direct is not None:
            try:
                if self.direct.divert(request):
                    return
            except Exception:
                LOG.exception("direct path refused a connection; pynetdicom serves it")
            # pynetdicom counts only its own associations against maximum_associations.
            self.ae.maximum_associations = self.direct.pynetdicom_limit()
        super().process_request_thread(request, client_address)
