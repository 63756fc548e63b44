"""C-GET and C-MOVE on the listener's side: collect what the far agent streams back.

The far agent retrieves from the real SCP and streams every instance back over NATS (a C-STORE
REQUEST with ``parent_op_id`` and CHUNKs, see docs/wire-protocol.md), interleaved with the
SCP's pending responses. :class:`RetrieveCollector` spools the instances (acknowledging each
chunk, answering each instance once it is on disk) and keeps the responses;
:meth:`Retrieved.suboperations` then feeds pynetdicom's C-GET/C-MOVE SCP, which performs the
C-STORE sub-operations to the SCU or the move destination.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import build_context

from dimse_relay import envelope, metrics, statuses
from dimse_relay.dicom import (
    SpooledInstance,
    decode_command,
    encode_command,
    request_command,
)
from dimse_relay.envelope import (
    AckHeader,
    ChunkHeader,
    ContextResult,
    ErrorHeader,
    RequestHeader,
    ResponseHeader,
)
from dimse_relay.streaming import SpooledDataset
from dimse_relay.transport import NatsTransport

LOG = logging.getLogger(__name__)


def is_instance_message(header: Any, op_id: int) -> bool:
    """Whether ``header`` belongs to an instance streamed back for retrieve ``op_id``."""
    if isinstance(header, RequestHeader):
        return header.parent_op_id == op_id and header.service == "C-STORE"
    return isinstance(header, ChunkHeader) and header.op_id >= 1 << 32


def split_request(req: Any, message: Any) -> tuple[bytes, bytes]:
    """The encoded command set of a C-FIND/C-GET/C-MOVE request and its raw identifier."""
    command, identifier = request_command(req, message, "Identifier")
    return command, identifier.getvalue() if identifier is not None else b""


@dataclass
class InstanceMessage:
    """A message of a sub-operation instance streamed back during a C-GET/C-MOVE."""

    header: Any
    body: memoryview
    reply: str


@dataclass(frozen=True)
class Announcement:
    """What the far side's first pending response tells before the last instance arrives:
    how many sub-operations the SCP will perform and (C-MOVE) the storage contexts of its
    C-GET association, which the instances will come in."""

    total: int
    storage_contexts: list[ContextResult] | None

    def destination_contexts(self) -> list[Any]:
        """Presentation contexts for the move destination: one per (SOP class, transfer
        syntax) the SCP accepted for the C-GET, so every instance can be sent as it is."""
        pairs = dict.fromkeys(
            (cx.abstract_syntax, cx.transfer_syntax) for cx in self.storage_contexts or []
        )
        return [build_context(sop, [ts]) for sop, ts in list(pairs)[:128]]


def announced_total(pending: Dataset) -> int | None:
    """The number of sub-operations a pending C-GET response announces (remaining plus those
    done), or None when it does not give all four counts (the total would be a guess)."""
    counts = [
        pending.get(f"NumberOf{kind}Suboperations")
        for kind in ("Remaining", "Completed", "Failed", "Warning")
    ]
    if any(count is None for count in counts):
        return None
    return sum(int(count) for count in counts)


@dataclass
class Retrieved:
    """What the far side of a C-GET/C-MOVE returned: instances spooled here, its last
    pending and its final response (or the relay's own failure)."""

    spool_dir: Path
    instances: list[SpooledDataset] = field(default_factory=list)
    pending: Dataset | None = None
    announced: Announcement | None = None
    final: Dataset | None = None
    final_identifier: Dataset | None = None
    failure: Dataset | None = None

    def contexts(self) -> list[Any]:
        """Presentation contexts for the move destination: one per (SOP class, transfer
        syntax) retrieved, so every instance is sent as it is, never converted."""
        pairs = sorted(
            {
                (str(i.command.AffectedSOPClassUID), i.request.transfer_syntax)
                for i in self.instances
            }
        )
        if not pairs:
            # Nothing to store, but pynetdicom still opens the destination association
            # when there is a final failure to report.
            return [build_context("1.2.840.10008.1.1")]
        return [build_context(sop, [ts]) for sop, ts in pairs[:128]]

    def _far_failed(self) -> int:
        if self.final is None:
            return 0
        return int(self.final.get("NumberOfFailedSuboperations", 0) or 0)

    def suboperations(self, decode: bool = False) -> Iterator[Any]:
        """pynetdicom's C-GET/C-MOVE handler protocol: the number of sub-operations, a
        (Pending, dataset) per instance, then the final status. Instances go out as received
        (SpooledInstance); ``decode`` reads them into Datasets instead, for a retrieve
        whose SOP class makes pynetdicom edit each instance (without bulk data)."""
        try:
            failure = self.failure
            if failure is None and self.final is None:
                failure = out_of_resources()
            if failure is not None:
                yield 1
                yield failure, None
                return
            assert self.final is not None
            far_failed = self._far_failed()
            code = int(self.final.Status)
            total = len(self.instances) + far_failed
            if code != 0x0000:
                # A retrieve that ended in a warning, failure or cancel (also one the relay
                # cut short) must keep at least one sub-operation open when its final status
                # is yielded: pynetdicom ignores yields after the last sub-operation and would
                # report Success for the instances that did arrive.
                remaining = int(self.final.get("NumberOfRemainingSuboperations", 0) or 0)
                total = len(self.instances) + max(1, far_failed + remaining)
            if total == 0:
                if code == 0x0000:
                    yield 0
                else:
                    yield 1
                    yield self.final, self.final_identifier
                return
            yield total
            near_failed: list[str] = []
            for spool in self.instances:
                yield from suboperation(spool, decode, near_failed)
            if total > len(self.instances):
                # sub-operations left open: the final status is the SCP's (pynetdicom takes
                # no yield after the last one, and then sends its own)
                yield self.final_status(near_failed)
        finally:
            for spool in self.instances:
                spool.discard()

    def final_status(self, near_failed: list[str]) -> tuple[Any, Dataset | None]:
        """The last yield to pynetdicom once every instance has been: the relay's failure,
        the SCP's own warning/failure/cancel with its Failed SOP Instance UID List
        (pynetdicom counts sub-operations still "remaining" as failed), or Success."""
        if self.failure is not None or self.final is None:
            return final_without_remaining(self.failure or out_of_resources()), None
        if int(self.final.Status) != 0x0000 or self._far_failed():
            return final_without_remaining(self.final), with_failed_instances(
                self.final_identifier, near_failed
            )
        return 0x0000, None


def final_without_remaining(status: Dataset) -> Dataset:
    """A final warning or failure status for pynetdicom without a Number of Remaining
    Sub-operations: pynetdicom counts the sub-operations still open as failed but would send
    the Remaining of the last pending response with it (so Remaining + Completed + Failed
    would exceed the total). A cancel keeps it: pynetdicom sets it right there."""
    if int(status.Status) == 0xFE00:
        return status
    final = copy.deepcopy(status)
    final.NumberOfRemainingSuboperations = None
    return final


def out_of_resources() -> Dataset:
    failure = Dataset()
    failure.Status = statuses.RETRIEVE_OUT_OF_RESOURCES
    return failure


def suboperation(
    spool: SpooledDataset, decode: bool, near_failed: list[str]
) -> Iterator[tuple[int, Dataset]]:
    """One C-STORE sub-operation for pynetdicom (SpooledInstance, or decoded), then the spool
    file is removed; an instance the destination did not take is added to ``near_failed``."""
    try:
        if decode:
            yield 0xFF00, dcmread(spool.path)
            return
        instance = spooled_instance(spool)
        yield 0xFF00, instance
        status = instance.store_status
        if status is None or metrics.status_class(status) == "failure":
            near_failed.append(str(instance.SOPInstanceUID))
    finally:
        spool.discard()


def with_failed_instances(identifier: Dataset | None, near_failed: list[str]) -> Dataset | None:
    """The SCP's final identifier with the near side's failed instances added to its Failed
    SOP Instance UID List. pynetdicom uses a list given in the identifier as it is; without
    one it sends its own, which already names the near-side failures."""
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier or not near_failed:
        return identifier
    return failed_list_with(identifier, near_failed)


def failed_list_with(identifier: Dataset | None, uids: list[str]) -> Dataset:
    """A copy of a final response's identifier (or a new one) whose Failed SOP Instance UID
    List also names ``uids``; the identifier itself is left as it is."""
    merged = copy.deepcopy(identifier) if identifier is not None else Dataset()
    listed: list[str] = []
    if "FailedSOPInstanceUIDList" in merged:
        value = merged.FailedSOPInstanceUIDList
        listed = [value] if isinstance(value, str) else [str(uid) for uid in value]
        del merged.FailedSOPInstanceUIDList
    merged.FailedSOPInstanceUIDList = list(dict.fromkeys(u for u in listed + uids if u))
    return merged


def spooled_instance(spool: SpooledDataset) -> SpooledInstance:
    command = spool.command
    return SpooledInstance(
        spool.path,
        str(command.AffectedSOPClassUID),
        str(command.AffectedSOPInstanceUID),
        spool.request.transfer_syntax,
    )


class RetrieveCollector:
    """Spools the instances of one retrieve and records its responses (pynetdicom thread)."""

    def __init__(self, transport: NatsTransport, spool_dir: Path):
        self.transport = transport
        self.spool_dir = spool_dir
        self.result = Retrieved(spool_dir=spool_dir)
        self._spooling: dict[int, SpooledDataset] = {}
        # Guards ``result`` when a RetrieveStream reads it from another thread.
        self.changed = threading.Condition()
        self.abandoned = False  # nobody will send what arrives from now on
        self._storage_contexts: list[ContextResult] | None = None

    def on_response(
        self,
        status: Dataset,
        dataset: Dataset | None,
        storage_contexts: list[ContextResult] | None = None,
    ) -> None:
        with self.changed:
            # A C-MOVE's storage contexts come with the far side's first response, which
            # need not be the one that gives the counts.
            self._storage_contexts = storage_contexts or self._storage_contexts
            if int(status.Status) in (0xFF00, 0xFF01):
                self.result.pending = status
                total = announced_total(status)
                if self.result.announced is None and total is not None:
                    self.result.announced = Announcement(total, self._storage_contexts)
            else:
                self.result.final = status
                self.result.final_identifier = dataset
            self.changed.notify_all()

    def fail(self, failure: Dataset) -> None:
        with self.changed:
            self.result.failure = failure
            self.changed.notify_all()

    def close(self) -> None:
        """Drop instances still arriving (the retrieve ended or failed)."""
        for spool in self._spooling.values():
            spool.discard()
        self._spooling.clear()

    def on_instance(self, item: InstanceMessage) -> None:
        """One message of an instance the far agent streams back: spool, ACK, answer."""
        header, body, reply = item.header, item.body, item.reply
        if isinstance(header, RequestHeader):
            try:
                command = decode_command(body[: header.command_length])
                spool = SpooledDataset(header, command, self.spool_dir, reply)
            except Exception:
                metrics.WIRE_REJECTED.labels(reason="bad_command").inc()
                self._reply(
                    reply,
                    ErrorHeader(
                        op_id=header.op_id, reason="protocol", comment="bad sub-operation command"
                    ),
                )
                return
            if header.inline:
                spool.add(body[header.command_length :])
                self._finish(spool, header.digest)
            else:
                self._spooling[header.op_id] = spool
            return
        in_progress = self._spooling.get(header.op_id)
        if in_progress is None:
            metrics.WIRE_REJECTED.labels(reason="unknown_operation").inc()
            return
        spool = in_progress
        why = spool.add_chunk(header, body)
        if why is not None:
            metrics.WIRE_REJECTED.labels(reason=why).inc()
            del self._spooling[header.op_id]
            self._reply(
                reply, ErrorHeader(op_id=header.op_id, reason="protocol", comment=f"chunk {why}")
            )
        elif header.final:
            del self._spooling[header.op_id]
            self._finish(spool, header.digest)
        else:
            self._reply(reply, AckHeader(op_id=header.op_id, seq=header.seq))

    def _finish(self, spool: SpooledDataset, digest: str | None) -> None:
        why = spool.finish(digest)
        op_id = spool.request.op_id
        if why is not None:
            metrics.WIRE_REJECTED.labels(reason=why).inc()
            self._reply(
                spool.reply, ErrorHeader(op_id=op_id, reason="protocol", comment=f"dataset {why}")
            )
            return
        with self.changed:
            if self.abandoned:
                spool.discard()
            else:
                self.result.instances.append(spool)
                self.changed.notify_all()
        ok = Dataset()
        ok.Status = 0x0000
        raw = encode_command(ok)
        self._reply(
            spool.reply,
            ResponseHeader(op_id=op_id, final=True, command_length=len(raw)),
            raw,
        )

    def _reply(self, subject: str, header: Any, body: bytes = b"") -> None:
        """Publish from a pynetdicom thread without waiting (order is kept by the loop)."""
        if subject:
            with contextlib.suppress(Exception):
                self.transport.submit(
                    self.transport.publish(subject, envelope.encode(header, body))
                )


class RetrieveStream:
    """A retrieve collected on its own thread while pynetdicom already sends the instances
    that have arrived: once the far side's first pending response has announced how many
    sub-operations there will be (and, for a C-MOVE, the contexts they come in), the SCU or
    move destination gets each instance as soon as it is spooled here."""

    def __init__(self, collector: RetrieveCollector, collect: Callable[[], None]):
        self.collector = collector
        self.done = False
        self._thread = threading.Thread(
            target=self._run, args=(collect,), name="retrieve-collect", daemon=True
        )
        self._thread.start()

    def _run(self, collect: Callable[[], None]) -> None:
        try:
            collect()
        finally:
            with self.collector.changed:
                self.done = True
                self.collector.changed.notify_all()

    def announced(self, need_contexts: bool) -> Announcement | None:
        """Wait for the announcement (None: the retrieve ended first, or the far side did not
        say what is needed to start early)."""
        result = self.collector.result
        with self.collector.changed:
            self.collector.changed.wait_for(lambda: self.done or result.announced is not None)
            announced = result.announced
        if announced is None or (need_contexts and not announced.storage_contexts):
            return None
        return announced

    @staticmethod
    def _more_than_announced(
        announced: Announcement, unsent: list[SpooledDataset]
    ) -> tuple[Dataset, Dataset]:
        LOG.warning(
            "SCP sent more instances than it announced; the last announced and the extra "
            "ones are not sent and are listed as failed",
            extra={"announced": announced.total, "count": len(unsent)},
        )
        status = Dataset()
        status.Status = statuses.RETRIEVE_SUBOPERATIONS_FAILED
        uids = [str(spool.command.AffectedSOPInstanceUID) for spool in unsent]
        return final_without_remaining(status), failed_list_with(None, uids)

    def finished(self) -> Retrieved:
        """The whole retrieve, once the far side has finished."""
        self._thread.join()
        return self.collector.result

    def _wait_instance(self, index: int) -> SpooledDataset | None:
        """The ``index``-th instance once it is spooled; None when the retrieve ended first."""
        instances = self.collector.result.instances
        with self.collector.changed:
            self.collector.changed.wait_for(lambda: self.done or len(instances) > index)
            return instances[index] if len(instances) > index else None

    def _wait_finished(self) -> None:
        with self.collector.changed:
            self.collector.changed.wait_for(lambda: self.done)

    def suboperations(self, announced: Announcement, decode: bool = False) -> Iterator[Any]:
        """pynetdicom's C-GET/C-MOVE handler protocol, streamed: the announced number of
        sub-operations, each instance as soon as it is spooled, then the final status.

        Once the last announced sub-operation is done pynetdicom ends the retrieve with its
        own final status, so the last announced instance waits for the far side's final
        response: if the SCP sent more instances than it announced, the retrieve ends with
        Warning 0xB000 naming that instance and the extra ones as failed instead."""
        result = self.collector.result
        index = 0
        near_failed: list[str] = []
        try:
            yield announced.total
            while True:
                spool = self._wait_instance(index)
                if spool is None:
                    break
                index += 1
                if index == announced.total:
                    self._wait_finished()
                    if len(result.instances) > index:
                        unsent = self._more_than_announced(announced, result.instances[index - 1 :])
                        spool.discard()  # the extra ones are discarded below
                        yield unsent
                        return
                yield from suboperation(spool, decode, near_failed)
                if index == announced.total:
                    return  # pynetdicom sends its own final status (it takes no further yield)
            yield result.final_status(near_failed)
        finally:
            with self.collector.changed:
                self.collector.abandoned = True
                left = result.instances[index:]
            for spool in left:
                spool.discard()
