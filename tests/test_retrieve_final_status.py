"""The listener's side of C-GET/C-MOVE with real peers (pynetdicom, DCMTK storescp) and
Retrieved.suboperations as the handler: a retrieve whose far side ends in a failure after some
instances arrived (timeout, SCP abort, Refused) is reported as that failure, never as Success;
retrieved instances reach the destination exactly as they were received."""

from __future__ import annotations

import shutil
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
from dimse_relay.retrieve import Retrieved


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
