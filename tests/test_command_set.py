"""command_set.py gives the bytes pynetdicom and pydicom give, for every value it accepts."""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pydicom.data
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config
from pynetdicom import dimse_messages as pynetdicom_messages
from pynetdicom.dimse_messages import (
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    DIMSEMessage,
)
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, decode, encode, split_dataset

from dimse_relay import command_set, dicom

# pydicom's own test files (the package's data, no download).
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

UIDS = st.from_regex(r"1\.2(\.[1-9][0-9]{0,8}){1,12}", fullmatch=True).filter(
    lambda u: len(u) <= 64
)
US = st.integers(0, 0xFFFF)
AETS = st.text(
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. *>"), min_size=1, max_size=16
).filter(lambda s: s.strip())
COMMENTS = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"), max_size=64
)


def reference(message: Any, primitive: Any) -> bytes:
    message.primitive_to_message(primitive)
    raw = encode(message.command_set, True, True)
    assert raw is not None
    return raw


@st.composite
def store_requests(draw: st.DrawFn) -> C_STORE:
    """C-STORE request primitives, with and without Move Originator fields."""
    p = C_STORE()
    p.MessageID = draw(US)
    p.AffectedSOPClassUID = draw(UIDS)
    p.AffectedSOPInstanceUID = draw(UIDS)
    p.Priority = draw(st.integers(0, 2))
    originator = draw(st.none() | AETS)
    if originator is not None:
        p.MoveOriginatorApplicationEntityTitle = originator
        p.MoveOriginatorMessageID = draw(US)
    return p


@settings(max_examples=150, deadline=None)
@given(p=store_requests(), with_data=st.booleans())
def test_c_store_rq_as_pynetdicom_encodes_it(p: C_STORE, with_data: bool) -> None:
    p.DataSet = io.BytesIO(b"\x08\x00\x16\x00") if with_data else None
    fast = command_set.encode_primitive(p, "C-STORE-RQ", has_data_set=with_data)
    assert fast == reference(C_STORE_RQ(), p)


@st.composite
def store_responses(draw: st.DrawFn, offending: bool = True) -> C_STORE:
    """C-STORE response primitives, optional elements absent or present."""
    p = C_STORE()
    p.MessageIDBeingRespondedTo = draw(US)
    p.AffectedSOPClassUID = draw(st.none() | UIDS)
    p.AffectedSOPInstanceUID = draw(st.none() | UIDS)
    p.Status = draw(US)
    p.ErrorComment = draw(st.none() | COMMENTS)
    if offending:
        tags = st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=3)
        p.OffendingElement = draw(st.none() | tags)
    return p


@settings(max_examples=150, deadline=None)
@given(p=store_responses())
def test_c_store_rsp_as_pynetdicom_encodes_it(p: C_STORE) -> None:
    fast = command_set.encode_primitive(p, "C-STORE-RSP", has_data_set=False)
    assert fast == reference(C_STORE_RSP(), p)


@settings(max_examples=60, deadline=None)
@given(msg_id=US, status=US, comment=st.none() | COMMENTS)
def test_c_echo_as_pynetdicom_encodes_it(msg_id: int, status: int, comment: str | None) -> None:
    rq = C_ECHO()
    rq.MessageID = msg_id
    rq.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert command_set.encode_primitive(rq, "C-ECHO-RQ", False) == reference(C_ECHO_RQ(), rq)
    rsp = C_ECHO()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = "1.2.840.10008.1.1"
    rsp.Status = status
    rsp.ErrorComment = comment
    assert command_set.encode_primitive(rsp, "C-ECHO-RSP", False) == reference(C_ECHO_RSP(), rsp)


def test_request_command_as_before(tmp_path: Path) -> None:
    """The listener's request_command (fast path) against pynetdicom's conversion, for a
    C-STORE primitive as pynetdicom hands it to the handler (dataset spooled) and a C-ECHO."""
    store = C_STORE()
    store.MessageID = 3
    store.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    store.AffectedSOPInstanceUID = "1.2.3"
    store.Priority = 1
    store._dataset_path = tmp_path / "spooled.dcm"
    echo = C_ECHO()
    echo.MessageID = 9
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    expected_store, expected_echo = reference(C_STORE_RQ(), store), reference(C_ECHO_RQ(), echo)
    # The fast path must be the one that ran: pynetdicom's conversion is not called.
    with (
        mock.patch.object(C_STORE_RQ, "primitive_to_message", side_effect=AssertionError),
        mock.patch.object(C_ECHO_RQ, "primitive_to_message", side_effect=AssertionError),
    ):
        command, data = dicom.request_command(store, C_STORE_RQ(), "DataSet")
        assert command == expected_store
        command, data = dicom.request_command(echo, C_ECHO_RQ(), None)
    assert data is None
    assert command == expected_echo


def test_values_it_does_not_handle_are_left_to_pynetdicom() -> None:
    p = C_STORE()
    p.MessageIDBeingRespondedTo = 1
    p.Status = 0xC000
    p.ErrorComment = "caf\u00e9"  # not ASCII
    assert command_set.encode_primitive(p, "C-STORE-RSP", False) is None
    p.ErrorComment = None
    p.OffendingElement = ["not a tag"]
    assert command_set.encode_primitive(p, "C-STORE-RSP", False) is None
    p.OffendingElement = (0x0010, 0x0020)  # one tag to pydicom
    assert command_set.encode_primitive(p, "C-STORE-RSP", False) is None
    p.OffendingElement = None
    p.ErrorComment = "a\\b"  # a value delimiter
    assert command_set.encode_primitive(p, "C-STORE-RSP", False) is None
    assert command_set.encode_primitive(p, "C-FIND-RSP", False) is None


class _Collector:
    """Stands in for the DIMSE provider: what send_msg hands to the DUL."""

    def __init__(self, max_pdu: int, handlers: list[Any] | None = None) -> None:
        self.maximum_pdu_size = max_pdu
        self.sent: list[Any] = []
        self.dul = SimpleNamespace(send_pdu=self.sent.append)
        self.assoc = SimpleNamespace(
            get_handlers=lambda event: handlers or [],
            _abort_nonblocking=None,
            _abort_blocking=None,
            abort=None,
        )


def _pdvs(collector: _Collector) -> list[tuple[int, bytes]]:
    return [pdv for pdata in collector.sent for pdv in pdata.presentation_data_value_list]


@pytest.mark.parametrize("max_pdu", [16, 200, 16382, 1 << 20])
@pytest.mark.parametrize("size", [0, 1, 9, 4000, 70001])
def test_send_msg_yields_the_pdvs_pynetdicom_yields(
    tmp_path: Path, max_pdu: int, size: int
) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    spool = tmp_path / "x.dcm"
    with spool.open("wb") as fh:
        dicom.write_part10_header(fh, "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", "1.2.840.10008.1.2.1")
        fh.write(data)
    offset = dicom.dataset_offset(spool)
    for source in ("bytes", "file"):
        p = C_STORE()
        p.MessageID = 7
        p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        p.AffectedSOPInstanceUID = "1.2.3.4"
        if source == "bytes":
            p.DataSet = io.BytesIO(data)
        else:
            p._dataset_path = (spool, offset)
        fast, slow = _Collector(max_pdu), _Collector(max_pdu)
        dicom._original_send_msg(slow, p, 3)  # type: ignore[arg-type]
        # The fast path must be the one that ran: no fallback to pynetdicom's send_msg.
        with mock.patch.object(dicom, "_original_send_msg", side_effect=AssertionError):
            dicom._send_msg(fast, p, 3)  # type: ignore[arg-type]
        assert _pdvs(fast) == _pdvs(slow), (source, max_pdu, size)


def test_send_msg_leaves_unlimited_or_tiny_pdus_to_pynetdicom() -> None:
    p = C_ECHO()
    p.MessageID = 1
    p.AffectedSOPClassUID = "1.2.840.10008.1.1"
    fast, slow = _Collector(0), _Collector(0)
    dicom._send_msg(fast, p, 1)  # type: ignore[arg-type]
    dicom._original_send_msg(slow, p, 1)  # type: ignore[arg-type]
    assert _pdvs(fast) == _pdvs(slow) and len(_pdvs(fast)) == 1
    with pytest.raises(ValueError):
        dicom._send_msg(_Collector(5), p, 1)  # type: ignore[arg-type]


def test_send_msg_leaves_messages_with_sent_handlers_to_pynetdicom() -> None:
    p = C_ECHO()
    p.MessageIDBeingRespondedTo = 1
    p.Status = 0
    seen: list[Any] = []
    collector = _Collector(16382, handlers=[(seen.append, None)])
    dicom._send_msg(collector, p, 1)  # type: ignore[arg-type]
    assert [type(e.message).__name__ for e in seen] == ["C_ECHO_RSP"]  # pynetdicom's path
    assert _pdvs(collector)[0][1][0] == 3


@settings(max_examples=100, deadline=None)
@given(sop_class=UIDS, sop_instance=UIDS, ts=UIDS)
def test_file_meta_as_pydicom_writes_it(sop_class: str, sop_instance: str, ts: str) -> None:
    ours = command_set.file_meta_bytes(
        sop_class,
        sop_instance,
        ts,
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
    )
    theirs = io.BytesIO()
    theirs.write(b"\0" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=ts
    )
    write_file_meta_info(theirs, meta, enforce_standard=True)  # type: ignore[arg-type]
    assert ours == theirs.getvalue()
    found = command_set.read_file_meta(io.BytesIO(ours + b"\x08\x00"))
    assert found is not None
    values, offset = found
    assert offset == len(ours)
    assert command_set.meta_text(values, 0x0002) == sop_class
    assert command_set.meta_text(values, 0x0010) == ts


def test_split_part10_matches_pydicom_for_real_files() -> None:
    checked = 0
    for path in sorted(TEST_FILES.glob("*.dcm")):
        try:
            meta, offset = split_dataset(path)
        except Exception:
            continue
        if "TransferSyntaxUID" not in meta or "MediaStorageSOPClassUID" not in meta:
            continue
        ours, our_offset = dicom.split_part10(path)
        assert our_offset == offset, path.name
        for keyword in (
            "MediaStorageSOPClassUID",
            "MediaStorageSOPInstanceUID",
            "TransferSyntaxUID",
        ):
            assert ours.get(keyword) == meta.get(keyword), (path.name, keyword)
        assert dicom.dataset_offset(path) == offset, path.name
        checked += 1
    assert checked >= 20


def test_read_file_meta_refuses_other_layouts() -> None:
    assert command_set.read_file_meta(io.BytesIO(b"\0" * 200)) is None
    no_group_length = b"\0" * 128 + b"DICM" + b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"
    assert command_set.read_file_meta(io.BytesIO(no_group_length)) is None
    truncated = command_set.file_meta_bytes("1.2", "1.2.3", "1.2.840.10008.1.2", "1.2", "X")[:-5]
    assert command_set.read_file_meta(io.BytesIO(truncated)) is None


# --- receiving: the primitive pynetdicom's decode_msg/message_to_primitive give -------------


def _wire(message: Any, primitive: Any, max_pdu: int = 16382) -> list[Any]:
    """The P-DATA primitives pynetdicom's own encoder makes of ``primitive``."""
    message.primitive_to_message(primitive)
    message.context_id = 1
    return list(message.encode_msg(1, max_pdu))


_ASSOC = SimpleNamespace(_accepted_cx={1: SimpleNamespace(transfer_syntax=["1.2.840.10008.1.2"])})


@contextlib.contextmanager
def _agent_receive_path(fast: bool) -> Iterator[None]:
    """What configure_pynetdicom sets for receiving in an agent (``fast``), or pynetdicom's
    own receiving with spooled data sets, for this block only (the test process's own
    pynetdicom peers must stay unpatched)."""
    patches: list[tuple[Any, str, Any]] = [(_config, "STORE_RECV_CHUNKED_DATASET", True)]
    if fast:
        patches += [
            (pynetdicom_messages, "decode", dicom._decode_received),
            (DIMSEMessage, "message_to_primitive", dicom._message_to_primitive),
            (pynetdicom_messages, "create_file_meta", dicom._spool_file_meta),
            (pynetdicom_messages, "write_file_meta_info", dicom._write_spool_file_meta),
        ]
    else:
        patches += [
            (pynetdicom_messages, "decode", dicom._original_decode),
            (DIMSEMessage, "message_to_primitive", dicom._original_message_to_primitive),
            (pynetdicom_messages, "create_file_meta", dicom._original_create_file_meta),
            (pynetdicom_messages, "write_file_meta_info", dicom._original_write_file_meta_info),
        ]
    with contextlib.ExitStack() as stack:
        for target, name, value in patches:
            stack.enter_context(mock.patch.object(target, name, value))
        yield


def _receive(pdatas: list[Any], fast: bool) -> tuple[Any, Any]:
    """(primitive, command set object) as the DIMSE provider receives ``pdatas``."""
    message = DIMSEMessage()
    dicom._receiving.fast = fast
    try:
        with _agent_receive_path(fast):
            done = [message.decode_msg(pdata, _ASSOC) for pdata in pdatas]
            primitive = message.message_to_primitive()
    finally:
        dicom._receiving.fast = False
    assert done[-1] and not any(done[:-1])
    return primitive, message.command_set


def _values(primitive: Any) -> dict[str, Any]:
    out = {"type": type(primitive).__name__}
    for key, value in vars(primitive).items():
        if key in ("_dataset_file", "_dataset_path"):
            out[key] = value is not None
        elif isinstance(value, io.BytesIO):
            out[key] = value.getvalue()
        else:
            out[key] = value
    return out


def _assert_received_alike(pdatas: list[Any], expect_fast: bool) -> None:
    slow, slow_cs = _receive(pdatas, fast=False)
    fast, fast_cs = _receive(pdatas, fast=True)
    try:
        assert isinstance(slow_cs, Dataset)
        assert isinstance(fast_cs, command_set.ReceivedCommand) == expect_fast
        assert _values(fast) == _values(slow)
        if slow._dataset_path is not None:
            assert Path(fast._dataset_path).read_bytes() == Path(slow._dataset_path).read_bytes()
    finally:
        for p in (slow, fast):
            if getattr(p, "_dataset_file", None) is not None:
                p._dataset_file.close()
                Path(p._dataset_path).unlink()


@settings(max_examples=100, deadline=None)
@given(p=store_requests(), max_pdu=st.sampled_from([16, 100, 16382]))
def test_received_c_store_rq_as_pynetdicom_decodes_it(p: C_STORE, max_pdu: int) -> None:
    p.DataSet = io.BytesIO(b"\x08\x00\x16\x00\x04\x00\x00\x001.2\x00")
    _assert_received_alike(_wire(C_STORE_RQ(), p, max_pdu), expect_fast=True)


@settings(max_examples=100, deadline=None)
@given(p=store_responses(offending=False))
def test_received_c_store_and_echo_rsp_as_pynetdicom_decodes_them(p: C_STORE) -> None:
    msg_id, status, comment = p.MessageIDBeingRespondedTo, p.Status, p.ErrorComment
    # An Error Comment is pydicom's to decode.
    _assert_received_alike(_wire(C_STORE_RSP(), p), expect_fast=comment is None)
    e = C_ECHO()
    e.MessageIDBeingRespondedTo = msg_id
    e.AffectedSOPClassUID = "1.2.840.10008.1.1"
    e.Status = status
    _assert_received_alike(_wire(C_ECHO_RSP(), e), expect_fast=True)
    e = C_ECHO()
    e.MessageID = msg_id
    e.AffectedSOPClassUID = "1.2.840.10008.1.1"
    _assert_received_alike(_wire(C_ECHO_RQ(), e), expect_fast=True)


def _command(*elements: tuple[int, bytes]) -> bytes:
    return b"".join(
        struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value for tag, value in elements
    )


_US_RAW = [b"\x01\x00", b"\x30\x00", b"\x01\x01", b"\xff\xff", b"\x00\x00"]
_TEXT_RAW = [b"1.2.3\x00", b"1.2.840.10008.1.1\x00", b" 1.2 ", b"ST SCU  ", b"A", b"  B\t"]
_ODD_RAW = [b"", b"\x01\x00\x02\x00", b"1.2\\3.4", b"\xe9\xe9", b"A\\B ", b"\x00\x00\x00"]
_VR_RAW = {"US": _US_RAW, "UI": _TEXT_RAW, "AE": _TEXT_RAW}


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@settings(max_examples=400, deadline=None)
@given(st.data())
def test_decode_command_set_agrees_with_pydicom_where_it_decodes(data: st.DataObject) -> None:
    """On command sets near what the fast path takes: either None (pydicom's turn) or exactly
    the values pydicom reads."""
    field = data.draw(st.sampled_from([0x0001, 0x8001, 0x0030, 0x8030, 0x0020]))
    known = command_set._RECEIVED_FIELDS.get(field, {})
    elements = {0x00000100: struct.pack("<H", field)}
    if data.draw(st.integers(0, 9)):
        elements[0x00000800] = data.draw(st.sampled_from([b"\x01\x01", b"\x01\x00"]))
    for tag in data.draw(st.lists(st.sampled_from(sorted(known) or [0x00000110]), max_size=6)):
        vr = known.get(tag, ("", "US"))[1]
        odd = data.draw(st.integers(0, 7)) == 0
        elements[tag] = data.draw(st.sampled_from(_ODD_RAW if odd else _VR_RAW[vr]))
    if data.draw(st.integers(0, 7)) == 0:  # an element the message does not define
        elements[data.draw(st.sampled_from([0x00000902, 0x00000901, 0x00080016]))] = b"x "
    raw = _command(*sorted(elements.items()))
    if data.draw(st.integers(0, 9)) == 0:
        raw = raw[: -data.draw(st.integers(1, 6))]
    ours = command_set.decode_command_set(raw)
    if ours is None:
        return
    ds = decode(io.BytesIO(raw), True, True)
    assert ours.CommandField == ds.CommandField
    assert ours.CommandDataSetType == ds.CommandDataSetType
    theirs = {
        e.keyword: e.value
        for e in ds
        if e.keyword not in ("CommandGroupLength", "CommandField", "CommandDataSetType")
    }
    assert ours.values == theirs
    assert list(ours.values) == list(theirs)  # tag order, as message_to_primitive sets them


def test_received_command_sets_pydicom_must_decode() -> None:
    base = [(0x00000100, b"\x01\x80"), (0x00000800, b"\x01\x01"), (0x00000120, b"\x01\x00")]
    assert command_set.decode_command_set(_command(*base, (0x00000900, b"\x00\x00"))) is not None
    for extra in (
        (0x00000902, b"disk full"),  # Error Comment
        (0x00000900, b"\x00\x00\x00\x00"),  # Status with VM 2
        (0x00001000, b"1.2.\xe9"),  # not ASCII
        (0x00001000, b"1.2\\1.3"),  # VM 2
        (0x00001000, b""),  # empty
        (0x00080016, b"1.2"),  # not a command element
    ):
        assert command_set.decode_command_set(_command(*base, extra)) is None, extra
    assert command_set.decode_command_set(_command(*base)[:-1]) is None
    assert command_set.decode_command_set(_command((0x00000100, b"\x20\x00"))) is None  # C-FIND


def _store_rq(sop_instance: bytes) -> list[Any]:
    """A C-STORE-RQ with a data set whose Affected SOP Instance UID is ``sop_instance``."""
    command = _command(
        (0x00000002, b"1.2.840.10008.5.1.4.1.1.7\x00"),
        (0x00000100, b"\x01\x00"),
        (0x00000110, b"\x01\x00"),
        (0x00000700, b"\x00\x00"),
        (0x00000800, b"\x01\x00"),
        (0x00001000, sop_instance),
    )
    command = _command((0x00000000, struct.pack("<I", len(command)))) + command
    data = b"\x08\x00\x16\x00\x04\x00\x00\x001.2\x00"
    return [_one(0x03, command), _one(0x02, data)]


def _one(header: int, value: bytes) -> Any:
    from pynetdicom.pdu_primitives import P_DATA

    pdata = P_DATA()
    pdata.presentation_data_value_list.append((1, bytes((header,)) + value))
    return pdata


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("uid", [b"", b"\r", b"\x00", b"  "])
def test_empty_sop_instance_uid_fails_as_in_pynetdicom(uid: bytes) -> None:
    """pynetdicom refuses to spool a C-STORE without an Affected SOP Instance UID (pydicom
    will not write an empty File Meta element; the association is then ended): so does the
    agent."""
    for fast in (False, True):
        with pytest.raises(AttributeError, match="empty value"):
            _receive(_store_rq(uid), fast=fast)


def test_spool_file_meta_as_pynetdicom_writes_it() -> None:
    _assert_received_alike(_store_rq(b"1.2.3.4\x00"), expect_fast=True)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_part10_header_with_a_non_ascii_uid_written_by_pydicom() -> None:
    uid = "1.2.3.\u00e9"
    assert not command_set.meta_values_supported("1.2", uid, "1.2.840.10008.1.2")
    ours = io.BytesIO()
    dicom.write_part10_header(ours, "1.2", uid, "1.2.840.10008.1.2")
    theirs = io.BytesIO()
    theirs.write(b"\0" * 128 + b"DICM")
    meta = Dataset()
    meta.MediaStorageSOPClassUID = "1.2"
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    meta.ImplementationClassUID = dicom.IMPLEMENTATION_UID
    meta.ImplementationVersionName = dicom.IMPLEMENTATION_VERSION
    write_file_meta_info(theirs, meta, enforce_standard=True)  # type: ignore[arg-type]
    assert ours.getvalue() == theirs.getvalue()
    found = command_set.read_file_meta(io.BytesIO(ours.getvalue()))
    assert found is not None and command_set.meta_text(found[0], 0x0003) is None


def test_short_file_meta_group_length_left_to_pydicom(tmp_path: Path) -> None:
    """A group length that ends the File Meta early: pydicom reads on to the last group 2
    element, and so must the offset the agent sends the dataset from."""
    good = command_set.file_meta_bytes("1.2", "1.2.3", "1.2.840.10008.1.2", "1.2", "VERSION1")
    length = struct.unpack_from("<I", good, 140)[0]
    short = good[:140] + struct.pack("<I", length - 16) + good[144:]  # leaves out (0002,0013)
    path = tmp_path / "short.dcm"
    path.write_bytes(short + b"\x08\x00\x16\x00\x04\x00\x00\x001.2\x00")
    assert command_set.read_file_meta(io.BytesIO(path.read_bytes())) is None
    _meta, offset = split_dataset(path)
    assert offset == len(good)
    assert dicom.dataset_offset(path) == offset
    assert dicom.split_part10(path)[1] == offset
