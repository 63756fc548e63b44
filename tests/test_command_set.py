"""command_set.py gives the bytes pynetdicom and pydicom give, for every value it accepts."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom.data
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, encode, split_dataset

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


@settings(max_examples=150, deadline=None)
@given(
    sop_class=UIDS,
    sop_instance=UIDS,
    msg_id=US,
    priority=st.integers(0, 2),
    originator=st.none() | AETS,
    originator_id=US,
    with_data=st.booleans(),
)
def test_c_store_rq_as_pynetdicom_encodes_it(
    sop_class: str,
    sop_instance: str,
    msg_id: int,
    priority: int,
    originator: str | None,
    originator_id: int,
    with_data: bool,
) -> None:
    p = C_STORE()
    p.MessageID = msg_id
    p.AffectedSOPClassUID = sop_class
    p.AffectedSOPInstanceUID = sop_instance
    p.Priority = priority
    if originator is not None:
        p.MoveOriginatorApplicationEntityTitle = originator
        p.MoveOriginatorMessageID = originator_id
    p.DataSet = io.BytesIO(b"\x08\x00\x16\x00") if with_data else None
    fast = command_set.encode_primitive(p, "C-STORE-RQ", has_data_set=with_data)
    assert fast == reference(C_STORE_RQ(), p)


@settings(max_examples=150, deadline=None)
@given(
    sop_class=st.none() | UIDS,
    sop_instance=st.none() | UIDS,
    msg_id=US,
    status=US,
    comment=st.none() | COMMENTS,
    offending=st.none() | st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=3),
)
def test_c_store_rsp_as_pynetdicom_encodes_it(
    sop_class: str | None,
    sop_instance: str | None,
    msg_id: int,
    status: int,
    comment: str | None,
    offending: list[int] | None,
) -> None:
    p = C_STORE()
    p.MessageIDBeingRespondedTo = msg_id
    p.AffectedSOPClassUID = sop_class
    p.AffectedSOPInstanceUID = sop_instance
    p.Status = status
    p.ErrorComment = comment
    p.OffendingElement = offending
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
    command, data = dicom.request_command(store, C_STORE_RQ(), "DataSet")
    store.DataSet = None
    assert command == reference(C_STORE_RQ(), store)
    echo = C_ECHO()
    echo.MessageID = 9
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    command, data = dicom.request_command(echo, C_ECHO_RQ(), None)
    assert data is None
    assert command == reference(C_ECHO_RQ(), echo)


def test_values_it_does_not_handle_are_left_to_pynetdicom() -> None:
    p = C_STORE()
    p.MessageIDBeingRespondedTo = 1
    p.Status = 0xC000
    p.ErrorComment = "caf\u00e9"  # not ASCII
    assert command_set.encode_primitive(p, "C-STORE-RSP", False) is None
    p.ErrorComment = None
    p.OffendingElement = ["not a tag"]
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
        dicom._send_msg(fast, p, 3)  # type: ignore[arg-type]
        dicom._original_send_msg(slow, p, 3)  # type: ignore[arg-type]
        assert _pdvs(fast) == _pdvs(slow), (source, max_pdu, size)


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
