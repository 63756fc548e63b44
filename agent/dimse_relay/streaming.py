"""Datasets over NATS, in either direction: the sender's chunk loop with its window of
unacknowledged chunks, and the receiver's spool file with its order, length and digest checks.

C-STORE requests go listener -> target; C-GET/C-MOVE sub-operation instances go target ->
listener. Both use these two pieces, so the rules in docs/wire-protocol.md hold both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from pydicom.dataset import Dataset

from dimse_relay import envelope, metrics
from dimse_relay.dicom import decode_command, write_part10_header
from dimse_relay.envelope import (
    AckHeader,
    ChunkHeader,
    EnvelopeError,
    ErrorHeader,
    RequestHeader,
    ResponseHeader,
)
from dimse_relay.transport import NatsTransport


class StreamAborted(Exception):
    """The receiver answered with an ERROR, or did not acknowledge in time."""

    def __init__(self, reason: str, comment: str):
        super().__init__(comment)
        self.reason = reason
        self.comment = comment


def far_side_gone(msg: Any) -> bool:
    """NATS's "no responders" status (503) on a reply inbox: nobody subscribes to the subject
    a message with that inbox as its reply went to (the far session or agent is gone)."""
    headers = getattr(msg, "headers", None) or {}
    return bool(headers.get("Status") == "503")


FAR_SIDE_GONE = "far session gone (no responders)"


async def await_ack(replies: asyncio.Queue[Any], op_id: int, timeout_s: float) -> None:
    """Wait for the ACK of one chunk of ``op_id``; an ERROR for it aborts the stream."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StreamAborted("timeout", "chunk not acknowledged")
        try:
            msg = await asyncio.wait_for(replies.get(), remaining)
        except TimeoutError:
            raise StreamAborted("timeout", "chunk not acknowledged") from None
        if far_side_gone(msg):
            raise StreamAborted("gone", FAR_SIDE_GONE)
        try:
            header, _ = envelope.decode(msg.data)
        except EnvelopeError as exc:
            metrics.WIRE_REJECTED.labels(reason=exc.reason).inc()
            continue
        if isinstance(header, AckHeader) and header.op_id == op_id:
            return
        if isinstance(header, ErrorHeader) and header.op_id == op_id:
            raise StreamAborted(header.reason, header.comment)


async def await_response(replies: asyncio.Queue[Any], op_id: int, timeout_s: float) -> Dataset:
    """The final RESPONSE to ``op_id`` as a status dataset; an ERROR or silence aborts."""
    header, body = await await_final(replies, op_id, timeout_s)
    try:
        status = decode_command(body[: header.command_length])
    except Exception:
        metrics.WIRE_REJECTED.labels(reason="bad_command").inc()
        raise StreamAborted("protocol", "undecodable response") from None
    if "Status" not in status:
        metrics.WIRE_REJECTED.labels(reason="bad_command").inc()
        raise StreamAborted("protocol", "response without a status")
    return status


async def await_final(
    replies: asyncio.Queue[Any], op_id: int, timeout_s: float
) -> tuple[ResponseHeader, memoryview]:
    """The RESPONSE to ``op_id`` with its body; an ERROR or silence aborts (StreamAborted)."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StreamAborted("timeout", "no response")
        try:
            msg = await asyncio.wait_for(replies.get(), remaining)
        except TimeoutError:
            raise StreamAborted("timeout", "no response") from None
        if far_side_gone(msg):
            raise StreamAborted("gone", FAR_SIDE_GONE)
        try:
            header, body = envelope.decode(msg.data)
        except EnvelopeError as exc:
            metrics.WIRE_REJECTED.labels(reason=exc.reason).inc()
            continue
        if getattr(header, "op_id", None) != op_id:
            continue
        if isinstance(header, ErrorHeader):
            raise StreamAborted(header.reason, header.comment)
        if isinstance(header, ResponseHeader):
            return header, body


async def send_dataset(
    transport: NatsTransport,
    subject: str,
    inbox: str,
    replies: asyncio.Queue[Any],
    request: RequestHeader,
    command: bytes,
    source: Path | bytes,
    offset: int,
    *,
    window: int,
    ack_timeout_s: float,
) -> None:
    """Publish ``request`` with the dataset at ``source[offset:]`` (a file, or bytes already in
    memory): inline when it fits one chunk, else as numbered chunks with at most ``window``
    unacknowledged. Returns once the last byte is published; the caller then waits for the
    response on ``replies``."""
    chunk_size = transport.chunk_size
    length = request.dataset_length
    opened = io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")
    with opened as fh:
        fh.seek(offset)
        if length <= chunk_size:
            data = fh.read(length)
            hdr = request.model_copy(
                update={"inline": True, "digest": hashlib.sha256(data).hexdigest()}
            )
            await transport.publish(subject, envelope.encode(hdr, command + data), reply=inbox)
            metrics.BYTES.labels(direction="sent").inc(length)
            return
        count = -(-length // chunk_size)
        hdr = request.model_copy(update={"inline": False, "chunk_count": count})
        await transport.publish(subject, envelope.encode(hdr, command), reply=inbox)
        hasher = hashlib.sha256()
        in_flight = 0
        sent = 0
        for seq in range(count):
            while in_flight >= window:
                await await_ack(replies, request.op_id, ack_timeout_s)
                in_flight -= 1
            data = fh.read(min(chunk_size, length - sent))
            hasher.update(data)
            final = seq == count - 1
            chunk = ChunkHeader(
                op_id=request.op_id,
                seq=seq,
                offset=sent,
                final=final,
                digest=hasher.hexdigest() if final else None,
            )
            await transport.publish(subject, envelope.encode(chunk, data), reply=inbox)
            sent += len(data)
            metrics.BYTES.labels(direction="sent").inc(len(data))
            if not final:
                in_flight += 1


class SpooledDataset:
    """A dataset arriving over NATS, written to a Part 10 file in ``spool_dir`` (File Meta
    built from the request, dataset bytes appended exactly as received)."""

    def __init__(self, request: RequestHeader, command: Dataset, spool_dir: Path, reply: str):
        self.request = request
        self.command = command
        self.reply = reply
        self.next_seq = 0
        self.received = 0
        self._io_error = False
        self._digest = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix="dataset-", suffix=".dcm", dir=spool_dir)
        self.path = Path(name)
        self._fh: IO[bytes] = os.fdopen(fd, "wb")
        try:
            write_part10_header(
                self._fh,
                str(command.AffectedSOPClassUID),
                str(command.AffectedSOPInstanceUID),
                request.transfer_syntax,
            )
        except Exception:
            self.discard()
            raise

    def add(self, data: bytes | memoryview) -> None:
        if self._io_error:
            return
        try:
            self._fh.write(data)
        except OSError:  # disk full, I/O error: reported by add_chunk / finish as "io_error"
            self._io_error = True
            return
        self._digest.update(data)
        self.received += len(data)
        metrics.BYTES.labels(direction="received").inc(len(data))

    def check_chunk(self, chunk: ChunkHeader, size: int) -> str | None:
        """Why ``chunk`` cannot be the next one (a metric reason), or None."""
        if chunk.seq != self.next_seq or chunk.offset != self.received:
            return "out_of_order"
        if size > envelope.MAX_CHUNK:
            return "oversized"
        if not self.request.streamed and self.received + size > self.request.dataset_length:
            return "oversized"
        return None

    def add_chunk(self, chunk: ChunkHeader, body: memoryview) -> str | None:
        """Append one chunk; a metric reason if it was rejected (the spool is discarded)."""
        why = self.check_chunk(chunk, len(body))
        if why is None:
            self.add(body)
            why = "io_error" if self._io_error else None
        if why is not None:
            self.discard()
            return why
        self.next_seq += 1
        return None

    def finish(self, digest: str | None, total: int | None = None) -> str | None:
        """Close the file; a metric reason if length or digest are wrong (then discarded).
        ``total``: the length a streamed request's final chunk announced."""
        try:
            self._fh.close()
        except OSError:
            self._io_error = True
        if self._io_error:
            self.discard()
            return "io_error"
        expected = total if self.request.streamed else self.request.dataset_length
        if self.received != expected:
            self.discard()
            return "length_mismatch"
        if digest != self._digest.hexdigest():
            self.discard()
            return "bad_digest"
        return None

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
