"""The wire envelope: every NATS message between two agents is one envelope.

Layout (all integers big-endian)::

    offset  size  field
    0       4     magic b"DRLY"
    4       1     envelope version (1 or 2)
    5       1     kind (see Kind)
    6       2|4   header length H (2 bytes in version 1, 4 in version 2)
    8|10    H     header: UTF-8 JSON object, validated against the model of the kind
    ...     ...   body: opaque bytes (DICOM-encoded command set, dataset bytes, or a chunk)

A header that fits 2 bytes of length is sent as version 1, a longer one (an OPEN proposing
very many contexts) as version 2.

Nothing here executes or instantiates anything chosen by the sender: the header is plain JSON
checked field by field, the body is bytes. See docs/wire-protocol.md.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAGIC = b"DRLY"
# Version 2 has a 4-byte header length: an OPEN for an association proposing 128 contexts with
# every transfer syntax needs more than version 1's 2 bytes. Every other header is sent as
# version 1, which agents built before version 2 still read.
VERSION = 2
_PREFIX = struct.Struct(">4sBBI")
_PREFIX_V1 = struct.Struct(">4sBBH")
SUPPORTED_VERSIONS = (1, 2)
MAX_HEADER = 768 * 1024
# Largest dataset chunk a receiver accepts, whatever its own nats.chunk_size (config maximum).
MAX_CHUNK = 8 * 1024 * 1024


class Kind(enum.IntEnum):
    OPEN = 1
    OPEN_RESULT = 2
    REQUEST = 3
    CHUNK = 4
    ACK = 5
    RESPONSE = 6
    ERROR = 7
    CLOSE = 8
    CANCEL = 9
    QUEUED = 10


class EnvelopeError(ValueError):
    """A message that is not a valid envelope; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


AET = str


class ContextProposal(_Header):
    """One presentation context as the SCU proposed it."""

    id: int = Field(ge=1, le=255)
    abstract_syntax: str = Field(max_length=64)
    transfer_syntaxes: list[str] = Field(min_length=1, max_length=64)
    scu_role: bool | None = None
    scp_role: bool | None = None


class ContextResult(_Header):
    """One presentation context as the real target accepted it."""

    id: int = Field(ge=1, le=255)
    abstract_syntax: str = Field(max_length=64)
    transfer_syntax: str = Field(max_length=64)
    scu_role: bool | None = None
    scp_role: bool | None = None


class OpenHeader(_Header):
    assoc_id: str = Field(max_length=64)
    calling_ae_title: AET = Field(max_length=16)
    called_ae_title: AET = Field(max_length=16)
    contexts: list[ContextProposal] = Field(max_length=128)
    reply_inbox: str = Field(max_length=256)
    timeout_s: float = Field(default=10.0, gt=0, le=3600)


class OpenResultHeader(_Header):
    assoc_id: str = Field(max_length=64)
    result: Literal["accepted", "rejected", "failed"]
    session_subject: str | None = Field(default=None, max_length=256)
    accepted: list[ContextResult] = Field(default_factory=list, max_length=128)
    reject_result: int | None = None
    reject_source: int | None = None
    reject_reason: int | None = None
    failure: str | None = Field(default=None, max_length=64)
    comment: str | None = Field(default=None, max_length=256)


class RequestHeader(_Header):
    op_id: int = Field(ge=0)
    service: Literal["C-ECHO", "C-STORE", "C-FIND", "C-GET", "C-MOVE"]
    abstract_syntax: str = Field(max_length=64)
    transfer_syntax: str = Field(max_length=64)
    command_length: int = Field(ge=0)
    # Length of the dataset that follows: inline in this body, or in CHUNK messages.
    dataset_length: int = Field(ge=-1, description="-1: no dataset")
    inline: bool = True
    chunk_count: int = Field(default=0, ge=0)
    digest: str | None = Field(default=None, max_length=128)
    # Set on the C-STORE sub-operation instances a target streams back during a C-GET or
    # C-MOVE: the op_id of that retrieve request.
    parent_op_id: int | None = Field(default=None, ge=0)
    # The dataset follows in CHUNKs as the sender receives it from its SCU, its length not
    # yet known: dataset_length is then 0 and the final CHUNK carries the length.
    streamed: bool | None = None


class ChunkHeader(_Header):
    op_id: int = Field(ge=0)
    seq: int = Field(ge=0)
    offset: int = Field(ge=0)
    final: bool = False
    digest: str | None = Field(default=None, max_length=128, description="sha256 of the dataset")
    # Final chunk of a streamed REQUEST: the length of the whole dataset.
    dataset_length: int | None = Field(default=None, ge=0)


class AckHeader(_Header):
    op_id: int = Field(ge=0)
    seq: int = Field(ge=0)


class ResponseHeader(_Header):
    op_id: int = Field(ge=0)
    final: bool = True
    command_length: int = Field(ge=0)
    dataset_length: int = Field(default=-1, ge=-1)
    # First response of a relayed C-MOVE: the storage contexts the SCP accepted on the
    # target's C-GET association (the instances come in these), for the move destination.
    storage_contexts: list[ContextResult] | None = Field(default=None, max_length=128)


class ErrorHeader(_Header):
    op_id: int = Field(ge=-1)
    reason: Literal["unavailable", "timeout", "target_unreachable", "protocol"]
    comment: str = Field(max_length=256)


class CloseHeader(_Header):
    mode: Literal["release", "abort"]


class CancelHeader(_Header):
    op_id: int = Field(ge=0)


class QueuedHeader(_Header):
    """One C-STORE held in the edge queue (queued mode). The body is the command set, then
    the dataset when ``object_name`` is unset; else the dataset is that object of the edge
    bucket. Never sent between agents: it is the format of the queue stream's messages."""

    item_id: str = Field(max_length=64)
    listener_ae_title: AET = Field(max_length=16)
    calling_ae_title: AET = Field(max_length=16)
    called_ae_title: AET = Field(max_length=16)
    abstract_syntax: str = Field(max_length=64)
    transfer_syntax: str = Field(max_length=64)
    sop_instance_uid: str = Field(max_length=64)
    command_length: int = Field(ge=0)
    dataset_length: int = Field(ge=0)
    digest: str = Field(max_length=128, description="sha256 of the dataset bytes, hex")
    object_name: str | None = Field(default=None, max_length=64)
    queued_at: float = Field(ge=0, description="Unix time the listener accepted it")


HeaderModel = (
    OpenHeader
    | OpenResultHeader
    | RequestHeader
    | ChunkHeader
    | AckHeader
    | ResponseHeader
    | ErrorHeader
    | CloseHeader
    | CancelHeader
    | QueuedHeader
)

_MODELS: dict[Kind, type[BaseModel]] = {
    Kind.OPEN: OpenHeader,
    Kind.OPEN_RESULT: OpenResultHeader,
    Kind.REQUEST: RequestHeader,
    Kind.CHUNK: ChunkHeader,
    Kind.ACK: AckHeader,
    Kind.RESPONSE: ResponseHeader,
    Kind.ERROR: ErrorHeader,
    Kind.CLOSE: CloseHeader,
    Kind.CANCEL: CancelHeader,
    Kind.QUEUED: QueuedHeader,
}
_KINDS: dict[type[BaseModel], Kind] = {model: kind for kind, model in _MODELS.items()}


def encode(header: HeaderModel, body: bytes | bytearray | memoryview = b"") -> bytes:
    """Serialise one envelope."""
    kind = _KINDS[type(header)]
    raw = header.model_dump_json(exclude_none=True).encode("utf-8")
    if len(raw) > MAX_HEADER:
        raise ValueError("envelope header too large")
    if len(raw) <= 0xFFFF:
        prefix = _PREFIX_V1.pack(MAGIC, 1, int(kind), len(raw))
    else:
        prefix = _PREFIX.pack(MAGIC, VERSION, int(kind), len(raw))
    return b"".join((prefix, raw, body))


def decode(data: bytes) -> tuple[HeaderModel, memoryview]:
    """Parse one envelope; raise EnvelopeError with a metric reason for anything invalid."""
    if len(data) < _PREFIX_V1.size:
        raise EnvelopeError("truncated", f"{len(data)} bytes is shorter than the fixed prefix")
    if data[:4] != MAGIC:
        raise EnvelopeError("bad_magic", "not a dimse-relay envelope")
    version = data[4]
    if version not in SUPPORTED_VERSIONS:
        raise EnvelopeError("bad_version", f"envelope version {version} is not supported")
    prefix = _PREFIX if version == 2 else _PREFIX_V1
    if len(data) < prefix.size:
        raise EnvelopeError("truncated", f"{len(data)} bytes is shorter than the fixed prefix")
    _, _, kind_value, header_len = prefix.unpack_from(data)
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise EnvelopeError("bad_kind", f"unknown kind {kind_value}") from None
    if header_len > MAX_HEADER:
        raise EnvelopeError("bad_header", f"header of {header_len} bytes is too long")
    end = prefix.size + header_len
    if len(data) < end:
        raise EnvelopeError("truncated", "header runs past the end of the message")
    try:
        obj = json.loads(bytes(data[prefix.size : end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise EnvelopeError("bad_header", "header is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise EnvelopeError("bad_header", "header is not a JSON object")
    try:
        header = _MODELS[kind].model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EnvelopeError("bad_header", f"{kind.name} header {where}: {first['msg']}") from None
    return header, memoryview(data)[end:]  # type: ignore[return-value]
