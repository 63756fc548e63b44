"""The listener's side of C-GET/C-MOVE with real peers (pynetdicom, DCMTK storescp) and
Retrieved.suboperations as the handler: a retrieve whose far side ends in a failure after some
instances arrived (timeout, SCP abort, Refused) is reported as that failure, never as Success;
retrieved instances reach the destination exactly as they were received."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from tests.harness import LOOPBACK
from tests.harness.dicom import DcmtkStoreSCP, dataset_bytes
from tests.harness.ports import free_port

from dimse_relay import dicom, statuses
from dimse_relay.retrieve import RetrieveCollector, Retrieved, RetrieveStream


class _Spooled:
    """What RetrieveCollector keeps of an instance: its spool file, command and request."""

    def __init__(self, path: Path):
        self.path = path
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        self.command = Dataset()
        self.command.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
        self.command.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
        self.request = SimpleNamespace(transfer_syntax=str(meta.TransferSyntaxUID))

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _agent_send_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """What configure_pynetdicom sets in an agent: sub-operations send spooled files."""
    monkeypatch.setattr(Association, "send_c_store", dicom._send_spooled)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _instance(directory: Path, i: int) -> Path:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = directory / f"{i}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def c_get(handler: Any, on_store: Any) -> list[tuple[Dataset, Dataset | None]]:
    """A pynetdicom C-GET SCP running ``handler`` (as the listener's _on_get does), and a
    pynetdicom SCU storing the sub-operations with ``on_store``: the SCU's responses."""
    scp = AE()
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    scp.add_supported_context(CTImageStorage, scp_role=True, scu_role=True)
    port = free_port()
    server = scp.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_GET, handler)]
    )
    try:
        scu = AE()
        scu.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        scu.add_requested_context(CTImageStorage)
        assoc = scu.associate(
            LOOPBACK,
            port,
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3"
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
        assoc.release()
    finally:
        server.shutdown()
    return responses


@pytest.mark.parametrize(
    ("final", "failed_far"),
    [(statuses.RETRIEVE_OUT_OF_RESOURCES, 0), (0xFE00, 0), (0xB000, 2), (0x0000, 0)],
)
def test_final_status_after_partial_retrieve(tmp_path: Path, final: int, failed_far: int) -> None:
    def handler(event: evt.Event) -> object:
        result = Retrieved(spool_dir=tmp_path)
        result.instances = [_Spooled(_instance(tmp_path, i)) for i in range(2)]  # type: ignore[misc]
        status = Dataset()
        status.Status = final
        if failed_far:
            status.NumberOfFailedSuboperations = failed_far
        result.final = status
        yield from result.suboperations()

    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    last = c_get(handler, on_store)[-1][0]
    assert len(stored) == 2
    assert last.NumberOfCompletedSuboperations == 2
    if final == 0x0000:
        assert last.Status == 0x0000
    else:
        assert last.Status != 0x0000, "a partial retrieve must not be reported as Success"
        if final != 0xFE00:
            assert last.NumberOfFailedSuboperations >= max(1, failed_far)


def test_failed_instance_list_names_far_and_near_failures(tmp_path: Path) -> None:
    """The SCP ends the retrieve with a warning and its own Failed SOP Instance UID List; the
    SCU refuses one of the two instances relayed: the final list names both."""
    paths = [_instance(tmp_path, i) for i in range(2)]
    refused = str(pydicom.dcmread(paths[0]).SOPInstanceUID)

    def handler(event: evt.Event) -> object:
        result = Retrieved(spool_dir=tmp_path)
        result.instances = [_Spooled(p) for p in paths]  # type: ignore[misc]
        status = Dataset()
        status.Status = 0xB000
        status.NumberOfFailedSuboperations = 1
        result.final = status
        identifier = Dataset()
        identifier.FailedSOPInstanceUIDList = "1.2.3.999"
        result.final_identifier = identifier
        yield from result.suboperations()

    def on_store(event: evt.Event) -> int:
        return 0xA700 if str(event.request.AffectedSOPInstanceUID) == refused else 0x0000

    status, identifier = c_get(handler, on_store)[-1]
    assert status.Status == 0xB000
    assert status.NumberOfFailedSuboperations == 2  # the far one and the refused one
    assert status.NumberOfCompletedSuboperations == 1
    assert sorted(identifier.FailedSOPInstanceUIDList) == sorted(["1.2.3.999", refused])


# Files whose dataset pydicom would not write back byte for byte after reading it (RLE,
# JPEG 2000, a UN sequence, big endian), or cannot write at all (this JPEG Baseline one).
# (image_dfl.dcm would be another, but its deflated dataset has an odd length, which DIMSE
# forbids: storescp aborts the association, directly or through the relay.)
REENCODE_SENSITIVE = [
    "rtdose_rle.dcm",
    "693_J2KI.dcm",
    "UN_sequence.dcm",
    "ExplVR_BigEnd.dcm",
    "SC_rgb_jpeg.dcm",
]


def test_moved_instances_reach_the_destination_as_received(tmp_path: Path) -> None:
    """C-MOVE sub-operations from spooled instances to DCMTK storescp (bit-preserving): the
    stored datasets are the spooled bytes, in the spooled transfer syntax."""
    sources = [Path(pydicom.data.get_testdata_file(name)) for name in REENCODE_SENSITIVE]
    dest = DcmtkStoreSCP(tmp_path / "dest", "DESTSCP").start()

    def handler(event: evt.Event) -> object:
        result = Retrieved(spool_dir=tmp_path)
        for i, src in enumerate(sources):
            spool = tmp_path / f"spool{i}.dcm"
            shutil.copyfile(src, spool)
            result.instances.append(_Spooled(spool))  # type: ignore[arg-type]
        final = Dataset()
        final.Status = 0x0000
        result.final = final
        yield LOOPBACK, dest.port, {"contexts": result.contexts()}
        yield from result.suboperations()

    scp = AE(ae_title="PACS")
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    port = free_port()
    server = scp.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_MOVE, handler)]
    )
    try:
        scu = AE()
        scu.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = scu.associate(LOOPBACK, port, ae_title="PACS")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3"
        responses = list(
            assoc.send_c_move(query, "DESTSCP", StudyRootQueryRetrieveInformationModelMove)
        )
        assoc.release()
    finally:
        server.shutdown()
        dest.stop()
    last = responses[-1][0]
    assert last.Status == 0x0000
    assert last.NumberOfCompletedSuboperations == len(sources)
    stored = sorted(dataset_bytes(f) for f in dest.files())
    assert stored == sorted(dataset_bytes(src) for src in sources)
    assert not list(tmp_path.glob("spool*.dcm")), "spool files are discarded once sent"


def _pending(remaining: int, completed: int) -> Dataset:
    status = Dataset()
    status.Status = 0xFF00
    status.NumberOfRemainingSuboperations = remaining
    status.NumberOfCompletedSuboperations = completed
    status.NumberOfFailedSuboperations = 0
    status.NumberOfWarningSuboperations = 0
    return status


def _final(code: int, **counts: int) -> Dataset:
    status = Dataset()
    status.Status = code
    for name, value in counts.items():
        setattr(status, f"NumberOf{name}Suboperations", value)
    return status


def _streamed_get(
    collect: Any, on_store: Any, announced: bool = True
) -> list[tuple[Dataset, Dataset | None]]:
    """A C-GET whose handler is RetrieveStream (as the listener's _on_get), with ``collect``
    playing the far side: called with the collector on the collecting thread. ``announced``:
    whether the far side's counts must have let the stream start early."""
    holder: dict[str, Any] = {}

    def handler(event: evt.Event) -> object:
        collector = RetrieveCollector(None, holder["dir"])  # type: ignore[arg-type]
        stream = RetrieveStream(collector, lambda: collect(collector))
        announced = stream.announced(need_contexts=False)
        holder["announced"] = announced
        if announced is None:
            yield from stream.finished().suboperations()
        else:
            yield from stream.suboperations(announced)

    holder["dir"] = Path(tempfile.mkdtemp())
    try:
        responses = c_get(handler, on_store)
    finally:
        shutil.rmtree(holder["dir"], ignore_errors=True)
    assert (holder.get("announced") is not None) is announced
    return responses


def test_streamed_retrieve_sends_each_instance_before_the_far_side_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the far side's first pending response announces the count, the SCU gets each
    instance as soon as it is spooled: here the far side sends its second instance only
    after the SCU has stored the first (it would wait in vain if the listener collected the
    whole retrieve first)."""
    paths = [_instance(tmp_path, i) for i in range(2)]
    first_stored = threading.Event()
    waited: list[bool] = []

    def far_side(collector: RetrieveCollector) -> None:
        collector.result.instances.append(_Spooled(paths[0]))  # type: ignore[arg-type]
        collector.on_response(_pending(1, 1), None)
        waited.append(first_stored.wait(10))
        with collector.changed:
            collector.result.instances.append(_Spooled(paths[1]))  # type: ignore[arg-type]
            collector.changed.notify_all()
        collector.on_response(_final(0x0000, Completed=2, Failed=0, Warning=0), None)

    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        first_stored.set()
        return 0x0000

    responses = _streamed_get(far_side, on_store)
    assert "yielded further" not in caplog.text, "nothing is yielded after the last one"
    assert waited == [True], "the first instance did not reach the SCU before the far side ended"
    last = responses[-1][0]
    assert last.Status == 0x0000
    assert last.NumberOfCompletedSuboperations == 2
    assert len(stored) == 2
    assert not any(p.exists() for p in paths), "spool files are discarded once sent"


def test_streamed_retrieve_cut_short_is_not_success(tmp_path: Path) -> None:
    """Three announced, two arrived, the far side ends in a failure: the SCU gets a failure
    with the missing sub-operation counted as failed."""
    paths = [_instance(tmp_path, i) for i in range(2)]

    def far_side(collector: RetrieveCollector) -> None:
        collector.result.instances.append(_Spooled(paths[0]))  # type: ignore[arg-type]
        collector.on_response(_pending(2, 1), None)
        with collector.changed:
            collector.result.instances.append(_Spooled(paths[1]))  # type: ignore[arg-type]
        collector.on_response(_final(statuses.RETRIEVE_OUT_OF_RESOURCES, Remaining=1), None)

    stored: list[str] = []
    responses = _streamed_get(far_side, lambda e: stored.append("x") or 0x0000)
    last = responses[-1][0]
    assert len(stored) == 2
    assert last.Status == statuses.RETRIEVE_OUT_OF_RESOURCES
    assert last.NumberOfCompletedSuboperations == 2
    assert last.NumberOfFailedSuboperations == 1
    # not the Remaining of the last pending response: 2 + 1 are all three sub-operations
    assert last.get("NumberOfRemainingSuboperations") in (None, 0)


def test_streamed_retrieve_with_more_instances_than_announced_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An SCP that sends more instances than it announced: pynetdicom cannot send more than
    announced, and would report Success after the last announced one. The last announced
    instance therefore waits for the far side's end; it and the extra one are listed as
    failed in a Warning (their spool files removed), never half-sent or silently dropped."""
    paths = [_instance(tmp_path, i) for i in range(3)]
    uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]

    def far_side(collector: RetrieveCollector) -> None:
        collector.result.instances.append(_Spooled(paths[0]))  # type: ignore[arg-type]
        collector.on_response(_pending(1, 1), None)
        with collector.changed:
            collector.result.instances.extend(_Spooled(p) for p in paths[1:])  # type: ignore[misc]
        collector.on_response(_final(0x0000, Completed=3), None)

    stored: list[str] = []
    responses = _streamed_get(far_side, lambda e: stored.append("x") or 0x0000)
    assert len(stored) == 1
    final, identifier = responses[-1]
    assert final.Status == 0xB000
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfFailedSuboperations == 1  # pynetdicom counts the one still open
    assert final.get("NumberOfRemainingSuboperations") in (None, 0)
    assert identifier is not None
    assert list(identifier.FailedSOPInstanceUIDList) == uids[1:]
    assert "more instances than it announced" in caplog.text
    assert not any(p.exists() for p in paths)


def test_streamed_retrieve_of_exactly_the_announced_instances_is_success(tmp_path: Path) -> None:
    """The last announced instance waits for the far side's final response and is then sent:
    every instance stored, Success."""
    paths = [_instance(tmp_path, i) for i in range(2)]

    def far_side(collector: RetrieveCollector) -> None:
        collector.result.instances.append(_Spooled(paths[0]))  # type: ignore[arg-type]
        collector.on_response(_pending(1, 1), None)
        with collector.changed:
            collector.result.instances.append(_Spooled(paths[1]))  # type: ignore[arg-type]
            collector.changed.notify_all()
        time.sleep(0.2)  # the final response comes after the last instance
        collector.on_response(_final(0x0000, Completed=2), None)

    stored: list[str] = []
    responses = _streamed_get(far_side, lambda e: stored.append("x") or 0x0000)
    assert len(stored) == 2
    assert responses[-1][0].Status == 0x0000
    assert responses[-1][0].NumberOfCompletedSuboperations == 2


def test_retrieve_without_counts_is_collected_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A far side whose pending responses carry no counts: nothing is announced, the whole
    retrieve is collected and then sent, as before streaming."""
    paths = [_instance(tmp_path, i) for i in range(2)]

    def no_counts(collector: RetrieveCollector) -> None:
        pending = Dataset()
        pending.Status = 0xFF00
        pending.NumberOfRemainingSuboperations = 1  # without the other three counts
        with collector.changed:
            collector.result.instances.extend(_Spooled(p) for p in paths)  # type: ignore[misc]
        collector.on_response(pending, None)
        collector.on_response(_final(0x0000), None)

    stored: list[str] = []
    responses = _streamed_get(no_counts, lambda e: stored.append("x") or 0x0000, announced=False)
    assert len(stored) == 2
    assert responses[-1][0].Status == 0x0000
    assert "yielded further" not in caplog.text, "nothing is yielded after the last one"
