"""C-FIND through the relay: pending responses streamed as they arrive, C-CANCEL relayed to
the real SCP, identifiers with non-ASCII character sets unchanged, Message IDs kept."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from tests.harness import LOOPBACK
from tests.harness.agents import AgentProcess, relay_pair
from tests.harness.dicom import PynetdicomFindSCP, dcmtk_query
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI


@dataclass
class FindRig:
    scp: PynetdicomFindSCP
    edge: AgentProcess
    cloud: AgentProcess
    port: int


@pytest.fixture(scope="module")
def find_rig(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, nats_server: NatsServer
) -> Iterator[FindRig]:
    work = tmp_path_factory.mktemp("find")
    scp = PynetdicomFindSCP("FINDSCP", matches=1000).start()
    cloud, edge, port = relay_pair(work, nats_server.url, pki, "FINDSCP", scp.port)
    cloud.start()
    edge.start()
    yield FindRig(scp, edge, cloud, port)
    edge.stop()
    cloud.stop()
    scp.stop()


def study_query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "*"
    ds.StudyInstanceUID = ""
    return ds


def test_find_streams_every_match_before_the_last_leaves_the_scp(find_rig: FindRig) -> None:
    find_rig.scp.matches = 1000
    find_rig.scp.delay_s = 0.002
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(LOOPBACK, find_rig.port, ae_title="FINDSCP")
    assert assoc.is_established
    received: list[tuple[float, int, Dataset | None]] = []
    for status, identifier in assoc.send_c_find(
        study_query(), StudyRootQueryRetrieveInformationModelFind, msg_id=4711
    ):
        received.append((time.monotonic(), int(status.Status), identifier))
    assoc.release()
    pending = [r for r in received if r[1] == 0xFF00]
    assert len(pending) == 1000
    assert received[-1][1] == 0x0000
    # streamed: the SCU had the first match before the SCP sent its last one
    assert received[0][0] < find_rig.scp.sent_at[-1]
    # UTF-8 identifiers unchanged, in order
    first = pending[0][2]
    assert first is not None and str(first.PatientName) == "Müller^Jürgen^0"
    assert [str(p[2].StudyInstanceUID) for p in pending] == [  # type: ignore[union-attr]
        f"1.2.826.0.1.3680043.10.1484.{i + 1}" for i in range(1000)
    ]
    assert find_rig.scp.calling_aets[-1] == "WORKSTATION"
    assert find_rig.scp.message_ids[-1] == 4711


@pytest.mark.parametrize(
    "model", [PatientRootQueryRetrieveInformationModelFind, ModalityWorklistInformationFind]
)
def test_find_other_information_models(find_rig: FindRig, model: str) -> None:
    find_rig.scp.matches = 3
    find_rig.scp.delay_s = 0
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(model)
    assoc = ae.associate(LOOPBACK, find_rig.port, ae_title="FINDSCP")
    assert assoc.is_established
    statuses = [int(s.Status) for s, _ in assoc.send_c_find(study_query(), model)]
    assoc.release()
    assert statuses == [0xFF00] * 3 + [0x0000]


def test_cancel_reaches_the_real_scp_and_the_scu_gets_its_cancel_status(
    find_rig: FindRig,
) -> None:
    find_rig.scp.matches = 1000
    find_rig.scp.delay_s = 0.01
    find_rig.scp.cancelled = False
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(LOOPBACK, find_rig.port, ae_title="FINDSCP")
    assert assoc.is_established
    statuses = []
    responses = assoc.send_c_find(
        study_query(), StudyRootQueryRetrieveInformationModelFind, msg_id=7
    )
    for status, _ in responses:
        statuses.append(int(status.Status))
        if len(statuses) == 5:
            cx = assoc._get_valid_context(StudyRootQueryRetrieveInformationModelFind, "", "scu")
            assoc.send_c_cancel(7, cx.context_id)
    assoc.release()
    assert find_rig.scp.cancelled
    assert statuses[-1] == 0xFE00
    assert 5 <= len(statuses) < 1000


def test_find_with_dcmtk_findscu(find_rig: FindRig, tmp_path: Path) -> None:
    find_rig.scp.matches = 25
    find_rig.scp.delay_s = 0
    result = dcmtk_query(
        "findscu",
        find_rig.port,
        "FINDSCP",
        "DCMTKFIND",
        ["QueryRetrieveLevel=STUDY", "PatientName=*", "StudyInstanceUID"],
        timeout=60,
    )
    out = result.output
    assert result.returncode == 0, out
    assert out.count("(Pending)") == 25, out[-2000:]
    assert "Received Final Find Response (Success)" in out, out[-2000:]
