"""Targets: NATS subscribers that forward relayed associations to a real local SCP.

For each target AE title the agent joins the queue group on ``<prefix>.v1.aet.<T>.open``, so
replicas share associations and exactly one of them handles each. An OPEN makes this agent
associate with the real SCP (same calling AE title, same proposed contexts) and answer with
what the SCP accepted plus a session subject that only this agent subscribes to. Every DIMSE
request of that association then arrives on the session subject.

pynetdicom calls block, so each session owns one worker thread; NATS handling stays on the
asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from nats.aio.msg import Msg
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    build_context,
    build_role,
    evt,
)
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dimse_relay import (
    command_set,
    direct_target,
    envelope,
    metrics,
    sinks,
    statuses,
    subjects,
    upper_layer,
)
from dimse_relay.config import AgentConfig, TargetConfig
from dimse_relay.dicom import (
    SOCKET_HANDLERS,
    dataset_offset,
    decode_command,
    decode_dataset,
    encode_command,
    encode_dataset,
    request_command,
    requested_contexts,
    send_c_store_bytes,
)
from dimse_relay.envelope import (
    AckHeader,
    CancelHeader,
    ChunkHeader,
    CloseHeader,
    ContextResult,
    EnvelopeError,
    ErrorHeader,
    OpenHeader,
    OpenResultHeader,
    RequestHeader,
    ResponseHeader,
)
from dimse_relay.move_contexts import moved_sop_classes, storage_contexts
from dimse_relay.retrieve import failed_list_with
from dimse_relay.streaming import SpooledDataset, await_response, send_dataset
from dimse_relay.transport import NatsTransport
from dimse_relay.upper_layer import ULError

LOG = logging.getLogger("dimse_relay.target")
# An upload without a chunk for this long has its listener probed (is its agent still there?).
UPLOAD_PROBE_AFTER_S = 5.0


def _log_failure(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        LOG.error("target task failed", exc_info=exc)


# Query/Retrieve C-MOVE models and the C-GET model a target uses to retrieve for them.
_GET_FOR_MOVE = {
    "1.2.840.10008.5.1.4.1.2.1.2": "1.2.840.10008.5.1.4.1.2.1.3",  # Patient Root
    "1.2.840.10008.5.1.4.1.2.2.2": "1.2.840.10008.5.1.4.1.2.2.3",  # Study Root
    "1.2.840.10008.5.1.4.1.2.3.2": "1.2.840.10008.5.1.4.1.2.3.3",  # Patient/Study Only
}


# Sub-operation instances of one retrieve whose listener-side answer may still be outstanding
# when the SCP gets its C-STORE response: the SCP's next instance overlaps the NATS round trip.
RETRIEVE_WINDOW = 32


@dataclass
class _Retrieve:
    """A C-GET (or the C-GET of a relayed C-MOVE) whose sub-operations arrive now."""

    op_id: int
    reply: str  # the listener's inbox for this retrieve
    # (SOP Instance UID, the listener's answer) of instances sent but not yet answered
    outstanding: deque[tuple[str, Future[Dataset]]] = field(default_factory=deque)
    # SOP Instance UIDs the SCP was told were stored but the listener did not store
    lost: list[str] = field(default_factory=list)
    # Storage contexts of a C-MOVE's C-GET association, sent once with the first response
    storage_contexts: list[ContextResult] | None = None

    def settle(self, keep: int, timeout_s: float) -> None:
        """Wait until at most ``keep`` answers are outstanding; remember the lost instances."""
        while self.outstanding and (len(self.outstanding) > keep or self.outstanding[0][1].done()):
            uid, answer = self.outstanding.popleft()
            try:
                status = answer.result(timeout_s)
            except Exception:
                answer.cancel()
                self.lost.append(uid)
                continue
            if metrics.status_class(int(status.Status)) == "failure":
                self.lost.append(uid)


def reconciled(
    status: Dataset, identifier: Dataset | None, lost: list[str]
) -> tuple[Dataset, Dataset | None]:
    """The SCP's final C-GET response corrected for instances it was told were stored but the
    listener's agent never stored: counted as failed instead of completed (where the SCP gave
    the counts) and named in the Failed SOP Instance UID List. A Success becomes Warning
    0xB000, or Failure 0xA702 when no sub-operation is left completed or with a warning."""
    if not lost:
        return status, identifier
    fixed = copy.deepcopy(status)
    completed = status.get("NumberOfCompletedSuboperations")
    if completed is not None:
        completed = max(0, int(completed) - len(lost))
        fixed.NumberOfCompletedSuboperations = completed
        fixed.NumberOfFailedSuboperations = int(
            status.get("NumberOfFailedSuboperations", 0) or 0
        ) + len(lost)
    if int(status.Status) in (statuses.SUCCESS, statuses.RETRIEVE_SUBOPERATIONS_FAILED):
        warned = int(status.get("NumberOfWarningSuboperations", 0) or 0)
        nothing_done = completed == 0 and warned == 0
        fixed.Status = (
            statuses.RETRIEVE_OUT_OF_RESOURCES
            if nothing_done
            else statuses.RETRIEVE_SUBOPERATIONS_FAILED
        )
    return fixed, failed_list_with(identifier, lost)


class TargetSession:
    """One relayed association: the real association to the SCP plus in-flight uploads."""

    def __init__(self, server: TargetServer, cfg: TargetConfig, open_hdr: OpenHeader):
        self.server = server
        self.cfg = cfg
        self.open_hdr = open_hdr
        self.session_id = uuid.uuid4().hex
        self.subject = subjects.session_subject(
            server.agent_cfg.nats.subject_prefix, cfg.ae_title, self.session_id
        )
        self.reply_inbox = open_hdr.reply_inbox
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-session")
        self.assoc: Any = None
        self.uploads: dict[int, SpooledDataset] = {}
        self.busy = 0  # DIMSE operations running against the SCP right now
        # op id -> the listener's reply inbox, of requests whose answer is still to be sent
        self.answering: dict[int, str] = {}
        # op_id -> (Message ID, SOP class) of streamed operations that may be cancelled
        self.running: dict[int, tuple[int, str]] = {}
        self.retrieve: _Retrieve | None = None  # the C-GET whose sub-operations arrive now
        self.retrieve_assoc: Any = None  # the second association of a relayed C-MOVE
        self.sub_counter = 0
        self.last_activity = time.monotonic()
        self.sub: Any = None
        self.closed = False
        self.log_extra = {"assoc_id": open_hdr.assoc_id, "target": cfg.ae_title}
        # kind filesystem/dicomweb: this agent is the SCP and the sink stores the instances.
        self.sink: sinks.Sink | None = server.sinks.get(cfg.ae_title)
        self.upload_disconnects = 0  # the transport's disconnects when the upload began
        # The direct path (C-ECHO/C-STORE-only associations, direct_target.py) or None.
        self.direct: direct_target.ScpAssociation | None = None
        if self.sink is None and server.agent_cfg.direct_dimse and direct_target.eligible(open_hdr):
            self.direct = direct_target.ScpAssociation(cfg, open_hdr)

    # -- sink targets: the agent answers the association itself ---------------------------
    def _accept_locally(self) -> OpenResultHeader:
        """A sink stores any transfer syntax bit-exact, so each storage context is accepted
        with the SCU's first proposed transfer syntax (its preference, never converted),
        Verification too; every other context (query/retrieve, ...) is rejected."""
        accepted = []
        for prop in self.open_hdr.contexts:
            uid = prop.abstract_syntax
            storage = uid.startswith("1.2.840.10008.5.1.4.1.1.") or (
                uid_to_service_class(uid) is StorageServiceClass
            )
            if storage or uid == sinks.VERIFICATION:
                accepted.append(
                    ContextResult(
                        id=prop.id, abstract_syntax=uid, transfer_syntax=prop.transfer_syntaxes[0]
                    )
                )
        metrics.ASSOCIATIONS.labels(role="target", result="accepted").inc()
        return OpenResultHeader(
            assoc_id=self.open_hdr.assoc_id,
            result="accepted",
            session_subject=self.subject,
            accepted=accepted,
        )

    def _sink_echo(self) -> Dataset:
        assert self.sink is not None
        why = self.sink.check()
        if why is not None:
            LOG.warning("sink not healthy", extra={**self.log_extra, "why": why})
            return sinks.status(sinks.PROCESSING_FAILURE, f"dimse-relay: sink {why}")
        return sinks.status(sinks.SUCCESS)

    def _sink_store(self, up: SpooledDataset) -> Dataset:
        assert self.sink is not None
        instance = sinks.Instance(
            path=up.path,
            sop_class_uid=str(up.command.AffectedSOPClassUID),
            sop_instance_uid=str(up.command.AffectedSOPInstanceUID),
            transfer_syntax=up.request.transfer_syntax,
            calling_ae_title=self.open_hdr.calling_ae_title,
            assoc_id=self.open_hdr.assoc_id,
        )
        try:
            return self.sink.store(instance)
        except Exception as exc:  # a sink bug must give a failure status, never Success
            LOG.error("sink failed", extra={**self.log_extra, "error": type(exc).__name__})
            return sinks.status(sinks.PROCESSING_FAILURE, "dimse-relay: sink error")

    # -- association with the real SCP (worker thread) -----------------------------------
    def _associate(self) -> OpenResultHeader:
        calling = self.cfg.calling_ae_title or self.open_hdr.calling_ae_title
        ae = AE(ae_title=calling)
        ae.acse_timeout = min(self.cfg.timeouts.acse_s, self.open_hdr.timeout_s)
        ae.dimse_timeout = self.cfg.timeouts.dimse_s
        ae.network_timeout = self.cfg.timeouts.network_s
        ae.connection_timeout = min(self.cfg.timeouts.connect_s, self.open_hdr.timeout_s)
        contexts = requested_contexts(self.open_hdr.contexts)
        ext_neg: list[Any] = []
        for prop in self.open_hdr.contexts:
            if prop.scu_role is not None or prop.scp_role is not None:
                item = SCP_SCU_RoleSelectionNegotiation()
                item.sop_class_uid = prop.abstract_syntax
                item.scu_role = bool(prop.scu_role)
                item.scp_role = bool(prop.scp_role)
                ext_neg.append(item)
        assoc = ae.associate(
            *self.cfg.scp_address,
            contexts=contexts,
            ae_title=self.cfg.scp_ae_title,
            ext_neg=ext_neg or None,
            max_pdu=self.cfg.max_pdu,
            evt_handlers=[*SOCKET_HANDLERS, (evt.EVT_C_STORE, self._on_retrieved_store)],
        )
        if assoc.is_established:
            self.assoc = assoc
            accepted = []
            # pynetdicom numbers our proposal 1, 3, 5 ... in order; map back to the SCU's ids.
            ours = {cx.context_id: cx for cx in assoc.accepted_contexts}
            for index, prop in enumerate(self.open_hdr.contexts):
                cx = ours.get(2 * index + 1)
                if cx is None:
                    continue
                accepted.append(
                    ContextResult(
                        id=prop.id,
                        abstract_syntax=str(cx.abstract_syntax),
                        transfer_syntax=str(cx.transfer_syntax[0]),
                        scu_role=cx.as_scu if prop.scu_role is not None else None,
                        scp_role=cx.as_scp if prop.scp_role is not None else None,
                    )
                )
            metrics.ASSOCIATIONS.labels(role="target", result="accepted").inc()
            return OpenResultHeader(
                assoc_id=self.open_hdr.assoc_id,
                result="accepted",
                session_subject=self.subject,
                accepted=accepted,
            )
        if assoc.is_rejected:
            prim = assoc.acceptor.primitive
            assert prim is not None
            metrics.ASSOCIATIONS.labels(role="target", result="rejected").inc()
            return OpenResultHeader(
                assoc_id=self.open_hdr.assoc_id,
                result="rejected",
                reject_result=prim.result,
                reject_source=prim.result_source,
                reject_reason=prim.diagnostic,
            )
        metrics.ASSOCIATIONS.labels(role="target", result="failed").inc()
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # The SCP answered but took none of the contexts (pynetdicom then aborts).
            return OpenResultHeader(
                assoc_id=self.open_hdr.assoc_id,
                result="failed",
                failure="no_contexts",
                comment="target SCP accepted none of the proposed presentation contexts",
            )
        return OpenResultHeader(
            assoc_id=self.open_hdr.assoc_id,
            result="failed",
            failure="target_unreachable",
            comment="target SCP refused the connection or aborted the association",
        )

    def _send_echo(self) -> Dataset:
        return self.assoc.send_c_echo()  # type: ignore[no-any-return]

    @staticmethod
    def _store_kwargs(command: Dataset) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "priority": int(getattr(command, "Priority", 2)),
            "msg_id": int(command.MessageID),
        }
        if "MoveOriginatorApplicationEntityTitle" in command:
            kwargs["originator_aet"] = command.MoveOriginatorApplicationEntityTitle
            kwargs["originator_id"] = int(command.MoveOriginatorMessageID)
        return kwargs

    def _send_store(self, command: Dataset, path: Path) -> Dataset:
        return self.assoc.send_c_store(path, **self._store_kwargs(command))  # type: ignore[no-any-return]

    def _send_inline_store(
        self, command: Dataset, data: bytes, values: tuple[str, str, str]
    ) -> Dataset:
        return send_c_store_bytes(self.assoc, data, *values, **self._store_kwargs(command))

    def _release(self, mode: str) -> None:
        if self.assoc is not None and self.assoc.is_established:
            if mode == "abort":
                self.assoc.abort()
            else:
                self.assoc.release()

    # -- messages from the listener (loop) ----------------------------------------------
    async def on_message(self, msg: Msg) -> None:
        self.last_activity = time.monotonic()
        try:
            header, body = envelope.decode(msg.data)
        except EnvelopeError as exc:
            metrics.WIRE_REJECTED.labels(reason=exc.reason).inc()
            LOG.warning(
                "dropped invalid session message", extra={**self.log_extra, "why": str(exc)}
            )
            return
        if isinstance(header, RequestHeader):
            await self._on_request(header, body, msg.reply)
        elif isinstance(header, ChunkHeader):
            await self._on_chunk(header, body, msg.reply)
        elif isinstance(header, CancelHeader):
            await self._on_cancel(header.op_id)
        elif isinstance(header, CloseHeader):
            # Not awaited here: close() unsubscribes, which cancels this very callback's task.
            self.server.track(asyncio.ensure_future(self.close(header.mode)))
        else:
            metrics.WIRE_REJECTED.labels(reason="unexpected_kind").inc()

    async def _reply_error(self, reply: str, op_id: int, reason: str, comment: str) -> None:
        if reply:
            hdr = ErrorHeader(op_id=op_id, reason=reason, comment=comment)  # type: ignore[arg-type]
            await self.server.transport.publish(reply, envelope.encode(hdr))

    async def _on_request(self, hdr: RequestHeader, body: memoryview, reply: str) -> None:
        if not reply:
            metrics.WIRE_REJECTED.labels(reason="no_reply_subject").inc()
            return
        if hdr.command_length > len(body):
            metrics.WIRE_REJECTED.labels(reason="truncated").inc()
            await self._reply_error(reply, hdr.op_id, "protocol", "command set truncated")
            return
        if self.direct is not None:
            await self._direct_request(hdr, body, reply)
            return
        try:
            command = decode_command(body[: hdr.command_length])
        except Exception:
            metrics.WIRE_REJECTED.labels(reason="bad_command").inc()
            await self._reply_error(reply, hdr.op_id, "protocol", "command set undecodable")
            return
        if self.sink is not None:
            if hdr.service == "C-ECHO":
                await self._run_and_reply(hdr, reply, self._sink_echo)
            elif hdr.service == "C-STORE":
                await self._start_store(hdr, command, body[hdr.command_length :], reply)
            else:
                await self._reply_error(reply, hdr.op_id, "protocol", f"{hdr.service} not stored")
            return
        if self.assoc is None or not self.assoc.is_established:
            await self._reply_error(
                reply, hdr.op_id, "target_unreachable", "association with the target SCP is gone"
            )
            return
        if hdr.service == "C-ECHO":
            await self._run_and_reply(hdr, reply, self._send_echo)
        elif hdr.service == "C-STORE":
            await self._start_store(hdr, command, body[hdr.command_length :], reply)
        elif hdr.service in ("C-FIND", "C-GET", "C-MOVE"):
            identifier = await self._inline_dataset(hdr, body, reply)
            if identifier is None:
                return
            if hdr.service == "C-FIND":
                responses = self._find_responses(hdr, command, identifier)
            elif hdr.service == "C-GET":
                responses = self._get_responses(hdr, command, identifier, reply)
            else:
                responses = self._move_responses(hdr, command, identifier, reply)
            self._start_streamed(hdr, reply, responses)
        else:
            await self._reply_error(reply, hdr.op_id, "protocol", f"{hdr.service} not relayed")

    async def _inline_dataset(
        self, hdr: RequestHeader, body: memoryview, reply: str
    ) -> Dataset | None:
        """The identifier that came inline with a request, checked against length and digest."""
        raw = bytes(body[hdr.command_length :])
        why = None
        if not hdr.inline or len(raw) != hdr.dataset_length:
            why = "length_mismatch"
        elif hdr.digest != hashlib.sha256(raw).hexdigest():
            why = "bad_digest"
        if why is None:
            try:
                return decode_dataset(raw, hdr.transfer_syntax)
            except Exception:
                why = "bad_dataset"
        metrics.WIRE_REJECTED.labels(reason=why).inc()
        await self._reply_error(reply, hdr.op_id, "protocol", f"identifier {why}")
        return None

    def _find_responses(
        self, hdr: RequestHeader, command: Dataset, identifier: Dataset
    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        """(worker thread) the real SCP's C-FIND responses, as they arrive."""
        msg_id = int(command.MessageID)
        self.running[hdr.op_id] = (msg_id, hdr.abstract_syntax)
        yield from self.assoc.send_c_find(
            identifier,
            hdr.abstract_syntax,
            msg_id=msg_id,
            priority=int(command.get("Priority", 2)),
        )

    def _get_responses(
        self, hdr: RequestHeader, command: Dataset, identifier: Dataset, reply: str
    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        """(worker thread) C-GET on the relayed association; the C-STORE sub-operations the
        SCP sends on it are streamed back to the listener by _on_retrieved_store."""
        msg_id = int(command.MessageID)
        self.running[hdr.op_id] = (msg_id, hdr.abstract_syntax)
        retrieve = self.retrieve = _Retrieve(hdr.op_id, reply)
        try:
            yield from self._reconciled(
                retrieve,
                self.assoc.send_c_get(
                    identifier,
                    hdr.abstract_syntax,
                    msg_id=msg_id,
                    priority=int(command.get("Priority", 2)),
                ),
            )
        finally:
            self.retrieve = None

    def _reconciled(
        self, retrieve: _Retrieve, responses: Iterator[tuple[Dataset, Dataset | None]]
    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        """The SCP's C-GET responses; before the final one, every instance sent must have
        been answered by the listener's agent, and those it did not store count as failed."""
        for status, dataset in responses:
            if "Status" in status and int(status.Status) not in (0xFF00, 0xFF01):
                retrieve.settle(0, self.cfg.timeouts.dimse_s)
                if retrieve.lost:
                    LOG.warning(
                        "retrieved instances not stored by the listener's agent",
                        extra={**self.log_extra, "count": len(retrieve.lost)},
                    )
                status, dataset = reconciled(status, dataset, retrieve.lost)
            yield status, dataset

    def _move_responses(
        self, hdr: RequestHeader, command: Dataset, identifier: Dataset, reply: str
    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        """(worker thread) C-MOVE relayed as a C-GET from the SCP on a second association:
        the instances come back to this agent and are streamed to the listener, whose agent
        stores them to the move destination on its side. Progress and final status are the
        SCP's C-GET responses (the same status codes and sub-operation counts)."""
        get_model = _GET_FOR_MOVE.get(hdr.abstract_syntax)
        if get_model is None:
            status = Dataset()
            status.Status = 0x0122  # SOP class not supported
            yield status, None
            return
        calling = self.cfg.calling_ae_title or self.open_hdr.calling_ae_title
        ae = AE(ae_title=calling)
        ae.acse_timeout = self.cfg.timeouts.acse_s
        ae.dimse_timeout = self.cfg.timeouts.dimse_s
        ae.network_timeout = self.cfg.timeouts.network_s
        ae.connection_timeout = self.cfg.timeouts.connect_s
        sop_classes = moved_sop_classes(
            ae,
            self.cfg.scp_address,
            self.cfg.scp_ae_title,
            hdr.abstract_syntax,
            identifier,
            max_pdu=self.cfg.max_pdu,
            evt_handlers=SOCKET_HANDLERS,
        )
        storage = storage_contexts(sop_classes)
        contexts = [build_context(get_model), *storage]
        roles: list[Any] = [
            build_role(sop, scp_role=True)
            for sop in dict.fromkeys(str(cx.abstract_syntax) for cx in storage)
        ]
        retrieve_assoc = ae.associate(
            *self.cfg.scp_address,
            contexts=contexts,
            ae_title=self.cfg.scp_ae_title,
            ext_neg=roles,
            max_pdu=self.cfg.max_pdu,
            evt_handlers=[*SOCKET_HANDLERS, (evt.EVT_C_STORE, self._on_retrieved_store)],
        )
        if not retrieve_assoc.is_established:
            status = Dataset()
            status.Status = 0xA702  # Refused: Out of resources - unable to perform sub-ops
            status.ErrorComment = "dimse-relay: SCP refused the C-GET association"
            yield status, None
            return
        msg_id = int(command.MessageID)
        self.running[hdr.op_id] = (msg_id, get_model)
        retrieve = self.retrieve = _Retrieve(hdr.op_id, reply)
        # The listener's agent opens its move destination association with these contexts
        # as soon as the first response arrives, before the last instance has.
        retrieve.storage_contexts = [
            ContextResult(
                id=cx.context_id or 1,
                abstract_syntax=str(cx.abstract_syntax),
                transfer_syntax=str(cx.transfer_syntax[0]),
            )
            for cx in retrieve_assoc.accepted_contexts
            if str(cx.abstract_syntax) != get_model
        ]
        self.retrieve_assoc = retrieve_assoc
        try:
            yield from self._reconciled(
                retrieve,
                retrieve_assoc.send_c_get(
                    identifier,
                    get_model,
                    msg_id=msg_id,
                    priority=int(command.get("Priority", 2)),
                ),
            )
        finally:
            self.retrieve = None
            self.retrieve_assoc = None
            retrieve_assoc.release()

    def _on_retrieved_store(self, event: evt.Event) -> int:
        """(association thread) a C-STORE sub-operation of a C-GET: stream the instance to the
        listener and answer the SCP with the status the listener's agent reports for it."""
        retrieve = self.retrieve
        if retrieve is None:
            return 0xA900  # not expected outside a retrieve
        path = Path(event.dataset_path)
        offset = dataset_offset(path)
        command, _ = request_command(event.request, C_STORE_RQ(), "DataSet")
        self.sub_counter += 1
        request = RequestHeader(
            op_id=(1 << 32) + self.sub_counter,
            parent_op_id=retrieve.op_id,
            service="C-STORE",
            abstract_syntax=str(event.context.abstract_syntax),
            transfer_syntax=str(event.context.transfer_syntax),
            command_length=len(command),
            dataset_length=path.stat().st_size - offset,
        )
        loop = self.server.transport.loop
        sent: Future[None] = Future()
        answer = asyncio.run_coroutine_threadsafe(
            self._send_instance(retrieve.reply, request, command, path, offset, sent), loop
        )
        try:
            # Each chunk has its own acknowledgement timeout; the whole instance gets a budget
            # that grows with its size (as on the listener side), not one dimse_s in all.
            chunks = request.dataset_length // self.server.transport.chunk_size
            sent.result(self.cfg.timeouts.dimse_s * (2 + chunks))
        except Exception as exc:
            answer.cancel()  # stop publishing chunks nobody will acknowledge
            LOG.warning(
                "retrieved instance not relayed",
                extra={**self.log_extra, "error": type(exc).__name__},
            )
            return 0xA700
        # Sent whole (the file pynetdicom wrote is no longer needed): the SCP may go on with
        # the next instance while the listener's agent spools this one, up to a window.
        # Instances it then fails to store are counted in the final response (_reconciled).
        sop_instance_uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        retrieve.outstanding.append((sop_instance_uid, answer))
        retrieve.settle(RETRIEVE_WINDOW - 1, self.cfg.timeouts.dimse_s)
        return 0x0000

    async def _send_instance(
        self,
        reply: str,
        request: RequestHeader,
        command: bytes,
        path: Path,
        offset: int,
        sent: Future[None],
    ) -> Dataset:
        """Send one retrieved instance to the listener (``sent`` is resolved once every byte
        has been published and its chunks acknowledged), then wait for its answer."""
        transport = self.server.transport
        inbox, replies = transport.replies.new_inbox()
        nats_cfg = self.server.agent_cfg.nats
        try:
            try:
                await send_dataset(
                    transport,
                    reply,
                    inbox,
                    replies,
                    request,
                    command,
                    path,
                    offset,
                    window=nats_cfg.window_chunks,
                    ack_timeout_s=self.cfg.timeouts.dimse_s,
                )
            except BaseException as exc:
                if not sent.done():
                    sent.set_exception(exc)
                raise
            sent.set_result(None)
            return await await_response(replies, request.op_id, self.cfg.timeouts.dimse_s)
        finally:
            transport.replies.release(inbox)

    def _start_streamed(
        self,
        hdr: RequestHeader,
        reply: str,
        responses: Iterator[tuple[Dataset, Dataset | None]],
    ) -> None:
        """Run a multi-response operation on the session thread; publish every response as
        soon as the SCP sends it, waiting for each publish (back-pressure, order kept)."""
        loop = asyncio.get_running_loop()
        transport = self.server.transport

        def publish(data: bytes) -> None:
            asyncio.run_coroutine_threadsafe(transport.publish(reply, data), loop).result(30)

        def run() -> str:
            final_status = "none"
            try:
                for status, dataset in responses:
                    if "Status" not in status:
                        break  # no response: SCP aborted or timed out
                    code = int(status.Status)
                    final = code not in (0xFF00, 0xFF01)
                    raw_status = encode_command(status)
                    raw = b""
                    # Pending C-FIND matches, and the Failed SOP Instance UID List that may
                    # come with a final C-GET/C-MOVE response.
                    if dataset is not None:
                        raw = encode_dataset(dataset, hdr.transfer_syntax)
                    out = ResponseHeader(
                        op_id=hdr.op_id,
                        final=final,
                        command_length=len(raw_status),
                        dataset_length=len(raw) if raw else -1,
                        storage_contexts=self._announced_contexts(),
                    )
                    publish(envelope.encode(out, raw_status + raw))
                    if final:
                        final_status = metrics.status_class(code)
                        break
            except Exception as exc:
                LOG.warning(
                    "target operation failed",
                    extra={**self.log_extra, "service": hdr.service, "error": type(exc).__name__},
                )
            finally:
                self.running.pop(hdr.op_id, None)
            if final_status == "none":
                err = ErrorHeader(
                    op_id=hdr.op_id,
                    reason="target_unreachable",
                    comment="no final response from the target SCP",
                )
                with contextlib.suppress(Exception):
                    publish(envelope.encode(err))
            return final_status

        async def run_on_worker() -> None:
            self.busy += 1
            self.answering[hdr.op_id] = reply
            try:
                status_class = await loop.run_in_executor(self.worker, run)
            finally:
                self.busy -= 1
                self.answering.pop(hdr.op_id, None)
                self.last_activity = time.monotonic()
            metrics.REQUESTS.labels(role="target", service=hdr.service, status=status_class).inc()

        self.server.track(asyncio.ensure_future(run_on_worker()))

    def _announced_contexts(self) -> list[ContextResult] | None:
        """A C-MOVE's storage contexts, for its first response only."""
        retrieve = self.retrieve
        if retrieve is None or retrieve.storage_contexts is None:
            return None
        contexts, retrieve.storage_contexts = retrieve.storage_contexts, None
        return contexts

    async def _on_cancel(self, op_id: int) -> None:
        """C-CANCEL from the SCU: send it to the real SCP for the running operation."""
        running = self.running.get(op_id)
        if running is None or self.assoc is None:
            return
        msg_id, abstract_syntax = running
        assoc = self.retrieve_assoc or self.assoc
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(
                None, lambda: assoc.send_c_cancel(msg_id, query_model=abstract_syntax)
            )
        LOG.info("C-CANCEL relayed", extra={**self.log_extra, "op_id": op_id})

    async def _start_store(
        self, hdr: RequestHeader, command: Dataset, rest: memoryview, reply: str
    ) -> None:
        if hdr.dataset_length < 0 or (hdr.streamed and hdr.inline):
            metrics.WIRE_REJECTED.labels(reason="bad_request").inc()
            await self._reply_error(reply, hdr.op_id, "protocol", "bad C-STORE request")
            return
        # The listener relays one operation at a time per association: a new request means
        # any unfinished upload was abandoned (its SCU timed out or went away).
        for stale in self.uploads.values():
            stale.discard()
        self.uploads.clear()
        inline_values = self._inline_store_values(hdr, command)
        if inline_values is not None:
            await self._store_inline(hdr, command, rest, reply, inline_values)
            return
        try:
            up = SpooledDataset(hdr, command, self.server.spool_dir, reply)
        except OSError:
            await self._reply_error(reply, hdr.op_id, "unavailable", "cannot spool the dataset")
            return
        except Exception:
            await self._reply_error(reply, hdr.op_id, "protocol", "bad C-STORE command set")
            return
        if hdr.inline and not hdr.streamed:
            if len(rest) != hdr.dataset_length:
                up.discard()
                metrics.WIRE_REJECTED.labels(reason="length_mismatch").inc()
                await self._reply_error(reply, hdr.op_id, "protocol", "inline dataset length")
                return
            up.add(rest)
            await self._finish_store(up, hdr.digest)
            return
        self.uploads[hdr.op_id] = up
        self.upload_disconnects = self.server.transport.disconnects

    def _inline_store_values(
        self, hdr: RequestHeader, command: Dataset
    ) -> tuple[str, str, str] | None:
        """(SOP Class, SOP Instance, transfer syntax UID) for sending an inline dataset from
        memory: a non-empty dataset for a ``kind: scp`` target whose three UIDs are plain
        (what the spool file's File Meta would give back unchanged). None otherwise: the
        spool file route, with pydicom's checks and replies for unusual values."""
        if not hdr.inline or hdr.streamed or self.sink is not None or hdr.dataset_length <= 0:
            return None
        try:
            values = (
                str(command.AffectedSOPClassUID),
                str(command.AffectedSOPInstanceUID),
                hdr.transfer_syntax,
            )
        except Exception:
            return None
        plain = all(v == v.strip("\0 \t\r\n") for v in values)
        return values if plain and command_set.meta_values_supported(*values) else None

    async def _store_inline(
        self,
        hdr: RequestHeader,
        command: Dataset,
        rest: memoryview,
        reply: str,
        values: tuple[str, str, str],
    ) -> None:
        """A dataset that came whole in the request, checked as the spool route checks it
        (length, then digest; the same replies and metrics), then sent to the SCP from
        memory: no spool file on the critical path."""
        checked = await self._checked_inline(hdr, rest, reply)
        if checked is None:
            return
        data = bytes(checked)
        await self._run_and_reply(
            hdr, reply, lambda: self._send_inline_store(command, data, values)
        )

    async def _checked_inline(
        self, hdr: RequestHeader, data: memoryview, reply: str
    ) -> memoryview | None:
        """An inline dataset if its length and digest are right; else None, after the
        ERROR reply and the metric."""
        if len(data) != hdr.dataset_length:
            metrics.WIRE_REJECTED.labels(reason="length_mismatch").inc()
            await self._reply_error(reply, hdr.op_id, "protocol", "inline dataset length")
            return None
        metrics.BYTES.labels(direction="received").inc(len(data))
        if hdr.digest != hashlib.sha256(data).hexdigest():
            metrics.WIRE_REJECTED.labels(reason="bad_digest").inc()
            await self._reply_error(reply, hdr.op_id, "protocol", "dataset bad_digest")
            return None
        return data

    async def _on_chunk(self, hdr: ChunkHeader, body: memoryview, reply: str) -> None:
        if self.direct is not None:
            await self._direct_chunk(hdr, body, reply)
            return
        up = self.uploads.get(hdr.op_id)
        if up is None:
            metrics.WIRE_REJECTED.labels(reason="unknown_operation").inc()
            await self._reply_error(reply, hdr.op_id, "protocol", "chunk for unknown operation")
            return
        why = up.add_chunk(hdr, body)
        if why is not None:
            metrics.WIRE_REJECTED.labels(reason=why).inc()
            LOG.warning("chunk rejected", extra={**self.log_extra, "why": why})
            self.uploads.pop(hdr.op_id, None)
            # A local disk problem, or a chunk lost while NATS reconnected, is "out of
            # resources" for the SCU (worth a retry), not a protocol error.
            reason = (
                "unavailable" if why == "io_error" or self._lost_in_reconnect(why) else "protocol"
            )
            await self._reply_error(up.reply, hdr.op_id, reason, f"chunk {why}")
            return
        if hdr.final:
            self.uploads.pop(hdr.op_id)
            await self._finish_store(up, hdr.digest, hdr.dataset_length)
        elif reply:
            await self.server.transport.publish(
                reply, envelope.encode(AckHeader(op_id=hdr.op_id, seq=hdr.seq))
            )

    async def _finish_store(
        self, up: SpooledDataset, digest: str | None, total: int | None = None
    ) -> None:
        why = up.finish(digest, total)
        if why is not None:
            metrics.WIRE_REJECTED.labels(reason=why).inc()
            reason = "unavailable" if why == "io_error" else "protocol"
            await self._reply_error(up.reply, up.request.op_id, reason, f"dataset {why}")
            return

        def store() -> Dataset:
            try:
                if self.sink is not None:
                    return self._sink_store(up)
                return self._send_store(up.command, up.path)
            finally:
                up.discard()

        await self._run_and_reply(up.request, up.reply, store)

    async def _run_and_reply(self, hdr: RequestHeader, reply: str, func: Any) -> None:
        """Run one DIMSE operation on the session thread; publish its response when done."""

        async def run() -> None:
            loop = asyncio.get_running_loop()
            self.busy += 1
            self.answering[hdr.op_id] = reply
            try:
                status: Dataset = await loop.run_in_executor(self.worker, func)
            except Exception as exc:
                LOG.warning(
                    "target operation failed", extra={**self.log_extra, "error": type(exc).__name__}
                )
                status = Dataset()
            finally:
                self.busy -= 1
                self.answering.pop(hdr.op_id, None)
                self.last_activity = time.monotonic()
            if "Status" not in status:
                # No response: the SCP aborted, timed out or the association is gone.
                metrics.REQUESTS.labels(role="target", service=hdr.service, status="none").inc()
                await self._reply_error(
                    reply, hdr.op_id, "target_unreachable", "no response from the target SCP"
                )
                return
            metrics.REQUESTS.labels(
                role="target", service=hdr.service, status=metrics.status_class(int(status.Status))
            ).inc()
            raw = encode_command(status)
            out = ResponseHeader(op_id=hdr.op_id, final=True, command_length=len(raw))
            with contextlib.suppress(Exception):
                await self.server.transport.publish(reply, envelope.encode(out, raw))

        task = asyncio.ensure_future(run())
        self.server.track(task)

    # -- the direct path (direct_target.py): C-ECHO and C-STORE on the loop ---------------
    async def _direct_request(self, hdr: RequestHeader, body: memoryview, reply: str) -> None:
        direct = self.direct
        assert direct is not None
        try:
            command = upper_layer.parse_command(bytes(body[: hdr.command_length]))
        except ULError:
            metrics.WIRE_REJECTED.labels(reason="bad_command").inc()
            await self._reply_error(reply, hdr.op_id, "protocol", "command set undecodable")
            return
        if direct.upload is not None:
            # A new request while a dataset was on its way: its SCU gave up. If the SCP holds
            # part of that dataset, which must never be completed, the association ends.
            stale, direct.upload = direct.upload, None
            direct.abandoned.append(stale.request.op_id)
            if stale.command_sent:
                LOG.warning("unfinished upload abandoned; aborting", extra=self.log_extra)
                direct.abort()
        if not direct.usable:
            await self._reply_error(
                reply, hdr.op_id, "target_unreachable", "association with the target SCP is gone"
            )
            return
        if direct.busy:
            # The listener gave up on the previous request (its timeout) while the SCP still
            # works on it: no second request on the association until that one is answered.
            await self._reply_error(
                reply, hdr.op_id, "protocol", "previous request still running at the target SCP"
            )
            return
        if hdr.service not in ("C-ECHO", "C-STORE"):
            await self._reply_error(reply, hdr.op_id, "protocol", f"{hdr.service} not negotiated")
            return
        context_id = direct.context_for(hdr.abstract_syntax, hdr.transfer_syntax)
        if context_id is None:
            await self._reply_error(
                reply, hdr.op_id, "protocol", "no accepted presentation context for the request"
            )
            return
        raw = upper_layer.encode_elements(command.elements)  # the group length made right
        message_id = command.elements.get(upper_layer.TAG_MESSAGE_ID, b"")
        if hdr.service == "C-ECHO":
            direct.send_command(context_id, raw, message_id)
            self._direct_respond(hdr, reply)
            return
        if hdr.dataset_length < 0 or (hdr.streamed and hdr.inline):
            metrics.WIRE_REJECTED.labels(reason="bad_request").inc()
            await self._reply_error(reply, hdr.op_id, "protocol", "bad C-STORE request")
            return
        if not hdr.inline:
            direct.start_upload(hdr, reply, context_id, raw, message_id)
            self.upload_disconnects = self.server.transport.disconnects
            return
        data = await self._checked_inline(hdr, body[hdr.command_length :], reply)
        if data is None:
            return
        try:
            direct.send_command(context_id, raw, message_id)
            await direct.send_data(context_id, data, last=True)
        except direct_target.TargetGone:
            pass  # the response wait reports it
        self._direct_respond(hdr, reply)

    async def _direct_chunk(self, hdr: ChunkHeader, body: memoryview, reply: str) -> None:
        direct = self.direct
        assert direct is not None
        up = direct.upload
        if (up is None or up.request.op_id != hdr.op_id) and hdr.op_id in direct.abandoned:
            return  # the rest of an upload already refused (its sender has been told)
        if up is None or up.request.op_id != hdr.op_id:
            metrics.WIRE_REJECTED.labels(reason="unknown_operation").inc()
            await self._reply_error(reply, hdr.op_id, "protocol", "chunk for unknown operation")
            return
        try:
            why = await direct.add_chunk(hdr, body)
            if why is None and hdr.final:
                why = direct.check_final(hdr)
                if why is not None:
                    why = f"dataset {why}"
                else:
                    await direct.finish_upload()
            elif why is not None:
                why = f"chunk {why}"
        except direct_target.TargetGone:
            direct.upload = None
            direct.abandoned.append(hdr.op_id)
            await self._reply_error(
                up.reply, hdr.op_id, "target_unreachable", "association with the target SCP is gone"
            )
            return
        if why is not None:
            metrics.WIRE_REJECTED.labels(reason=why.split()[-1]).inc()
            LOG.warning("chunk rejected", extra={**self.log_extra, "why": why})
            direct.upload = None
            direct.abandoned.append(hdr.op_id)
            if up.command_sent:
                direct.abort()  # the SCP holds part of it and must never complete it
            reason = "unavailable" if self._lost_in_reconnect(why) else "protocol"
            await self._reply_error(up.reply, hdr.op_id, reason, why)
            return
        if hdr.final:
            self._direct_respond(up.request, up.reply)
        elif reply:
            await self.server.transport.publish(
                reply, envelope.encode(AckHeader(op_id=hdr.op_id, seq=hdr.seq))
            )

    def _lost_in_reconnect(self, why: str) -> bool:
        """A gap in a chunk stream that crossed a drop of this agent's NATS connection:
        a message lost in the reconnect (NATS delivers at most once), not a broken sender."""
        gap = why.endswith("out_of_order")
        return gap and self.server.transport.disconnects != self.upload_disconnects

    def _direct_respond(self, hdr: RequestHeader, reply: str) -> None:
        """Publish the SCP's response to the request just sent, when it comes."""
        direct = self.direct
        assert direct is not None
        try:
            pending = direct.pending_response()
        except direct_target.TargetGone:
            pending = asyncio.get_running_loop().create_future()
            pending.set_exception(direct_target.TargetGone("not sent"))

        async def respond() -> None:
            self.busy += 1
            self.answering[hdr.op_id] = reply
            try:
                elements = await direct.response(pending)
            except direct_target.TargetGone:
                metrics.REQUESTS.labels(role="target", service=hdr.service, status="none").inc()
                await self._reply_error(
                    reply, hdr.op_id, "target_unreachable", "no response from the target SCP"
                )
                return
            finally:
                self.busy -= 1
                self.answering.pop(hdr.op_id, None)
                self.last_activity = time.monotonic()
            metrics.REQUESTS.labels(
                role="target", service=hdr.service, status=direct_target.status_class(elements)
            ).inc()
            raw = upper_layer.status_body(elements)
            out = ResponseHeader(op_id=hdr.op_id, final=True, command_length=len(raw))
            with contextlib.suppress(Exception):
                await self.server.transport.publish(reply, envelope.encode(out, raw))

        self.server.track(asyncio.ensure_future(respond()))

    def upload_reply(self) -> str | None:
        """The listener's reply inbox of an upload in progress, if there is one."""
        if self.direct is not None and self.direct.upload is not None:
            return self.direct.upload.reply
        for up in self.uploads.values():
            return up.reply
        return None

    async def notify_stopping(self, comment: str) -> None:
        """Tell the listener why its requests still on their way or still waiting for the
        SCP will not complete (ERROR ``unavailable``), so its SCU hears at once, not after a
        chunk acknowledgement or request timeout (the agent is stopping)."""
        in_flight = dict(self.answering)
        in_flight.update((op_id, up.reply) for op_id, up in self.uploads.items())
        if self.direct is not None and self.direct.upload is not None:
            in_flight[self.direct.upload.request.op_id] = self.direct.upload.reply
        for op_id, reply in in_flight.items():
            with contextlib.suppress(Exception):
                await self._reply_error(reply, op_id, "unavailable", comment)

    async def close(self, mode: str) -> None:
        """End the session."""
        if self.closed:
            return
        self.closed = True
        self.server.sessions.pop(self.session_id, None)
        metrics.ACTIVE_SESSIONS.labels(role="target").set(len(self.server.sessions))
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        for up in self.uploads.values():
            up.discard()
        self.uploads.clear()
        if self.direct is not None:
            # A dataset still on its way must never be completed: abort, not release.
            if mode == "abort" or self.direct.upload is not None:
                mode = "abort"
                self.direct.abort()
            else:
                await self.direct.release()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(self.worker, self._release, mode)
        self.worker.shutdown(wait=False)
        LOG.info("target session closed", extra={**self.log_extra, "mode": mode})


class TargetServer:
    """All targets of one agent."""

    def __init__(self, agent_cfg: AgentConfig, transport: NatsTransport):
        self.agent_cfg = agent_cfg
        self.transport = transport
        self.sessions: dict[str, TargetSession] = {}
        self.tasks: set[asyncio.Future[Any]] = set()
        self.spool_dir = agent_cfg.work_dir / "spool"
        self.spool_dir.mkdir(exist_ok=True, mode=0o700)
        self._subscribed = False
        self._reaper: asyncio.Task[None] | None = None
        prefix = agent_cfg.nats.subject_prefix
        self.sinks: dict[str, sinks.Sink] = {
            t.ae_title: sinks.build_sink(t, prefix, self._publish_event)
            for t in agent_cfg.targets
            if t.kind != "scp"
        }

    def _publish_event(self, subject: str, payload: bytes) -> None:
        """(worker thread) publish a sink event on the NATS loop; raises if it failed."""
        asyncio.run_coroutine_threadsafe(
            self.transport.publish(subject, payload), self.transport.loop
        ).result(5)

    def track(self, task: asyncio.Future[Any]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(_log_failure)

    async def subscribe(self) -> None:
        """(Re)subscribe the open subjects; nats-py restores them itself after reconnects."""
        if self._subscribed:
            return
        prefix = self.agent_cfg.nats.subject_prefix
        for tcfg in self.agent_cfg.targets:
            subject = subjects.open_subject(prefix, tcfg.ae_title)
            await self.transport.subscribe(
                subject, self._open_handler(tcfg), queue=subjects.open_queue_group(tcfg.ae_title)
            )
            LOG.info("target subscribed", extra={"target": tcfg.ae_title, "subject": subject})
        self._subscribed = True
        self._reaper = asyncio.ensure_future(self._reap_idle())

    def _open_handler(self, tcfg: TargetConfig) -> Any:
        async def handle(msg: Msg) -> None:
            try:
                header, _body = envelope.decode(msg.data)
            except EnvelopeError as exc:
                metrics.WIRE_REJECTED.labels(reason=exc.reason).inc()
                LOG.warning("dropped invalid open message", extra={"why": str(exc)})
                return
            if not isinstance(header, OpenHeader) or not msg.reply:
                metrics.WIRE_REJECTED.labels(reason="unexpected_kind").inc()
                return
            task = asyncio.ensure_future(self._open(tcfg, header, msg.reply))
            self.track(task)

        return handle

    async def _open(self, tcfg: TargetConfig, hdr: OpenHeader, reply: str) -> None:
        if len([s for s in self.sessions.values() if s.cfg is tcfg]) >= tcfg.max_sessions:
            result = OpenResultHeader(
                assoc_id=hdr.assoc_id,
                result="rejected",
                reject_result=2,
                reject_source=3,
                reject_reason=2,
                comment="target busy",
            )
            metrics.ASSOCIATIONS.labels(role="target", result="busy").inc()
            await self.transport.publish(reply, envelope.encode(result))
            return
        session = TargetSession(self, tcfg, hdr)
        # Counted before the first await, so concurrent OPENs cannot exceed max_sessions.
        self.sessions[session.session_id] = session
        try:
            session.sub = await self.transport.subscribe(session.subject, session.on_message)
        except Exception:
            await session.close("abort")
            raise
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            if session.direct is not None:
                result = await session.direct.open(hdr.assoc_id, session.subject)
            else:
                associate = session._accept_locally if session.sink else session._associate
                result = await loop.run_in_executor(session.worker, associate)
            if time.monotonic() - started > hdr.timeout_s:
                # The listener has given up waiting; nobody will use or close this association.
                metrics.ASSOCIATIONS.labels(role="target", result="too_late").inc()
                result = OpenResultHeader(assoc_id=hdr.assoc_id, result="failed", failure="timeout")
                if session.direct is not None:
                    session.direct.abort()
        except Exception as exc:
            LOG.warning(
                "association with target failed",
                extra={**session.log_extra, "error": type(exc).__name__},
            )
            result = OpenResultHeader(
                assoc_id=hdr.assoc_id, result="failed", failure="target_unreachable"
            )
        LOG.info(
            "target association opened",
            extra={**session.log_extra, "result": result.result, "contexts": len(result.accepted)},
        )
        if result.result != "accepted":
            await session.close("abort")
        else:
            metrics.ACTIVE_SESSIONS.labels(role="target").set(len(self.sessions))
        try:
            await self.transport.publish(reply, envelope.encode(result))
        except Exception:
            await session.close("abort")

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                # Chunks and requests refresh last_activity; a stalled upload is idle too.
                idle_s = now - session.last_activity
                reply = session.upload_reply()
                if reply and idle_s > UPLOAD_PROBE_AFTER_S and await self._listener_gone(reply):
                    # The listener's agent died in the middle of a data set: the SCP must
                    # not keep part of it for session_idle_s.
                    LOG.warning("listener gone during an upload; aborting", extra=session.log_extra)
                    await session.close("abort")
                    continue
                if idle_s > session.cfg.timeouts.session_idle_s and not session.busy:
                    LOG.warning("closing idle target session", extra=session.log_extra)
                    await session.close("release")

    async def _listener_gone(self, inbox: str) -> bool:
        """True if nobody subscribes to the listener's reply inbox any more (NATS answers
        "no responders" within a round trip). A live listener ignores the probe, an ACK for
        no operation, and sends nothing back."""
        probe = envelope.encode(AckHeader(op_id=0, seq=0))
        try:
            await self.transport.client().request(inbox, probe, timeout=0.25)
        except Exception as exc:
            return "NoResponders" in type(exc).__name__
        return False

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        sessions = list(self.sessions.values())
        # every listener hears first; closing a session may wait for its SCP
        for session in sessions:
            await session.notify_stopping("target agent stopping")
        for session in sessions:
            await session.close("release")
        for sink in self.sinks.values():
            with contextlib.suppress(Exception):
                sink.close()
