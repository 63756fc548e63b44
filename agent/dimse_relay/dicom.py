"""DICOM helpers shared by listeners and targets: pynetdicom settings, sockets, contexts,
command sets and Part 10 files whose dataset bytes are never re-encoded."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    QueryRetrievePresentationContexts,
    _config,
    evt,
)
from pynetdicom import association as pynetdicom_association
from pynetdicom import dimse_messages as pynetdicom_messages
from pynetdicom.association import Association
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import set_ae

from dimse_relay import command_set, reactor
from dimse_relay.config import DimseTLSConfig
from dimse_relay.envelope import ContextProposal, ContextResult

LOG = logging.getLogger("dimse_relay.dicom")

# pynetdicom's DIMSE layer puts every P-DATA primitive of a message on the DUL's unbounded
# send queue as fast as it can read the dataset file; with a slower peer a large instance ends
# up queued in memory. Senders wait while this many P-DATA PDUs are queued.
MAX_QUEUED_PDATA = 32
_original_send_pdu = DULServiceProvider.send_pdu


def _bounded_send_pdu(self: DULServiceProvider, primitive: Any) -> None:
    if isinstance(primitive, P_DATA) and threading.current_thread() is not self:
        queue = self.to_provider_queue
        while queue.qsize() >= MAX_QUEUED_PDATA and self.is_alive() and not self._kill_thread:
            time.sleep(0.0005)
    _original_send_pdu(self, primitive)


# Largest PDU the agent sends, whatever the peer announces (0, "no limit", would make
# pynetdicom send a whole instance as one PDU, built in memory). Smaller is always allowed.
MAX_PDU_SENT = 1 << 20
_peer_maximum_pdu = DIMSEServiceProvider.maximum_pdu_size


def _capped_maximum_pdu(self: DIMSEServiceProvider) -> int:
    peer = int(_peer_maximum_pdu.fget(self) or 0)  # type: ignore[attr-defined]
    return MAX_PDU_SENT if peer == 0 or peer > MAX_PDU_SENT else peer


_original_send_msg = DIMSEServiceProvider.send_msg


def _message_name(primitive: Any) -> str:
    table = _RQ_TO_MESSAGE if primitive.MessageIDBeingRespondedTo is None else _RSP_TO_MESSAGE
    message = table.get(type(primitive))
    return message.__name__.replace("_", "-") if message is not None else ""


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """pynetdicom's ``send_msg`` with the command set of a C-ECHO or C-STORE encoded by
    command_set.py; the P-DATA primitives are those pynetdicom's ``encode_msg`` yields.
    Falls back to pynetdicom when a handler wants the DIMSE message object
    (EVT_DIMSE_SENT) or a value needs pydicom."""
    name = _message_name(primitive)
    if name not in command_set.FAST_MESSAGES or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        _original_send_msg(self, primitive, context_id)
        return
    fragment = int(self.maximum_pdu_size) - 6
    if fragment < 1:  # no limit, or too small: pynetdicom's (one PDV, or its ValueError)
        _original_send_msg(self, primitive, context_id)
        return
    is_store_rq = name == "C-STORE-RQ"
    data_set = getattr(primitive, "DataSet", None) if is_store_rq else None
    data_path = getattr(primitive, "_dataset_path", None) if is_store_rq else None
    command = command_set.encode_primitive(
        primitive, name, has_data_set=data_set is not None or bool(data_path)
    )
    if command is None:
        _original_send_msg(self, primitive, context_id)
        return
    for pdata in _pdata(context_id, command, 1, fragment):
        self.dul.send_pdu(pdata)
    if data_set is not None:
        raw = data_set.getvalue()
        if raw:
            for pdata in _pdata(context_id, raw, 0, fragment):
                self.dul.send_pdu(pdata)
    elif data_path:
        path, offset = data_path
        with open(path, "rb") as fh:
            remaining = fh.seek(0, 2) - fh.seek(offset)
            while True:
                chunk = fh.read(min(fragment, remaining))
                remaining -= len(chunk)
                last = remaining <= 0 or not chunk
                self.dul.send_pdu(_one_pdata(context_id, (b"\x02" if last else b"\x00") + chunk))
                if last:
                    break


def _one_pdata(context_id: int, value: bytes) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, value))
    return pdata


def _pdata(context_id: int, raw: bytes, command_bit: int, fragment: int) -> Iterator[P_DATA]:
    """PDVs of one message part: the control header's bit 0 says command or data set,
    bit 1 the last fragment (PS3.8 E.2)."""
    for start in range(0, len(raw), fragment):
        last = start + fragment >= len(raw)
        header = command_bit | (2 if last else 0)
        yield _one_pdata(context_id, bytes((header,)) + raw[start : start + fragment])


_original_receive_primitive = DIMSEServiceProvider.receive_primitive
_original_decode = pynetdicom_messages.decode  # type: ignore[attr-defined]
_original_message_to_primitive = DIMSEMessage.message_to_primitive
_receiving = threading.local()


def _receive_primitive(self: DIMSEServiceProvider, primitive: P_DATA) -> None:
    """pynetdicom's ``receive_primitive``, with the command set of a complete C-ECHO or
    C-STORE message decoded by command_set.py unless a handler wants pynetdicom's message
    object (EVT_DIMSE_RECV)."""
    _receiving.fast = not self.assoc.get_handlers(evt.EVT_DIMSE_RECV)
    try:
        _original_receive_primitive(self, primitive)
    finally:
        _receiving.fast = False


def _decode_received(
    fp: BytesIO, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> Any:
    """``decode`` as pynetdicom's ``decode_msg`` calls it for a received command set."""
    if getattr(_receiving, "fast", False) and is_implicit_vr and is_little_endian and not deflated:
        fast = command_set.decode_command_set(fp.getvalue())
        if fast is not None:
            return fast
    return _original_decode(fp, is_implicit_vr, is_little_endian, deflated)


def _message_to_primitive(self: DIMSEMessage) -> Any:
    """``message_to_primitive`` for a command set decoded by command_set.py: the same values
    set on the same primitive, without pydicom elements."""
    received = getattr(self, "command_set", None)
    if not isinstance(received, command_set.ReceivedCommand):
        return _original_message_to_primitive(self)
    name = type(self).__name__
    primitive: Any = pynetdicom_messages._MSG_TO_PRIMITVE[name[: name.rfind("_R")]]()
    for keyword, value in received.values.items():
        setattr(primitive, keyword, value)
    data_keyword = pynetdicom_messages._DATASET_KEYWORDS.get(name)
    if data_keyword is not None:
        setattr(primitive, data_keyword, self.data_set)
    primitive._context_id = self.context_id
    primitive._dataset_path = self._data_set_path
    primitive._dataset_file = self._data_set_file
    return primitive


class _SpoolFileMeta(NamedTuple):
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


_original_create_file_meta = pynetdicom_messages.create_file_meta  # type: ignore[attr-defined]
_original_write_file_meta_info = pynetdicom_messages.write_file_meta_info  # type: ignore[attr-defined]


def _spool_file_meta(**kwargs: Any) -> Any:
    """``create_file_meta`` as pynetdicom's receiving side calls it for a C-STORE spool file:
    the values only, written by _write_spool_file_meta (pydicom for anything unusual)."""
    values = [kwargs.get(k) for k in ("sop_class_uid", "sop_instance_uid", "transfer_syntax")]
    texts = [v for v in values if isinstance(v, str)]
    if len(kwargs) != 3 or len(texts) != 3 or not command_set.meta_values_supported(*texts):
        return _original_create_file_meta(**kwargs)
    return _SpoolFileMeta(*[str(v) for v in values])


def _write_spool_file_meta(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
    if not isinstance(file_meta, _SpoolFileMeta):
        _original_write_file_meta_info(fp, file_meta, *args, **kwargs)
        return
    # pynetdicom has written the preamble and "DICM" already.
    fp.write(
        command_set.file_meta_bytes(
            *file_meta, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
        )[132:]
    )


_original_split_dataset = pynetdicom_association.split_dataset  # type: ignore[attr-defined]


def split_part10(path: Path) -> tuple[Dataset, int]:
    """pynetdicom's ``split_dataset`` (the File Meta and the dataset offset of a file it is
    to send), read directly where the file has the layout of the relay's and pynetdicom's
    spool files (command_set.read_file_meta) with ASCII UIDs; pydicom for any other."""
    with open(path, "rb") as fh:
        found = command_set.read_file_meta(fh)
    if found is not None:
        values, offset = found
        texts = [command_set.meta_text(values, e) or "" for e in (0x0002, 0x0003, 0x0010)]
        if all(texts):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID(texts[0])
            meta.MediaStorageSOPInstanceUID = UID(texts[1])
            meta.TransferSyntaxUID = UID(texts[2])
            return meta, offset
    return _original_split_dataset(path)


class SpooledInstance(Dataset):
    """An instance in a Part 10 spool file, given to pynetdicom's C-GET/C-MOVE SCP (which
    wants a Dataset for each sub-operation): its C-STORE sends the file's dataset bytes as
    they are (see _send_spooled). Decoding and encoding again would change some instances
    (deflate, RLE, some JPEG files, UN sequences) or fail for others."""

    def __init__(
        self, path: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
    ) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid  # for pynetdicom's Failed SOP Instance UID List
        self.SOPInstanceUID = sop_instance_uid
        self.spool_path = path
        self.uncompressed = not UID(transfer_syntax).is_compressed
        self.store_status: int | None = None  # the destination's status, once sent


_original_send_c_store = Association.send_c_store


def _send_spooled(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Any:
    if not isinstance(dataset, SpooledInstance):
        return _original_send_c_store(self, dataset, *args, **kwargs)
    try:
        result = _original_send_c_store(self, dataset.spool_path, *args, **kwargs)
    except ValueError:
        # No accepted context in the file's own transfer syntax. pynetdicom converts only
        # between uncompressed syntaxes: for one of those, send it converted, as it does for
        # a Dataset; a compressed instance fails this sub-operation.
        if not dataset.uncompressed:
            raise
        result = _original_send_c_store(self, dcmread(dataset.spool_path), *args, **kwargs)
        LOG.warning("sub-operation instance sent in another uncompressed transfer syntax")
    if "Status" in result:
        dataset.store_status = int(result.Status)
    return result


def send_c_store_bytes(
    assoc: Association,
    data: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    *,
    msg_id: int,
    priority: int,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> Dataset:
    """A C-STORE of a dataset held in memory, already encoded in ``transfer_syntax``: the
    steps pynetdicom's ``send_c_store`` takes for a spooled file (a context in exactly that
    transfer syntax, the same request, reactor pause and response handling), with the data
    set sent from memory rather than written to a file and read back. For the small
    instances a target gets inline: file creation is on the critical path of every relayed
    C-STORE otherwise, and costs from 0.05 to about 1 ms on a busy disk."""
    if not assoc.is_established:
        raise RuntimeError("the association with the SCP is not established")
    request = C_STORE()
    request.MessageID = msg_id
    request.Priority = priority
    request.MoveOriginatorApplicationEntityTitle = originator_aet
    request.MoveOriginatorMessageID = originator_id
    context = assoc._get_valid_context(
        sop_class_uid, transfer_syntax, "scu", allow_conversion=False
    )
    request.AffectedSOPClassUID = sop_class_uid
    request.AffectedSOPInstanceUID = sop_instance_uid
    request.DataSet = BytesIO(data)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    assoc.dimse.send_msg(request, int(context.context_id or 0))
    _context_id, response = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    if response is None:  # DIMSE timeout: pynetdicom aborts
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(response)


def configure_pynetdicom(log_identifiers: bool, poll_interval_s: float = 0.0002) -> None:
    """Process-wide pynetdicom settings the relay depends on."""
    global POLL_INTERVAL_S
    POLL_INTERVAL_S = poll_interval_s
    if DULServiceProvider.send_pdu is _original_send_pdu:  # once per process
        # Back-pressure on the DIMSE send path (see _bounded_send_pdu).
        DULServiceProvider.send_pdu = _bounded_send_pdu  # type: ignore[method-assign]
        AssociationSocket.recv = _bounded_recv  # type: ignore[method-assign]
        Association.send_c_store = _send_spooled  # type: ignore[method-assign]
        DIMSEServiceProvider.maximum_pdu_size = property(_capped_maximum_pdu)  # type: ignore[method-assign,assignment]
        # C-ECHO and C-STORE command sets and spool File Meta without pydicom datasets.
        DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
        DIMSEServiceProvider.receive_primitive = _receive_primitive  # type: ignore[method-assign]
        pynetdicom_messages.decode = _decode_received  # type: ignore[attr-defined,assignment]
        DIMSEMessage.message_to_primitive = _message_to_primitive  # type: ignore[method-assign]
        pynetdicom_messages.create_file_meta = _spool_file_meta  # type: ignore[attr-defined]
        pynetdicom_messages.write_file_meta_info = _write_spool_file_meta  # type: ignore[attr-defined]
        pynetdicom_association.split_dataset = split_part10  # type: ignore[attr-defined]
    # pynetdicom's reactor threads wait for work instead of polling (reactor.py).
    reactor.install(poll_interval_s)
    # Stream C-STORE datasets through temp files in both directions: bounded memory and the
    # dataset bytes are passed on exactly as received (no decode/re-encode).
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    # pynetdicom logs request/response identifiers (patient data) by default.
    _config.LOG_REQUEST_IDENTIFIERS = log_identifiers
    _config.LOG_RESPONSE_IDENTIFIERS = log_identifiers
    _config.LOG_HANDLER_LEVEL = "none"
    # pynetdicom's per-PDU INFO/DEBUG lines carry UIDs; keep them out unless debugging.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if log_identifiers else logging.WARNING)


# The short sleeps left inside pynetdicom once its reactors wait for work (reactor.py): spins
# while a reactor pauses, the DUL loop's delay where no wake-up pipe exists. Set by
# configure_pynetdicom.
POLL_INTERVAL_S = 0.0002


def _socket_of(assoc: Any) -> socket.socket | None:
    return getattr(assoc.dul.socket, "socket", None)


def _on_conn_open(event: evt.Event) -> None:
    assoc = event.assoc
    assoc.dul._run_loop_delay = POLL_INTERVAL_S
    sock = _socket_of(assoc)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # An accepted socket blocks forever by default: a peer that stops in the middle
            # of a PDU would hold the association thread (and a slot) indefinitely. pynetdicom
            # only reads once select() says data is there, so this bounds stalls, not idling.
            sock.settimeout(assoc.acse_timeout or 30)


def _on_established(event: evt.Event) -> None:
    sock = _socket_of(event.assoc)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(event.assoc.network_timeout or None)


# Bind these on every association: TCP_NODELAY (DIMSE over loopback or LAN without it waits
# for Nagle's delayed ACK on every small PDU, ~40-80 ms per message), short pynetdicom polls,
# and socket timeouts: acse_s until the association is up, network_s afterwards.
NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _on_conn_open)
ESTABLISHED_HANDLER = (evt.EVT_ESTABLISHED, _on_established)
SOCKET_HANDLERS = [NODELAY_HANDLER, ESTABLISHED_HANDLER]

# Longest PDU read before an association is established (an A-ASSOCIATE-RQ/AC is a few KiB);
# after it, the local maximum PDU length, but never less than 4 MiB: some SCUs ignore the
# negotiated maximum and pynetdicom has always accepted that. Unlimited (0) means 64 MiB.
MAX_PDU_BEFORE_ASSOCIATION = 1 << 20
MAX_PDU_TOLERATED = 4 << 20
MAX_PDU_UNLIMITED = 64 << 20
_original_recv = AssociationSocket.recv


def _bounded_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """pynetdicom reads a whole PDU into memory as announced by its length field: refuse a
    PDU longer than the limits above instead of buffering whatever a peer announces."""
    if nr_bytes > 6 and self._assoc is not None:
        assoc = self._assoc
        if not assoc.is_established:
            limit = MAX_PDU_BEFORE_ASSOCIATION
        else:
            local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
            limit = max(local.maximum_length or MAX_PDU_UNLIMITED, MAX_PDU_TOLERATED)
        if nr_bytes > limit:
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {limit}")
    return _original_recv(self, nr_bytes)


def dimse_tls_context(cfg: DimseTLSConfig) -> ssl.SSLContext:
    """Server-side TLS for a listener: TLS 1.2+, Python's (OpenSSL's) modern default ciphers,
    SCU certificates verified against ca_file when one is given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    if cfg.ca_file is not None:
        ctx.load_verify_locations(cafile=str(cfg.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# pynetdicom accepts, per proposed context, the first of these the SCU also proposed. Explicit
# VR Little Endian, then Big Endian, then Implicit, as DCMTK's storescp prefers by default: an
# SCU that offers an Implicit VR file in several contexts then converts it as it would for
# such a target (queued listeners during an outage, docs/queued-mode.md).
_UNCOMPRESSED_FIRST = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2"]
FALLBACK_TRANSFER_SYNTAXES = _UNCOMPRESSED_FIRST + [
    str(ts) for ts in ALL_TRANSFER_SYNTAXES if str(ts) not in _UNCOMPRESSED_FIRST
]


def fallback_contexts() -> list[PresentationContext]:
    """What a listener accepts when the far side cannot be asked: Verification, storage and
    query/retrieve, so that every request gets a relay failure status rather than a rejected
    presentation context."""
    contexts = [build_context(Verification, FALLBACK_TRANSFER_SYNTAXES)]
    for cx in QueryRetrievePresentationContexts:
        assert cx.abstract_syntax is not None
        contexts.append(build_context(cx.abstract_syntax, FALLBACK_TRANSFER_SYNTAXES))
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        contexts.append(build_context(cx.abstract_syntax, FALLBACK_TRANSFER_SYNTAXES))
    return contexts


def proposals_from_primitive(assoc: Any) -> list[ContextProposal]:
    """The presentation contexts the SCU proposed, with its role selection."""
    roles = {
        str(uid): (item.scu_role, item.scp_role)
        for uid, item in assoc.requestor.role_selection.items()
    }
    out = []
    for cx in assoc.requestor.primitive.presentation_context_definition_list:
        scu, scp = roles.get(str(cx.abstract_syntax), (None, None))
        out.append(
            ContextProposal(
                id=cx.context_id,
                abstract_syntax=str(cx.abstract_syntax),
                transfer_syntaxes=[str(ts) for ts in cx.transfer_syntax],
                scu_role=scu,
                scp_role=scp,
            )
        )
    return out


def contexts_from_results(results: list[ContextResult]) -> list[PresentationContext]:
    """Acceptor contexts that make pynetdicom accept exactly what the real target accepted."""
    merged: dict[str, PresentationContext] = {}
    for res in results:
        cx = merged.get(res.abstract_syntax)
        if cx is None:
            cx = build_context(res.abstract_syntax, [res.transfer_syntax])
            merged[res.abstract_syntax] = cx
        elif res.transfer_syntax not in cx.transfer_syntax:
            cx.add_transfer_syntax(res.transfer_syntax)
        if res.scu_role is not None:
            cx.scu_role = res.scu_role
        if res.scp_role is not None:
            cx.scp_role = res.scp_role
    return list(merged.values())


def requested_contexts(proposals: list[ContextProposal]) -> list[PresentationContext]:
    out = []
    for p in proposals:
        cx = build_context(p.abstract_syntax, p.transfer_syntaxes)
        out.append(cx)
    return out


def encode_command(ds: Dataset) -> bytes:
    """Command sets are always Implicit VR Little Endian (PS3.7 6.3.1)."""
    raw = encode(ds, True, True)
    if raw is None:
        raise ValueError("cannot encode command set")
    return raw


def request_command(primitive: Any, message: Any, data_attr: str | None) -> tuple[bytes, Any]:
    """The encoded command set of a DIMSE request primitive, without its data set.

    ``message`` is the matching pynetdicom message (C_STORE_RQ(), C_FIND_RQ() ...), and
    ``data_attr`` the primitive's data attribute ("DataSet" or "Identifier"; None for
    C-ECHO), which is left out of the conversion and returned as it is (a BytesIO, or None
    when spooled to a file).
    """
    data = getattr(primitive, data_attr) if data_attr else None
    name = type(message).__name__.replace("_", "-")
    if name in command_set.FAST_MESSAGES:
        fast = command_set.encode_primitive(
            primitive, name, has_data_set=bool(getattr(primitive, "_dataset_path", None))
        )
        if fast is not None:
            return fast, data
    if data_attr is None:
        message.primitive_to_message(primitive)
        return encode_command(message.command_set), None
    setattr(primitive, data_attr, None)
    try:
        message.primitive_to_message(primitive)
    finally:
        setattr(primitive, data_attr, data)
    return encode_command(message.command_set), data


def decode_command(raw: bytes | memoryview) -> Dataset:
    return decode(BytesIO(bytes(raw)), True, True)


def decode_dataset(raw: bytes, transfer_syntax: str) -> Dataset:
    """An identifier in the negotiated transfer syntax. Its elements stay raw (undecoded), so
    encoding it again gives back exactly these bytes, character sets included."""
    ts = UID(transfer_syntax)
    return decode(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    ts = UID(transfer_syntax)
    raw = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if raw is None:
        raise ValueError("cannot encode dataset")
    return raw


def write_part10_header(
    fh: BinaryIO, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> None:
    """Preamble, DICM and File Meta Information; the dataset bytes are appended unchanged."""
    values = (sop_class_uid, sop_instance_uid, transfer_syntax)
    if command_set.meta_values_supported(*values):
        fh.write(command_set.file_meta_bytes(*values, IMPLEMENTATION_UID, IMPLEMENTATION_VERSION))
        return
    meta = Dataset()  # pydicom for what file_meta_bytes does not write
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    fh.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fh, meta, enforce_standard=True)  # type: ignore[arg-type]


IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1484.1"
IMPLEMENTATION_VERSION = "DIMSE_RELAY_01"


def dataset_offset(path: Path) -> int:
    """Offset of the dataset in a Part 10 file written by pynetdicom or write_part10_header."""
    with open(path, "rb") as fh:
        found = command_set.read_file_meta(fh)
    if found is not None:
        return found[1]
    _meta, offset = _original_split_dataset(path)
    return int(offset)


def aet(value: str) -> str:
    return str(set_ae(value, "ae_title", False, False)).strip()
