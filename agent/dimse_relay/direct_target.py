"""A target's association with its real SCP on the NATS loop, for C-ECHO and C-STORE.

When a relayed association proposes only Verification and storage contexts without role
selection, a ``kind: scp`` target opens it with this class instead of pynetdicom: the
A-ASSOCIATE-RQ carries the SCU's own context ids, abstract and transfer syntaxes and calling
AE title; requests are written to the SCP as they arrive over NATS and its responses read by
one reader task. A chunked C-STORE is passed through as its chunks arrive (cut-through),
with the last P-DATA fragment held back until the whole dataset's length and digest are
checked: a dataset that fails the check is never completed at the SCP (the association is
aborted instead). One operation runs at a time, as the listener relays them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from dimse_relay import metrics, upper_layer
from dimse_relay.config import TargetConfig
from dimse_relay.envelope import (
    MAX_CHUNK,
    ChunkHeader,
    ContextResult,
    OpenHeader,
    OpenResultHeader,
    RequestHeader,
)
from dimse_relay.upper_layer import ULError

LOG = logging.getLogger("dimse_relay.target")


def eligible(open_hdr: OpenHeader) -> bool:
    """Whether an OPEN's association can go the direct way: C-ECHO/C-STORE contexts only,
    and no SCP/SCU role selection (which only a C-GET needs)."""
    return bool(open_hdr.contexts) and all(
        upper_layer.is_storage_or_verification(p.abstract_syntax)
        and p.scu_role is None
        and p.scp_role is None
        for p in open_hdr.contexts
    )


class TargetGone(Exception):
    """The association with the SCP ended (abort, closed connection, protocol error)."""


@dataclass
class Upload:
    """A C-STORE whose dataset arrives in chunks and goes on to the SCP as it arrives."""

    request: RequestHeader
    reply: str
    context_id: int
    command: bytes
    message_id: bytes
    command_sent: bool = False  # nothing reaches the SCP before the first chunk is checked
    next_seq: int = 0
    received: int = 0
    # The newest chunk (a view of its NATS message): sent once the next one, or the check of
    # the whole data set, is in.
    held: memoryview | None = None
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)


class ScpAssociation:
    """One association with the real SCP, driven from the NATS loop."""

    def __init__(self, cfg: TargetConfig, open_hdr: OpenHeader):
        self.cfg = cfg
        self.open_hdr = open_hdr
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted id -> (abstract, transfer)
        self.established = False
        self.gone = False
        self._reader_task: asyncio.Task[None] | None = None
        # The one request outstanding at the SCP (no asynchronous operations are negotiated):
        # its Message ID and the future its response resolves.
        self._response: asyncio.Future[dict[int, bytes]] | None = None
        self._message_id = b""
        self._release: asyncio.Future[None] | None = None
        self._command = bytearray()
        self.upload: Upload | None = None
        # Uploads given up here (a bad chunk, the SCP gone): chunks of theirs still on the way
        # are dropped quietly rather than counted as unknown operations.
        self.abandoned: collections.deque[int] = collections.deque(maxlen=64)

    # -- association --------------------------------------------------------------------
    async def open(self, assoc_id: str, session_subject: str) -> OpenResultHeader:
        cfg, hdr = self.cfg, self.open_hdr
        host, port = cfg.scp_address
        deadline = min(cfg.timeouts.connect_s, hdr.timeout_s)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=upper_layer.MAX_SEND_PDU), deadline
            )
        except (OSError, TimeoutError):
            metrics.ASSOCIATIONS.labels(role="target", result="failed").inc()
            return self._failed("target_unreachable", "target SCP refused the connection")
        self.reader, self.writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proposed = [
            upper_layer.ProposedContext(p.id, p.abstract_syntax, p.transfer_syntaxes)
            for p in hdr.contexts
        ]
        rq = upper_layer.associate_rq_pdu(
            cfg.calling_ae_title or hdr.calling_ae_title,
            cfg.scp_ae_title,
            proposed,
            cfg.max_pdu,
            upper_layer.DEFAULT_IMPLEMENTATION_UID,
        )
        try:
            writer.write(rq)
            pdu_type, body = await asyncio.wait_for(
                upper_layer.read_pdu(reader, upper_layer.MAX_ASSOCIATION_PDU),
                min(cfg.timeouts.acse_s, hdr.timeout_s),
            )
        except (ULError, OSError, TimeoutError):
            self._close_transport()
            metrics.ASSOCIATIONS.labels(role="target", result="failed").inc()
            return self._failed("target_unreachable", "target SCP did not answer the association")
        if pdu_type == upper_layer.ASSOCIATE_RJ:
            self._close_transport()
            result, source, reason = upper_layer.decode_associate_rj(body)
            metrics.ASSOCIATIONS.labels(role="target", result="rejected").inc()
            return OpenResultHeader(
                assoc_id=assoc_id,
                result="rejected",
                reject_result=result,
                reject_source=source,
                reject_reason=reason,
            )
        if pdu_type != upper_layer.ASSOCIATE_AC:
            self._close_transport()
            metrics.ASSOCIATIONS.labels(role="target", result="failed").inc()
            return self._failed("target_unreachable", "target SCP aborted the association")
        try:
            ac = upper_layer.decode_associate_ac(body)
        except Exception:
            self.abort()
            metrics.ASSOCIATIONS.labels(role="target", result="failed").inc()
            return self._failed("target_unreachable", "target SCP sent an invalid A-ASSOCIATE-AC")
        self.peer_max_pdu = int(ac.maximum_length_received or 0)
        if 0 < self.peer_max_pdu < upper_layer.MIN_PEER_PDU:
            self.abort()
            metrics.ASSOCIATIONS.labels(role="target", result="failed").inc()
            return self._failed("target_unreachable", "target SCP announced a tiny maximum PDU")
        proposals = {p.id: p for p in hdr.contexts}
        accepted = []
        for cx in ac.presentation_context_definition_results_list:
            prop = proposals.get(int(cx.context_id or 0))
            if cx.result != 0 or prop is None or not cx.transfer_syntax:
                continue
            ts = str(cx.transfer_syntax[0])
            if ts not in prop.transfer_syntaxes:
                continue  # the SCP answered with a syntax nobody proposed: not usable
            self.contexts[prop.id] = (prop.abstract_syntax, ts)
            accepted.append(
                ContextResult(id=prop.id, abstract_syntax=prop.abstract_syntax, transfer_syntax=ts)
            )
        if not accepted:
            # As pynetdicom does: an association without any context is of no use.
            self.abort()
            metrics.ASSOCIATIONS.labels(role="target", result="failed").inc()
            return self._failed(
                "no_contexts", "target SCP accepted none of the proposed presentation contexts"
            )
        self.established = True
        self._reader_task = asyncio.ensure_future(self._read_loop())
        metrics.ASSOCIATIONS.labels(role="target", result="accepted").inc()
        metrics.DIRECT_ASSOCIATIONS.labels(role="target").inc()
        return OpenResultHeader(
            assoc_id=assoc_id,
            result="accepted",
            session_subject=session_subject,
            accepted=accepted,
        )

    def _failed(self, failure: str, comment: str) -> OpenResultHeader:
        return OpenResultHeader(
            assoc_id=self.open_hdr.assoc_id, result="failed", failure=failure, comment=comment
        )

    @property
    def usable(self) -> bool:
        return self.established and not self.gone

    def _close_transport(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()

    def _lost(self, why: str) -> None:
        if self.gone:
            return
        self.gone = True
        self.established = False
        self._close_transport()
        for fut in (self._response, self._release):
            if fut is not None and not fut.done():
                fut.set_exception(TargetGone(why))
                fut.exception()  # nobody may wait for it any more: not an "unretrieved" error

    def abort(self) -> None:
        if self.writer is not None and not self.gone:
            with contextlib.suppress(Exception):
                self.writer.write(upper_layer.abort_pdu())
        self._lost("aborted")
        if self.writer is not None:
            # Not a graceful close: data the SCP stopped reading must not keep the socket.
            with contextlib.suppress(Exception):
                self.writer.transport.abort()
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def release(self) -> None:
        if not self.usable or self.writer is None:
            self.abort()
            return
        self._release = asyncio.get_running_loop().create_future()
        try:
            self.writer.write(upper_layer.RELEASE_RQ_PDU)
            await asyncio.wait_for(asyncio.shield(self._release), self.cfg.timeouts.acse_s)
        except Exception:
            self.abort()
            return
        self._lost("released")

    async def _read_loop(self) -> None:
        assert self.reader is not None
        max_length = max(self.cfg.max_pdu, 4 * 1024 * 1024)
        try:
            while True:
                pdu_type, body = await upper_layer.read_pdu(self.reader, max_length)
                if pdu_type == upper_layer.P_DATA_TF:
                    self._on_pdata(body)
                elif pdu_type == upper_layer.RELEASE_RP:
                    if self._release is not None and not self._release.done():
                        self._release.set_result(None)
                    return
                elif pdu_type == upper_layer.RELEASE_RQ:
                    with contextlib.suppress(Exception):
                        assert self.writer is not None
                        self.writer.write(upper_layer.RELEASE_RP_PDU)
                    self._lost("the SCP released the association")
                    return
                else:  # A-ABORT, or a PDU that has no place here
                    self._lost("the SCP aborted the association")
                    return
        except ULError as exc:
            self._lost(exc.reason)
        except (OSError, asyncio.IncompleteReadError):
            self._lost("connection lost")
        finally:
            if not self.gone and (self._release is None or not self._release.done()):
                self._lost("reader ended")

    def _on_pdata(self, body: bytes) -> None:
        for pdv in upper_layer.parse_pdata(body):
            if not pdv.command:
                raise ULError("bad_pdu", "unexpected data set from the SCP")
            self._command += pdv.data
            if not pdv.last:
                continue
            raw, self._command = bytes(self._command), bytearray()
            command = upper_layer.parse_command(raw)
            if command.command_field not in (upper_layer.C_STORE_RSP, upper_layer.C_ECHO_RSP):
                raise ULError("bad_command", "the SCP sent a request on a storage association")
            fut = self._response
            answered = command.elements.get(upper_layer.TAG_MESSAGE_ID_RESPONDED)
            if fut is None or fut.done() or answered != self._message_id:
                raise ULError("bad_command", "a response to no request of ours")
            fut.set_result(upper_layer.status_elements(command))

    # -- operations ---------------------------------------------------------------------
    def context_for(self, abstract_syntax: str, transfer_syntax: str) -> int | None:
        for cid, (abstract, ts) in self.contexts.items():
            if abstract == abstract_syntax and ts == transfer_syntax:
                return cid
        return None

    def _write(self, parts: Iterable[bytes | memoryview]) -> None:
        if not self.usable or self.writer is None:
            raise TargetGone("association with the target SCP is gone")
        self.writer.writelines(parts)

    async def _drain(self) -> None:
        """Wait until the SCP has taken what was written, at most timeouts.network_s: an SCP
        that stops reading must not hold the session (and its NATS messages) forever."""
        assert self.writer is not None
        try:
            await asyncio.wait_for(self.writer.drain(), self.cfg.timeouts.network_s)
        except TimeoutError:
            self.abort()
            raise TargetGone("the target SCP stopped reading") from None
        except (OSError, ConnectionError) as exc:
            self._lost("connection lost")
            raise TargetGone("connection lost") from exc

    @property
    def busy(self) -> bool:
        """A request is outstanding at the SCP (its response has not come yet)."""
        return self._response is not None and not self._response.done()

    def send_command(self, context_id: int, command: bytes, message_id: bytes) -> None:
        if self.busy:
            raise TargetGone("a request is still outstanding at the target SCP")
        self._response = None  # the previous one is answered; none until this one is written
        self._write(upper_layer.pdata_fragments(context_id, command, True, True, self.peer_max_pdu))
        # No response can be read before the loop runs again: set up the wait only now.
        self._response = asyncio.get_running_loop().create_future()
        self._message_id = message_id

    async def send_data(self, context_id: int, data: bytes | memoryview, last: bool) -> None:
        self._write(upper_layer.pdata_fragments(context_id, data, False, last, self.peer_max_pdu))
        await self._drain()

    def pending_response(self) -> asyncio.Future[dict[int, bytes]]:
        """The future of the request just sent (send_command), for response()."""
        if self._response is None:
            raise TargetGone("no request")
        return self._response

    async def response(self, fut: asyncio.Future[dict[int, bytes]]) -> dict[int, bytes]:
        """The status elements of the SCP's response to that request, within
        timeouts.dimse_s (after which the association is aborted, as pynetdicom does)."""
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.cfg.timeouts.dimse_s)
        except TimeoutError:
            self.abort()
            raise TargetGone("no response from the target SCP") from None

    # -- uploads ------------------------------------------------------------------------
    def start_upload(
        self,
        request: RequestHeader,
        reply: str,
        context_id: int,
        command: bytes,
        message_id: bytes,
    ) -> None:
        if self.busy:
            raise TargetGone("a request is still outstanding at the target SCP")
        self.upload = Upload(request, reply, context_id, command, message_id)

    def _send_upload_command(self, up: Upload) -> None:
        if not up.command_sent:
            up.command_sent = True
            self.send_command(up.context_id, up.command, up.message_id)

    async def finish_upload(self) -> None:
        """(after check_final) the held last part, completing the data set at the SCP."""
        up = self.upload
        assert up is not None
        self.upload = None
        self._send_upload_command(up)
        await self.send_data(up.context_id, up.held if up.held is not None else b"", last=True)

    async def add_chunk(self, chunk: ChunkHeader, data: memoryview) -> str | None:
        """Take one chunk of the upload; a metric reason if it is refused (the caller then
        aborts). The previous chunk goes to the SCP now; this one is held."""
        up = self.upload
        assert up is not None
        if chunk.seq != up.next_seq or chunk.offset != up.received:
            return "out_of_order"
        limit = None if up.request.streamed else up.request.dataset_length
        if len(data) > MAX_CHUNK or (limit is not None and up.received + len(data) > limit):
            return "oversized"
        up.digest.update(data)
        up.received += len(data)
        up.next_seq += 1
        metrics.BYTES.labels(direction="received").inc(len(data))
        previous, up.held = up.held, data
        if previous is not None:
            self._send_upload_command(up)
            await self.send_data(up.context_id, previous, last=False)
        return None

    def check_final(self, chunk: ChunkHeader) -> str | None:
        up = self.upload
        assert up is not None
        total = chunk.dataset_length if up.request.streamed else up.request.dataset_length
        if total is None or up.received != total:
            return "length_mismatch"
        if chunk.digest != up.digest.hexdigest():
            return "bad_digest"
        return None


def status_class(elements: dict[int, bytes]) -> str:
    status = upper_layer.status_of(elements)
    return metrics.status_class(status) if status is not None else "none"
