"""The calling side of the relay protocol, shared by listeners and the queued-mode deliverer:
open a session with the agent serving a far AE title, store one instance over it, close it.

Coroutines here run on the NATS loop. Failures raise :class:`RelayError` carrying the
documented relay status (statuses.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pydicom.dataset import Dataset

from dimse_relay import envelope, metrics, statuses, subjects
from dimse_relay.envelope import (
    CloseHeader,
    ContextProposal,
    EnvelopeError,
    OpenHeader,
    OpenResultHeader,
    RequestHeader,
)
from dimse_relay.statuses import RelayFailure
from dimse_relay.streaming import StreamAborted, await_response, send_dataset
from dimse_relay.transport import NatsTransport


class RelayError(Exception):
    def __init__(self, failure: RelayFailure, detail: str = ""):
        super().__init__(detail or failure.comment)
        self.failure = failure


FAILURES = {
    "unavailable": statuses.FAR_SIDE_UNAVAILABLE,
    "gone": statuses.FAR_SESSION_GONE,  # local only: NATS's "no responders", never on the wire
    "timeout": statuses.FAR_SIDE_TIMEOUT,
    "target_unreachable": statuses.TARGET_UNREACHABLE,
    "protocol": statuses.PROTOCOL_ERROR,
}


def check_session_subject(prefix: str, far_ae_title: str, result: OpenResultHeader) -> None:
    """The far agent's session subject must be one token under the called AE title's session
    root: whoever answers an OPEN must not be able to point our datasets at any other subject."""
    subject = result.session_subject or ""
    root = subjects.session_subject(prefix, far_ae_title, "")
    token = subject.removeprefix(root)
    if not subject.startswith(root) or not token or not token.isalnum():
        metrics.WIRE_REJECTED.labels(reason="bad_session_subject").inc()
        raise RelayError(statuses.PROTOCOL_ERROR, "far agent sent an invalid session subject")


def valid_reject(result: OpenResultHeader) -> tuple[int, int, int]:
    """The far target's A-ASSOCIATE-RJ values if they are valid (PS3.8 9.3.4), else
    rejected-transient / service-user / no reason given."""
    valid = {1: (1, 2, 3, 7), 2: (1, 2), 3: (1, 2)}
    res, src, why = result.reject_result, result.reject_source, result.reject_reason
    if res in (1, 2) and src is not None and why is not None and why in valid.get(src, ()):
        return res, src, why
    return 0x02, 0x01, 0x01


def took_no_context(result: OpenResultHeader) -> bool:
    """The far agent's target SCP answered and accepted none of the proposed contexts."""
    return result.result == "failed" and result.failure == "no_contexts"


async def open_session(
    transport: NatsTransport,
    prefix: str,
    *,
    assoc_id: str,
    calling_ae_title: str,
    far_ae_title: str,
    proposals: list[ContextProposal],
    timeout_s: float,
) -> OpenResultHeader:
    """Send OPEN to the agents serving ``far_ae_title`` and return their answer (an accepted
    answer's session subject is checked)."""
    inbox, replies = transport.replies.new_inbox()
    try:
        hdr = OpenHeader(
            assoc_id=assoc_id,
            calling_ae_title=calling_ae_title,
            called_ae_title=far_ae_title,
            contexts=proposals,
            reply_inbox=inbox,
            timeout_s=timeout_s,
        )
        subject = subjects.open_subject(prefix, far_ae_title)
        nc = transport.client()
        # A request with no responders fails fast instead of waiting for the timeout.
        try:
            reply = await nc.request(subject, envelope.encode(hdr), timeout=timeout_s)
        except Exception as exc:
            name = type(exc).__name__
            if "NoResponders" in name:
                raise RelayError(statuses.FAR_SIDE_UNAVAILABLE) from None
            if "Timeout" in name:
                raise RelayError(statuses.FAR_SIDE_TIMEOUT) from None
            raise RelayError(statuses.FAR_SIDE_UNAVAILABLE, name) from None
        header, _ = envelope.decode(reply.data)
        if not isinstance(header, OpenResultHeader):
            raise RelayError(statuses.PROTOCOL_ERROR, "unexpected reply to open")
        if header.result == "accepted":
            check_session_subject(prefix, far_ae_title, header)
        return header
    except EnvelopeError as exc:
        metrics.WIRE_REJECTED.labels(reason=exc.reason).inc()
        raise RelayError(statuses.PROTOCOL_ERROR) from None
    finally:
        transport.replies.release(inbox)
        del replies


async def store_instance(
    transport: NatsTransport,
    session_subject: str,
    request: RequestHeader,
    command: bytes,
    source: Path | bytes,
    offset: int,
    *,
    window: int,
    chunk_ack_s: float,
    request_s: float,
) -> Dataset:
    """Relay one C-STORE (dataset at ``source[offset:]``) and return the far target's status."""
    inbox, replies = transport.replies.new_inbox()
    try:
        await send_dataset(
            transport,
            session_subject,
            inbox,
            replies,
            request,
            command,
            source,
            offset,
            window=window,
            ack_timeout_s=chunk_ack_s,
        )
        return await await_response(replies, request.op_id, request_s)
    except StreamAborted as exc:
        raise RelayError(FAILURES[exc.reason], exc.comment) from None
    finally:
        transport.replies.release(inbox)


async def close_session(transport: NatsTransport, session_subject: str, mode: str) -> None:
    with contextlib.suppress(Exception):
        await transport.publish(
            session_subject,
            envelope.encode(CloseHeader(mode=mode)),  # type: ignore[arg-type]
        )
