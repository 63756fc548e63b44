"""A C-GET whose far side ends in a failure after some instances arrived (timeout, SCP abort,
Refused) is reported as that failure to the SCU, never as Success: real pynetdicom peers with
the listener's Retrieved.suboperations as the C-GET handler."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
)
from tests.harness import LOOPBACK
from tests.harness.ports import free_port

from dimse_relay import statuses
from dimse_relay.retrieve import Retrieved


class _Spooled:
    def __init__(self, path: Path):
        self.path = path

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


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

    scp = AE()
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    scp.add_supported_context(CTImageStorage, scp_role=True, scu_role=True)
    port = free_port()
    server = scp.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_GET, handler)]
    )
    stored: list[str] = []
    try:
        scu = AE()
        scu.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        scu.add_requested_context(CTImageStorage)
        assoc = scu.associate(
            LOOPBACK,
            port,
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[
                (evt.EVT_C_STORE, lambda e: stored.append("x") or 0x0000),  # type: ignore[func-returns-value]
            ],
        )
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3"
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
        assoc.release()
    finally:
        server.shutdown()
    last = responses[-1][0]
    assert len(stored) == 2
    assert last.NumberOfCompletedSuboperations == 2
    if final == 0x0000:
        assert last.Status == 0x0000
    else:
        assert last.Status != 0x0000, "a partial retrieve must not be reported as Success"
        if final != 0xFE00:
            assert last.NumberOfFailedSuboperations >= max(1, failed_far)
