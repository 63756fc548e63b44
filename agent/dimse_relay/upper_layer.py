"""The DICOM Upper Layer on asyncio: PDUs read from and written to asyncio streams.

The agent's direct DIMSE path (``direct_listener.py`` and ``direct_target.py``) speaks to
DICOM peers with this module instead of through pynetdicom's threads, for associations that
only use C-ECHO and C-STORE. Association PDUs (A-ASSOCIATE-RQ/AC/RJ) are encoded and decoded
with pynetdicom's own PDU classes; P-DATA-TF, release and abort PDUs, which carry every
message, are handled here. Command sets of C-ECHO and C-STORE are read and written as raw
Implicit VR Little Endian elements (PS3.7 6.3.1, E.1).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLEMENTATION_VERSION = "DIMSE_RELAY_01"
# Largest P-DATA-TF PDU this module sends, whatever the peer accepts (as the pynetdicom path).
MAX_SEND_PDU = 1024 * 1024
# Smallest maximum PDU length of a peer served the direct way.
MIN_PEER_PDU = 1024
# Largest association PDU accepted (an A-ASSOCIATE-RQ with every context and syntax is ~150 KiB).
MAX_ASSOCIATION_PDU = 1024 * 1024

_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")

# Command Field values (PS3.7 E.1-1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101

TAG_GROUP_LENGTH = 0x00000000
TAG_AFFECTED_SOP_CLASS = 0x00000002
TAG_COMMAND_FIELD = 0x00000100
TAG_MESSAGE_ID = 0x00000110
TAG_MESSAGE_ID_RESPONDED = 0x00000120
TAG_DATA_SET_TYPE = 0x00000800
TAG_STATUS = 0x00000900
TAG_AFFECTED_SOP_INSTANCE = 0x00001000
# Status-related elements a response may carry besides Status (Offending Element, Error
# Comment, Error ID): passed on as the SCP wrote them.
STATUS_DETAIL_TAGS = (0x00000901, 0x00000902, 0x00000903)


class ULError(Exception):
    """The peer broke the Upper Layer protocol or went away; ``reason`` is a short label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- PDUs on asyncio streams ----------------------------------------------------------------


async def read_pdu(reader: asyncio.StreamReader, max_length: int) -> tuple[int, bytes]:
    """One PDU as (type, variable field). A PDU announcing more than ``max_length`` bytes is
    refused before it is read (ULError "oversized"); end of stream is ULError "closed"."""
    try:
        head = await reader.readexactly(6)
    except asyncio.IncompleteReadError as exc:
        raise ULError("closed", "connection closed") from exc
    pdu_type, _, length = _PDU_HEADER.unpack(head)
    if length > max_length:
        raise ULError("oversized", f"PDU of {length} bytes")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ULError("closed", "connection closed inside a PDU") from exc
    return pdu_type, body


def pdu(pdu_type: int, body: bytes) -> bytes:
    return _PDU_HEADER.pack(pdu_type, 0, len(body)) + body


RELEASE_RQ_PDU = pdu(RELEASE_RQ, b"\0\0\0\0")
RELEASE_RP_PDU = pdu(RELEASE_RP, b"\0\0\0\0")


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    """A-ABORT: source 0 service user, 2 service provider (with a reason, PS3.8 9.3.8)."""
    return pdu(ABORT, bytes((0, 0, source, reason)))


@dataclass
class PDV:
    context_id: int
    command: bool
    last: bool
    data: memoryview


def parse_pdata(body: bytes) -> list[PDV]:
    """The presentation data values of a P-DATA-TF variable field."""
    out = []
    view = memoryview(body)
    pos, end = 0, len(body)
    while pos < end:
        if pos + 6 > end:
            raise ULError("bad_pdu", "truncated PDV item")
        length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            raise ULError("bad_pdu", "PDV item length")
        out.append(
            PDV(context_id, bool(control & 1), bool(control & 2), view[pos + 6 : pos + 4 + length])
        )
        pos += 4 + length
    return out


def pdata_fragments(
    context_id: int, data: bytes | memoryview, command: bool, last: bool, max_pdu: int
) -> Iterator[bytes | memoryview]:
    """``data`` as P-DATA-TF PDUs of one PDV each, none longer than ``max_pdu`` (the peer's
    maximum length, 0 for unlimited, capped at MAX_SEND_PDU); the last PDV has the last
    fragment bit only if ``last``. Yields headers and payload slices to write in order."""
    # A peer announcing less than MIN_PEER_PDU is not served the direct way (the listener
    # leaves it to pynetdicom, the target fails the OPEN); the floor keeps this finite anyway.
    limit = max(min(max_pdu or MAX_SEND_PDU, MAX_SEND_PDU), MIN_PEER_PDU) - 6
    view = memoryview(data)
    total = len(view)
    pos = 0
    while True:
        size = min(limit, total - pos)
        final = pos + size >= total
        control = (1 if command else 0) | (2 if final and last else 0)
        yield _PDU_HEADER.pack(P_DATA_TF, 0, size + 6) + _PDV_HEADER.pack(
            size + 2, context_id, control
        )
        if size:
            yield view[pos : pos + size]
        pos += size
        if final:
            return


# --- association PDUs -----------------------------------------------------------------------


def decode_associate_rq(body: bytes) -> A_ASSOCIATE:
    rq = A_ASSOCIATE_RQ()
    rq.decode(pdu(ASSOCIATE_RQ, body))
    return rq.to_primitive()


def decode_associate_ac(body: bytes) -> A_ASSOCIATE:
    ac = A_ASSOCIATE_AC()
    ac.decode(pdu(ASSOCIATE_AC, body))
    return ac.to_primitive()


def decode_associate_rj(body: bytes) -> tuple[int, int, int]:
    if len(body) < 4:
        raise ULError("bad_pdu", "A-ASSOCIATE-RJ too short")
    return body[1], body[2], body[3]


def user_information(max_pdu: int, implementation_uid: str) -> list[Any]:
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = implementation_uid
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    return [length, uid, version]


@dataclass
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


def _associate_primitive(calling: str, called: str, max_pdu: int, impl_uid: str) -> A_ASSOCIATE:
    """What an A-ASSOCIATE-RQ and -AC share: application context, AE titles, user info."""
    prim = A_ASSOCIATE()
    prim.application_context_name = APPLICATION_CONTEXT
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    prim.user_information = user_information(max_pdu, impl_uid)
    return prim


def associate_rq_pdu(
    calling: str, called: str, contexts: list[ProposedContext], max_pdu: int, impl_uid: str
) -> bytes:
    prim = _associate_primitive(calling, called, max_pdu, impl_uid)
    out = []
    for proposed in contexts:
        cx = PresentationContext()
        cx.context_id = proposed.context_id
        cx.abstract_syntax = proposed.abstract_syntax
        for ts in proposed.transfer_syntaxes:
            cx.add_transfer_syntax(ts)
        out.append(cx)
    prim.presentation_context_definition_list = out
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    return bytes(rq.encode())


@dataclass
class ContextAnswer:
    """One presentation context of an A-ASSOCIATE-AC: result 0 with the accepted transfer
    syntax, or a rejection reason (1 user, 2 no reason, 3 abstract syntax, 4 transfer syntax)."""

    context_id: int
    result: int
    transfer_syntax: str = "1.2.840.10008.1.2"


def associate_ac_pdu(
    calling: str, called: str, answers: list[ContextAnswer], max_pdu: int, impl_uid: str
) -> bytes:
    prim = _associate_primitive(calling, called, max_pdu, impl_uid)
    prim.result = 0
    prim.result_source = 1
    results = []
    for answer in answers:
        cx = PresentationContext()
        cx.context_id = answer.context_id
        cx.result = answer.result
        cx.add_transfer_syntax(answer.transfer_syntax)
        results.append(cx)
    prim.presentation_context_definition_results_list = results
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(prim)
    return bytes(ac.encode())


def associate_rj_pdu(result: int, source: int, reason: int) -> bytes:
    prim = A_ASSOCIATE()
    prim.result = result
    prim.result_source = source
    prim.diagnostic = reason
    rj = A_ASSOCIATE_RJ()
    rj.from_primitive(prim)
    return bytes(rj.encode())


def is_storage_or_verification(abstract_syntax: str) -> bool:
    """Whether a presentation context can only carry C-ECHO or C-STORE (the direct path)."""
    if abstract_syntax == VERIFICATION:
        return True
    if abstract_syntax.startswith("1.2.840.10008.5.1.4.1.1."):
        return True
    try:
        return uid_to_service_class(abstract_syntax) is StorageServiceClass
    except Exception:
        return False


DEFAULT_IMPLEMENTATION_UID = PYNETDICOM_IMPLEMENTATION_UID


# --- command sets (Implicit VR Little Endian, group 0000) ----------------------------------


@dataclass
class Command:
    """A received command set: its elements as raw values, by tag."""

    raw: bytes
    elements: dict[int, bytes] = field(default_factory=dict)

    def us(self, tag: int) -> int | None:
        value = self.elements.get(tag)
        if value is None or len(value) != 2:
            return None
        return int(struct.unpack("<H", value)[0])

    def text(self, tag: int) -> str | None:
        value = self.elements.get(tag)
        if value is None or not value.isascii():
            return None
        return value.decode("ascii").rstrip("\0 ").strip()

    @property
    def command_field(self) -> int | None:
        return self.us(TAG_COMMAND_FIELD)

    @property
    def has_data_set(self) -> bool:
        return self.us(TAG_DATA_SET_TYPE) != NO_DATA_SET


def parse_elements(raw: bytes) -> dict[int, bytes]:
    """The elements of an Implicit VR Little Endian command set (group 0000 only), by tag."""
    elements: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 8 > end:
            raise ULError("bad_command", "truncated element")
        group, element, length = _ELEMENT.unpack_from(raw, pos)
        pos += 8
        if group != 0 or length == 0xFFFFFFFF or pos + length > end:
            raise ULError("bad_command", "element outside group 0000 or too long")
        elements[group << 16 | element] = raw[pos : pos + length]
        pos += length
    return elements


def parse_command(raw: bytes) -> Command:
    """A received command set; ULError "bad_command" if it has no Command Field or Command
    Data Set Type."""
    command = Command(raw, parse_elements(raw))
    if command.command_field is None or command.us(TAG_DATA_SET_TYPE) is None:
        raise ULError("bad_command", "no Command Field or Command Data Set Type")
    return command


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def encode_elements(elements: dict[int, bytes]) -> bytes:
    """A command set of these elements in tag order, with its group length."""
    body = b"".join(
        _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value
        for tag, value in sorted(elements.items())
        if tag != TAG_GROUP_LENGTH
    )
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def uid(value: str) -> bytes:
    return _even(value.encode("ascii"), b"\0")


def response(request: Command, status_elements: dict[int, bytes]) -> bytes:
    """The C-ECHO-RSP or C-STORE-RSP to ``request`` with Status and its details (raw values,
    as the far target's SCP gave them)."""
    answered = C_STORE_RSP if request.command_field == C_STORE_RQ else C_ECHO_RSP
    elements = {
        TAG_COMMAND_FIELD: us(answered),
        TAG_MESSAGE_ID_RESPONDED: request.elements.get(TAG_MESSAGE_ID, us(0)),
        TAG_DATA_SET_TYPE: us(NO_DATA_SET),
    }
    for tag in (TAG_AFFECTED_SOP_CLASS, TAG_AFFECTED_SOP_INSTANCE):
        if tag in request.elements:
            elements[tag] = request.elements[tag]
    elements.update(status_elements)
    return encode_elements(elements)


def status_elements(command: Command) -> dict[int, bytes]:
    """Status and the status details of a received response."""
    return {
        tag: command.elements[tag]
        for tag in (TAG_STATUS, *STATUS_DETAIL_TAGS)
        if tag in command.elements
    }


def status_body(elements: dict[int, bytes]) -> bytes:
    """The body of the relay's RESPONSE: the status elements as an Implicit VR command set
    without group length (what the pynetdicom path's encode_command of the status gives)."""
    return b"".join(
        _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value
        for tag, value in sorted(elements.items())
    )


def status_of(elements: dict[int, bytes]) -> int | None:
    value = elements.get(TAG_STATUS)
    return int(struct.unpack("<H", value)[0]) if value is not None and len(value) == 2 else None


def error_comment(text: str) -> bytes:
    return _even(text[:64].encode("ascii", "replace"), b" ")
