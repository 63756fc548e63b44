"""Listener associations served on the NATS loop, without pynetdicom, for C-ECHO and C-STORE.

A listener's pynetdicom server accepts every connection. Before pynetdicom reads anything,
``divert`` peeks at the A-ASSOCIATE-RQ (MSG_PEEK, nothing consumed): if the association can
only carry C-ECHO and C-STORE (Verification and storage contexts, no role selection) on a
port without DICOM TLS, the socket goes to :class:`DirectAssociation` on the agent's asyncio
loop, where the NATS client lives; everything else stays with pynetdicom (listener.py).

On the loop there is no thread hand-over per message, no pydicom dataset per command set and
no spool file per instance: a sync C-STORE's dataset goes over NATS as its P-DATA fragments
arrive (inline in the REQUEST when it fits one chunk, else a streamed REQUEST and CHUNKs, with
the usual window of unacknowledged chunks, which also holds the SCU back through TCP when
the far side is slower), and a queued one into the edge queue from memory (or from a spool
file when it is too large for one queue message). Negotiation, statuses, metrics and logs are
those of the pynetdicom path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

from dimse_relay import envelope, metrics, statuses, upper_layer
from dimse_relay.config import ListenerConfig
from dimse_relay.dicom import FALLBACK_TRANSFER_SYNTAXES
from dimse_relay.envelope import (
    ChunkHeader,
    ContextProposal,
    ContextResult,
    OpenResultHeader,
    QueuedHeader,
    RequestHeader,
)
from dimse_relay.queue import QueueFull, new_item_id
from dimse_relay.session import (
    FAILURES,
    RelayError,
    close_session,
    open_session,
    took_no_context,
    valid_reject,
)
from dimse_relay.statuses import RelayFailure
from dimse_relay.streaming import StreamAborted, await_ack, await_final
from dimse_relay.upper_layer import Command, ContextAnswer, ULError

if TYPE_CHECKING:
    from dimse_relay.listener import ListenerServer

LOG = logging.getLogger("dimse_relay.listener")
_PEEK_POLL_S = 0.001
# Largest A-ASSOCIATE-RQ peeked at. A larger one (a proposal of very many contexts and
# syntaxes) may not fit the socket's receive buffer, so it could never be peeked whole.
_MAX_PEEKED_RQ = 48 * 1024


def _peek(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    """The first ``size`` bytes waiting on ``sock`` without consuming them; None if the peer
    closed or they did not all arrive in time."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            data = sock.recv(size, socket.MSG_PEEK)
        except OSError:
            return None
        if not data:
            return None
        if len(data) >= size:
            return data
        time.sleep(_PEEK_POLL_S)  # part of it is there: the rest is on its way


def peek_associate_rq(sock: socket.socket, timeout_s: float) -> Any | None:
    """The A-ASSOCIATE-RQ primitive waiting on ``sock`` (not consumed), or None if what
    waits is not a well-formed A-ASSOCIATE-RQ (pynetdicom then deals with it)."""
    deadline = time.monotonic() + timeout_s
    try:
        head = _peek(sock, 6, deadline)
        if head is None or head[0] != upper_layer.ASSOCIATE_RQ:
            return None
        length = int.from_bytes(head[2:6], "big")
        if length > _MAX_PEEKED_RQ:
            return None  # may not fit the socket's receive buffer: pynetdicom reads it
        whole = _peek(sock, 6 + length, deadline)
        if whole is None or whole[6:8] != b"\x00\x01":
            return None  # pynetdicom rejects other protocol versions
        prim = upper_layer.decode_associate_rq(whole[6:])
        if str(prim.application_context_name) != upper_layer.APPLICATION_CONTEXT:
            return None
        return prim
    except Exception:
        return None
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)


def direct_eligible(prim: Any) -> bool:
    """C-ECHO/C-STORE contexts only, no SCP/SCU role selection, a usable maximum PDU."""
    contexts = prim.presentation_context_definition_list
    if not contexts:
        return False
    if 0 < int(prim.maximum_length_received or 0) < upper_layer.MIN_PEER_PDU:
        return False
    if any(isinstance(i, SCP_SCU_RoleSelectionNegotiation) for i in prim.user_information):
        return False
    return all(upper_layer.is_storage_or_verification(str(cx.abstract_syntax)) for cx in contexts)


def proposals_of(prim: Any) -> list[ContextProposal]:
    return [
        ContextProposal(
            id=int(cx.context_id),
            abstract_syntax=str(cx.abstract_syntax),
            transfer_syntaxes=[str(ts) for ts in cx.transfer_syntax],
        )
        for cx in prim.presentation_context_definition_list
    ]


def failure_elements(service: str, failure: RelayFailure) -> dict[int, bytes]:
    return {
        upper_layer.TAG_STATUS: upper_layer.us(failure.status_for(service)),
        0x00000902: upper_layer.error_comment(failure.comment),
    }


def success_elements() -> dict[int, bytes]:
    return {upper_layer.TAG_STATUS: upper_layer.us(statuses.SUCCESS)}


class _Closed(Exception):
    """The SCU's association ended; how is in ``mode`` (release or abort)."""

    def __init__(self, mode: str):
        super().__init__(mode)
        self.mode = mode


class DirectAssociation:
    """One SCU's association, from its A-ASSOCIATE-RQ to its end, on the NATS loop."""

    def __init__(
        self,
        server: ListenerServer,
        lcfg: ListenerConfig,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ):
        self.server = server
        self.lcfg = lcfg
        self.reader = reader
        self.writer = writer
        self.transport = server.transport
        self.assoc_id = uuid.uuid4().hex[:16]
        self.log_extra: dict[str, Any] = {"assoc_id": self.assoc_id, "listener": lcfg.ae_title}
        self.calling = ""
        self.proposals: list[ContextProposal] = []
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted id -> (abstract, transfer)
        self.peer_max_pdu = 0
        self.session_subject: str | None = None
        self.op_counter = 0
        self._pdvs: Any = None

    # -- association ----------------------------------------------------------------------
    async def run(self) -> None:
        mode = "abort"
        try:
            async with asyncio.timeout(self.lcfg.timeouts.acse_s):
                pdu_type, body = await upper_layer.read_pdu(
                    self.reader, upper_layer.MAX_ASSOCIATION_PDU
                )
            if pdu_type != upper_layer.ASSOCIATE_RQ:
                raise ULError("bad_pdu", "first PDU is not an A-ASSOCIATE-RQ")
            if not await self._negotiate(upper_layer.decode_associate_rq(body)):
                return
            await self._serve()
        except _Closed as closed:
            mode = closed.mode
        except (ULError, OSError, TimeoutError) as exc:
            LOG.info(
                "association ended",
                extra={**self.log_extra, "why": getattr(exc, "reason", type(exc).__name__)},
            )
            with contextlib.suppress(Exception):
                self.writer.write(upper_layer.abort_pdu(2, 0))
        except Exception as exc:  # a bug: end this association, keep serving the others
            LOG.error(
                "direct association failed",
                extra={**self.log_extra, "error": type(exc).__name__},
                exc_info=exc,
            )
            with contextlib.suppress(Exception):
                self.writer.write(upper_layer.abort_pdu(2, 0))
        finally:
            with contextlib.suppress(Exception):
                self.writer.close()
            self._end_session(mode)

    def _reject(self, result: int, source: int, reason: int) -> bool:
        self.writer.write(upper_layer.associate_rj_pdu(result, source, reason))
        return False

    async def _negotiate(self, prim: Any) -> bool:
        lcfg = self.lcfg
        self.calling = str(prim.calling_ae_title).strip()
        self.peer_max_pdu = int(prim.maximum_length_received or 0)
        if lcfg.allowed_calling_aets and self.calling not in lcfg.allowed_calling_aets:
            LOG.info("association rejected: calling AE title not allowed", extra=self.log_extra)
            metrics.ASSOCIATIONS.labels(role="listener", result="rejected_calling_aet").inc()
            return self._reject(0x01, 0x01, 0x03)
        self.proposals = proposals_of(prim)
        try:
            result: OpenResultHeader | None = await self._open_far()
        except RelayError as exc:
            result = None
            why = exc.failure.reason
        else:
            why = ""
        if result is not None and result.result == "rejected":
            metrics.ASSOCIATIONS.labels(role="listener", result="rejected_by_target").inc()
            LOG.info("association rejected by the target", extra=self.log_extra)
            return self._reject(*valid_reject(result))
        no_contexts = result is not None and took_no_context(result)
        accepted: list[ContextResult] | None = None
        if no_contexts:
            accepted = []
        elif result is not None and result.result == "accepted":
            self.session_subject = result.session_subject
            metrics.ACTIVE_SESSIONS.labels(role="listener").inc()
            accepted = list(result.accepted)
        if lcfg.mode == "queued":
            accepted = self._queued_contexts(accepted, result)
        if accepted is None:
            LOG.warning(
                "far side unavailable at association time; accepting locally",
                extra={**self.log_extra, "why": why or "target_unreachable"},
            )
            metrics.ASSOCIATIONS.labels(role="listener", result="accepted_fallback").inc()
            answers = self._fallback_answers()
        else:
            if lcfg.mode != "queued":
                if no_contexts:
                    LOG.info("target accepted no presentation context", extra=self.log_extra)
                    metrics.ASSOCIATIONS.labels(role="listener", result="no_contexts").inc()
                else:
                    metrics.ASSOCIATIONS.labels(role="listener", result="accepted").inc()
                    LOG.info(
                        "association relayed", extra={**self.log_extra, "contexts": len(accepted)}
                    )
            answers = self._answers(accepted)
        for answer in answers:
            if answer.result == 0:
                prop = next(p for p in self.proposals if p.id == answer.context_id)
                self.contexts[answer.context_id] = (prop.abstract_syntax, answer.transfer_syntax)
        self.writer.write(
            upper_layer.associate_ac_pdu(
                str(prim.calling_ae_title),
                str(prim.called_ae_title),
                answers,
                lcfg.max_pdu,
                upper_layer.DEFAULT_IMPLEMENTATION_UID,
            )
        )
        metrics.DIRECT_ASSOCIATIONS.labels(role="listener").inc()
        return True

    def _queued_contexts(
        self, accepted: list[ContextResult] | None, result: OpenResultHeader | None
    ) -> list[ContextResult] | None:
        """Queued mode: what the target accepted, remembered for outages (listener.py's
        _negotiate_queued, the same cache). The far session is not needed afterwards: C-ECHO
        is answered here and C-STORE goes to the edge queue."""
        accepted, source = self.server.remembered_negotiation(
            self.lcfg, self.calling, self.proposals, accepted
        )
        self._end_session("release")
        metrics.ASSOCIATIONS.labels(
            role="listener", result="no_contexts" if accepted == [] else "accepted_queued"
        ).inc()
        LOG.info(
            "association accepted for the edge queue",
            extra={**self.log_extra, "negotiated": source},
        )
        if accepted is None:
            return self._fallback_results()
        return accepted

    def _answers(self, accepted: list[ContextResult]) -> list[ContextAnswer]:
        """Exactly the contexts the real target accepted; the others rejected as pynetdicom
        rejects what it does not support (3: abstract syntax, 4: transfer syntax)."""
        by_id = {r.id: r for r in accepted}
        abstracts = {r.abstract_syntax for r in accepted}
        answers = []
        for prop in self.proposals:
            res = by_id.get(prop.id)
            if res is not None and res.transfer_syntax in prop.transfer_syntaxes:
                answers.append(ContextAnswer(prop.id, 0, res.transfer_syntax))
            else:
                reason = 4 if prop.abstract_syntax in abstracts else 3
                answers.append(ContextAnswer(prop.id, reason, prop.transfer_syntaxes[0]))
        return answers

    def _fallback_results(self) -> list[ContextResult]:
        """The local fallback contexts: per proposed context the first of the fallback
        transfer syntaxes the SCU proposed (dicom.FALLBACK_TRANSFER_SYNTAXES)."""
        out = []
        for prop in self.proposals:
            ts = next((t for t in FALLBACK_TRANSFER_SYNTAXES if t in prop.transfer_syntaxes), None)
            if ts is not None:
                out.append(
                    ContextResult(
                        id=prop.id, abstract_syntax=prop.abstract_syntax, transfer_syntax=ts
                    )
                )
        return out

    def _fallback_answers(self) -> list[ContextAnswer]:
        return self._answers(self._fallback_results())

    async def _open_far(self) -> OpenResultHeader:
        timeout_s = self.lcfg.timeouts.open_s
        try:
            async with asyncio.timeout(timeout_s + 1.0):
                return await open_session(
                    self.transport,
                    self.server.nats_cfg.subject_prefix,
                    assoc_id=self.assoc_id,
                    calling_ae_title=self.calling,
                    far_ae_title=self.lcfg.far_ae_title,
                    proposals=self.proposals,
                    timeout_s=timeout_s,
                )
        except RelayError:
            raise
        except TimeoutError:
            raise RelayError(statuses.FAR_SIDE_TIMEOUT) from None
        except Exception as exc:  # NATS not connected, ...
            raise RelayError(statuses.FAR_SIDE_UNAVAILABLE, type(exc).__name__) from None

    async def _ensure_session(self) -> str:
        """The far session; after a fallback accept (or a lost session) try once more."""
        if self.session_subject:
            return self.session_subject
        result = await self._open_far()
        if result.result != "accepted" or not result.session_subject:
            raise RelayError(
                statuses.TARGET_UNREACHABLE
                if result.result == "failed"
                else statuses.FAR_SIDE_UNAVAILABLE
            )
        self.session_subject = result.session_subject
        metrics.ACTIVE_SESSIONS.labels(role="listener").inc()
        return self.session_subject

    def _end_session(self, mode: str) -> None:
        subject, self.session_subject = self.session_subject, None
        if subject:
            metrics.ACTIVE_SESSIONS.labels(role="listener").dec()
            LOG.info("association closed", extra={**self.log_extra, "mode": mode})
            self.server.track_direct(close_session(self.transport, subject, mode))

    # -- messages -------------------------------------------------------------------------
    async def _read(self) -> tuple[int, bytes]:
        async with asyncio.timeout(self.lcfg.timeouts.network_s):
            return await upper_layer.read_pdu(self.reader, _max_received_pdu(self.lcfg.max_pdu))

    async def _pdv_stream(self) -> Any:
        """Every presentation data value the SCU sends, in order, across PDUs. A release or
        abort ends the association (_Closed); any other PDU is a protocol error."""
        while True:
            pdu_type, body = await self._read()
            if pdu_type == upper_layer.P_DATA_TF:
                for pdv in upper_layer.parse_pdata(body):
                    yield pdv
            elif pdu_type == upper_layer.RELEASE_RQ:
                self.writer.write(upper_layer.RELEASE_RP_PDU)
                raise _Closed("release")
            elif pdu_type == upper_layer.ABORT:
                raise _Closed("abort")
            else:
                raise ULError("unexpected_pdu", f"PDU type {pdu_type}")

    async def _serve(self) -> None:
        self._pdvs = self._pdv_stream()
        command = bytearray()
        while True:
            pdv = await anext(self._pdvs)
            if not pdv.command:
                raise ULError("unexpected_pdu", "data set without a request")
            self._context(pdv.context_id)
            command += pdv.data
            if pdv.last:
                raw, command = bytes(command), bytearray()
                await self._on_command(pdv.context_id, upper_layer.parse_command(raw))

    def _context(self, context_id: int) -> tuple[str, str]:
        context = self.contexts.get(context_id)
        if context is None:
            raise ULError("unexpected_pdu", "P-DATA for a context that was not accepted")
        return context

    async def _on_command(self, context_id: int, command: Command) -> None:
        field = command.command_field
        if field == upper_layer.C_ECHO_RQ:
            elements = await self._echo(context_id, command)
        elif field == upper_layer.C_STORE_RQ and command.has_data_set:
            elements = await self._store(context_id, command)
        elif field == upper_layer.C_CANCEL_RQ:
            return
        else:
            raise ULError("unexpected_pdu", "request other than C-ECHO or C-STORE")
        self._respond(context_id, command, elements)

    def _respond(self, context_id: int, command: Command, elements: dict[int, bytes]) -> None:
        self.writer.writelines(
            upper_layer.pdata_fragments(
                context_id,
                upper_layer.response(command, elements),
                True,
                True,
                self.peer_max_pdu,
            )
        )

    def _next_op(self) -> int:
        self.op_counter += 1
        return self.op_counter

    async def _relayed(
        self, service: str, run: Any, stream: DatasetStream | None = None
    ) -> dict[int, bytes]:
        """Run one relayed request: its status elements, or the relay's failure status
        (never an abort, never Success without the target's own)."""
        started = time.monotonic()
        try:
            if stream is not None and stream.failure is not None:
                raise stream.failure  # already failed on the way: no second OPEN
            subject = stream.subject if stream and stream.subject else await self._ensure_session()
            elements: dict[int, bytes] = await run(subject)
        except RelayError as exc:
            LOG.warning(
                "relay failed", extra={**self.log_extra, "service": service, "why": str(exc)}
            )
            elements = failure_elements(service, exc.failure)
            streamed = stream is not None and stream.request is not None
            if self.session_subject and (
                streamed
                or exc.failure is statuses.FAR_SIDE_TIMEOUT
                or exc.failure.reason in ("protocol", "unavailable")
            ):
                # The far session may be gone (its agent died) or hold half an upload: the
                # next request opens a new one rather than waiting out the timeout again.
                LOG.warning(
                    "far session lost; the next request opens a new one", extra=self.log_extra
                )
                self._end_session("abort")
        except Exception as exc:  # a bug: a failure status, never a false Success or an abort
            LOG.error(
                "relay error",
                extra={**self.log_extra, "service": service, "error": type(exc).__name__},
            )
            elements = failure_elements(service, statuses.PROTOCOL_ERROR)
            self._end_session("abort")
        status = upper_layer.status_of(elements)
        metrics.LATENCY.labels(service=service).observe(time.monotonic() - started)
        metrics.REQUESTS.labels(
            role="listener",
            service=service,
            status=metrics.status_class(status) if status is not None else "none",
        ).inc()
        return elements

    async def _echo(self, context_id: int, command: Command) -> dict[int, bytes]:
        if self.lcfg.mode == "queued":
            ok = self.server.queue is not None and self.server.queue.ready
            ok = ok and self.transport.connected
            status = statuses.SUCCESS if ok else statuses.PROCESSING_FAILURE
            metrics.REQUESTS.labels(
                role="listener", service="C-ECHO", status=metrics.status_class(status)
            ).inc()
            return {upper_layer.TAG_STATUS: upper_layer.us(status)}
        abstract, transfer = self._context(context_id)

        async def run(subject: str) -> dict[int, bytes]:
            hdr = RequestHeader(
                op_id=self._next_op(),
                service="C-ECHO",
                abstract_syntax=abstract,
                transfer_syntax=transfer,
                command_length=len(command.raw),
                dataset_length=-1,
            )
            return await self._request(subject, hdr, command.raw)

        return await self._relayed("C-ECHO", run)

    async def _request(self, subject: str, hdr: RequestHeader, body: bytes) -> dict[int, bytes]:
        inbox, replies = self.transport.replies.new_inbox()
        try:
            await self._publish(subject, envelope.encode(hdr, body), inbox)
            return await _await_status(replies, hdr.op_id, self.lcfg.timeouts.request_s)
        finally:
            self.transport.replies.release(inbox)

    async def _publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        try:
            await self.transport.publish(subject, payload, reply=reply)
        except Exception as exc:
            raise RelayError(statuses.FAR_SIDE_UNAVAILABLE, type(exc).__name__) from None

    # -- C-STORE --------------------------------------------------------------------------
    async def _fragments(self, context_id: int) -> Any:
        """The data set fragments of the request just read, as they arrive: yields
        (bytes, last)."""
        while True:
            pdv = await anext(self._pdvs)
            if pdv.command or pdv.context_id != context_id:
                raise ULError("unexpected_pdu", "data set fragment out of place")
            yield pdv.data, pdv.last
            if pdv.last:
                return

    async def _store(self, context_id: int, command: Command) -> dict[int, bytes]:
        if self.lcfg.mode == "queued":
            return await self._queue_store(context_id, command)
        abstract, transfer = self._context(context_id)
        stream = DatasetStream(self, command, abstract, transfer)
        try:
            async for data, last in self._fragments(context_id):
                await stream.feed(data, last)
        except BaseException:
            stream.abandon()
            raise
        return await self._relayed("C-STORE", stream.finish, stream)

    async def _queue_store(self, context_id: int, command: Command) -> dict[int, bytes]:
        """Queued mode: Success once the instance is durably in the edge queue. Whatever
        fails on the way (NATS down, disk full), the rest of the data set is still read, so
        the SCU gets the failure status as the answer to its complete request."""
        abstract, transfer = self._context(context_id)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        memory = bytearray()
        spool: Any = None
        path: Path | None = None
        digest = hashlib.sha256()
        length = 0
        failed: dict[int, bytes] | None = None
        try:
            try:
                queue = self.server.queue
                limit = queue.inline_limit() if queue is not None else 0
            except Exception:  # NATS not connected: the server's max_payload is unknown
                limit = 0
                metrics.QUEUE_REFUSED.labels(reason="unavailable").inc()
                failed = failure_elements("C-STORE", statuses.QUEUE_UNAVAILABLE)
            async for data, _last in self._fragments(context_id):
                if failed is not None:
                    continue
                digest.update(data)
                length += len(data)
                try:
                    if spool is None and length <= limit:
                        memory += data
                        continue
                    if spool is None:
                        fd, name = tempfile.mkstemp(
                            prefix="queued-", suffix=".raw", dir=self.server.incoming_dir
                        )
                        path = Path(name)
                        spool = os.fdopen(fd, "wb")
                        await loop.run_in_executor(None, spool.write, bytes(memory))
                        memory = bytearray()
                    await loop.run_in_executor(None, spool.write, bytes(data))
                except OSError:
                    metrics.QUEUE_REFUSED.labels(reason="unavailable").inc()
                    failed = failure_elements("C-STORE", statuses.QUEUE_UNAVAILABLE)
            if spool is not None and failed is None:
                try:
                    await loop.run_in_executor(None, spool.close)
                except OSError:
                    failed = failure_elements("C-STORE", statuses.QUEUE_UNAVAILABLE)
            if failed is not None:
                LOG.warning("edge queue unavailable; C-STORE refused", extra=self.log_extra)
                elements = failed
            else:
                source = bytes(memory) if path is None else path
                elements = await self._enqueue(
                    command, abstract, transfer, source, length, digest.hexdigest()
                )
        finally:
            if spool is not None:
                with contextlib.suppress(OSError):
                    spool.close()
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
        metrics.LATENCY.labels(service="C-STORE").observe(time.monotonic() - started)
        status = upper_layer.status_of(elements) or 0
        metrics.REQUESTS.labels(
            role="listener", service="C-STORE", status=metrics.status_class(status)
        ).inc()
        return elements

    async def _enqueue(
        self,
        command: Command,
        abstract: str,
        transfer: str,
        source: bytes | Path,
        length: int,
        digest: str,
    ) -> dict[int, bytes]:
        queue = self.server.queue
        try:
            if queue is None:
                raise RuntimeError("no edge queue")
            raw = upper_layer.encode_elements(command.elements)
            header = QueuedHeader(
                item_id=new_item_id(),
                listener_ae_title=self.lcfg.ae_title,
                calling_ae_title=self.calling,
                called_ae_title=self.lcfg.far_ae_title,
                abstract_syntax=abstract,
                transfer_syntax=transfer,
                sop_instance_uid=command.text(upper_layer.TAG_AFFECTED_SOP_INSTANCE) or "",
                command_length=len(raw),
                dataset_length=length,
                digest=digest,
                queued_at=time.time(),
            )
            qcfg = self.server.agent_cfg.queue
            budget = qcfg.write_timeout_s * (2 + length // qcfg.object_chunk_bytes)
            async with asyncio.timeout(budget):
                await queue.enqueue(header, raw, source, 0)
            return success_elements()
        except QueueFull:
            metrics.QUEUE_REFUSED.labels(reason="full").inc()
            LOG.warning("edge queue full; C-STORE refused", extra=self.log_extra)
            return failure_elements("C-STORE", statuses.QUEUE_FULL)
        except Exception as exc:  # JetStream down, timeout, NATS not connected
            metrics.QUEUE_REFUSED.labels(reason="unavailable").inc()
            LOG.warning(
                "edge queue unavailable; C-STORE refused",
                extra={**self.log_extra, "error": type(exc).__name__},
            )
            return failure_elements("C-STORE", statuses.QUEUE_UNAVAILABLE)


class DatasetStream:
    """A sync C-STORE's data set on its way over NATS while the SCU is still sending it.

    Up to one chunk is gathered first: if the data set ends within it, it goes inline in the
    REQUEST (as the pynetdicom path sends it). Otherwise a streamed REQUEST goes out, then each
    full chunk as soon as it is there (at most ``nats.window_chunks`` unacknowledged), and the
    rest as the final CHUNK with the total length and the SHA-256 of the whole data set. A
    failure on the way (far side gone, ERROR, no ACK) is remembered: the SCU's remaining
    fragments are read and dropped, and the SCU then gets the relay's failure status."""

    def __init__(self, assoc: DirectAssociation, command: Command, abstract: str, transfer: str):
        self.assoc = assoc
        self.command = command
        self.abstract = abstract
        self.transfer = transfer
        self.transport = assoc.transport
        self.chunk_size = assoc.transport.chunk_size
        self.window = assoc.server.nats_cfg.window_chunks
        self.pieces: list[memoryview] = []  # before the first chunk: all that came so far
        self.pending = 0
        # The newest piece, sent when the next one (or the end) is there: the final CHUNK is
        # never empty. Small pieces are gathered into one bytearray up to the chunk size.
        self.held: memoryview | bytearray | None = None
        self.digest = hashlib.sha256()
        self.length = 0
        self.failure: RelayError | None = None
        self.request: RequestHeader | None = None
        self.subject = ""
        self.inbox = ""
        self.replies: asyncio.Queue[Any] | None = None
        self.seq = 0
        self.sent = 0
        self.in_flight = 0
        self.disconnects = 0  # the transport's disconnects when the stream began

    async def feed(self, data: memoryview, last: bool) -> None:
        self.digest.update(data)
        self.length += len(data)
        if self.failure is not None:
            return
        try:
            if self.request is None:
                self.pieces.append(data)
                self.pending += len(data)
                if self.pending <= self.chunk_size:
                    return  # may still end within one chunk: inline (finish)
                await self._begin()
                pieces, self.pieces = self.pieces, []
                for piece in pieces:
                    await self._put(piece)
            else:
                await self._put(data)
            if last and self.held is not None:
                held, self.held = self.held, None
                await self._chunk(held, final=True)
        except RelayError as exc:
            self.failure = exc
            self.pieces, self.held = [], None

    async def _put(self, data: memoryview) -> None:
        """Queue ``data`` for sending in pieces of at most one chunk, without copying what
        comes in large fragments (an SCU sending 1 MiB PDUs)."""
        size = self.chunk_size
        for pos in range(0, len(data), size):
            piece = data[pos : pos + size]
            held = self.held
            if held is not None and len(held) + len(piece) <= size:
                if not isinstance(held, bytearray):
                    held = self.held = bytearray(held)
                held += piece
                continue
            if held is not None:
                await self._chunk(held, final=False)
            self.held = piece

    def _header(self, **update: Any) -> RequestHeader:
        return RequestHeader(
            op_id=self.assoc._next_op(),
            service="C-STORE",
            abstract_syntax=self.abstract,
            transfer_syntax=self.transfer,
            command_length=len(self.command.raw),
            **update,
        )

    async def _begin(self) -> None:
        self.disconnects = self.transport.disconnects
        self.subject = await self.assoc._ensure_session()
        self.inbox, self.replies = self.transport.replies.new_inbox()
        self.request = self._header(dataset_length=0, inline=False, streamed=True)
        await self.assoc._publish(
            self.subject, envelope.encode(self.request, self.command.raw), self.inbox
        )

    async def _chunk(self, data: memoryview | bytearray, final: bool) -> None:
        assert self.request is not None and self.replies is not None
        while self.in_flight >= self.window and not final:
            await self._ack()
        chunk = ChunkHeader(
            op_id=self.request.op_id,
            seq=self.seq,
            offset=self.sent,
            final=final,
            digest=self.digest.hexdigest() if final else None,
            dataset_length=self.length if final else None,
        )
        await self.assoc._publish(self.subject, envelope.encode(chunk, data), self.inbox)
        metrics.BYTES.labels(direction="sent").inc(len(data))
        self.seq += 1
        self.sent += len(data)
        if not final:
            self.in_flight += 1

    async def _ack(self) -> None:
        assert self.request is not None and self.replies is not None
        try:
            await await_ack(self.replies, self.request.op_id, self.assoc.lcfg.timeouts.chunk_ack_s)
        except StreamAborted as exc:
            raise self._failure(exc.reason, exc.comment) from None
        self.in_flight -= 1

    def _failure(self, reason: str, comment: str) -> RelayError:
        """A gap the far side found in a stream that crossed a drop of this agent's NATS
        connection is a lost message (retry later, 0xA700), not a protocol error."""
        if (
            reason == "protocol"
            and comment.endswith("out_of_order")
            and self.transport.disconnects != self.disconnects
        ):
            return RelayError(statuses.FAR_SIDE_UNAVAILABLE, comment)
        return RelayError(FAILURES[reason], comment)

    async def finish(self, subject: str) -> dict[int, bytes]:
        """(after the last fragment) the far target's status for this C-STORE."""
        try:
            if self.failure is not None:
                raise self.failure
            if self.request is None:  # it all fits one chunk: inline, as the pynetdicom path
                data = b"".join(self.pieces)
                hdr = self._header(
                    dataset_length=len(data),
                    inline=True,
                    digest=self.digest.hexdigest(),
                )
                metrics.BYTES.labels(direction="sent").inc(len(data))
                return await self.assoc._request(subject, hdr, self.command.raw + data)
            assert self.replies is not None
            try:
                return await _await_status(
                    self.replies, self.request.op_id, self.assoc.lcfg.timeouts.request_s
                )
            except RelayError as exc:
                if exc.failure is statuses.PROTOCOL_ERROR:
                    raise self._failure("protocol", str(exc)) from None
                raise
        finally:
            self.abandon()

    def abandon(self) -> None:
        if self.inbox:
            self.transport.replies.release(self.inbox)
            self.inbox = ""


async def _await_status(
    replies: asyncio.Queue[Any], op_id: int, timeout_s: float
) -> dict[int, bytes]:
    """The status elements of the final RESPONSE to ``op_id``; an ERROR or silence raises."""
    try:
        header, body = await await_final(replies, op_id, timeout_s)
    except StreamAborted as exc:
        raise RelayError(FAILURES[exc.reason], exc.comment) from None
    try:
        elements = upper_layer.parse_elements(bytes(body[: header.command_length]))
    except ULError:
        elements = {}
    status = {
        tag: elements[tag]
        for tag in (upper_layer.TAG_STATUS, *upper_layer.STATUS_DETAIL_TAGS)
        if tag in elements
    }
    if upper_layer.status_of(status) is None:
        metrics.WIRE_REJECTED.labels(reason="bad_command").inc()
        raise RelayError(statuses.PROTOCOL_ERROR, "response without a status")
    return status


def _max_received_pdu(local_max: int) -> int:
    """As the pynetdicom path: a PDU may announce up to the local maximum, and at least 4 MiB."""
    return max(local_max, 4 * 1024 * 1024)


class DirectGroup:
    """The listeners of one (bind, port) and the direct associations they have open."""

    def __init__(self, server: ListenerServer, by_aet: dict[str, ListenerConfig], limit: int):
        self.server = server
        self.by_aet = by_aet
        self.limit = limit
        self.active = 0
        self.pynetdicom_server: Any = None  # the port's pynetdicom server, for its count

    def pynetdicom_active(self) -> int:
        server = self.pynetdicom_server
        return len(server.active_associations) if server is not None else 0

    def pynetdicom_limit(self) -> int:
        """What pynetdicom may still accept on this port: max_associations counts the direct
        associations too."""
        return max(0, self.limit - self.active)

    def divert(self, sock: socket.socket) -> bool:
        """(pynetdicom's connection thread) Take the connection if its association can go
        the direct way; False leaves it to pynetdicom, with nothing read from it."""
        first = next(iter(self.by_aet.values()))
        prim = peek_associate_rq(sock, first.timeouts.acse_s)
        if prim is None or not direct_eligible(prim):
            return False
        lcfg = self.by_aet.get(str(prim.called_ae_title).strip())
        if lcfg is None:
            return False  # pynetdicom rejects it as for any unknown called AE title
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = self.server.transport
        future = asyncio.run_coroutine_threadsafe(self._serve(sock, lcfg), transport.loop)
        future.add_done_callback(_consume)
        return True

    async def _serve(self, sock: socket.socket, lcfg: ListenerConfig) -> None:
        try:
            reader, writer = await asyncio.open_connection(
                sock=sock, limit=upper_layer.MAX_SEND_PDU
            )
        except OSError:
            with contextlib.suppress(OSError):
                sock.close()
            return
        if self.active + self.pynetdicom_active() >= self.limit:
            # pynetdicom's own answer when maximum_associations is reached (after reading the
            # request: closing with it unread would reset the connection instead).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await upper_layer.read_pdu(reader, upper_layer.MAX_ASSOCIATION_PDU)
            writer.write(upper_layer.associate_rj_pdu(0x02, 0x03, 0x02))
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        self.active += 1
        try:
            await DirectAssociation(self.server, lcfg, reader, writer).run()
        finally:
            self.active -= 1


def _consume(future: Any) -> None:
    if not future.cancelled():
        exc = future.exception()
        if exc is not None:
            LOG.error("direct association failed", exc_info=exc)
