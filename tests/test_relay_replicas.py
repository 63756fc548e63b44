"""Two cloud agents serve the same AE title (replicas in one NATS queue group): every
association is handled by exactly one of them, so nothing is stored twice, and both share
the load. Killing one replica leaves the other serving."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.data
from pydicom.uid import generate_uid
from tests.harness import LOOPBACK
from tests.harness.agents import AgentProcess, nats_section
from tests.harness.dicom import PynetdicomSCP, pynetdicom_store
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI
from tests.harness.ports import free_port

CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))


def test_queue_group_replicas_never_both_store(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    scp = PynetdicomSCP("ARCHIVE").start()
    stores: list[str] = []
    scp.on_store = lambda event: stores.append(str(event.request.AffectedSOPInstanceUID))
    target = [{"ae_title": "ARCHIVE", "host": LOOPBACK, "port": scp.port}]
    replicas = [
        AgentProcess(
            f"cloud{i}",
            tmp_path / f"cloud{i}",
            {"nats": nats_section(nats_server.url, pki, pki.client("cloud")), "targets": target},
        ).start()
        for i in (1, 2)
    ]
    port = free_port()
    edge = AgentProcess(
        "edge",
        tmp_path / "edge",
        {
            "nats": nats_section(nats_server.url, pki, pki.client("edge")),
            "listeners": [{"ae_title": "ARCHIVE", "bind": LOOPBACK, "port": port}],
        },
    ).start()
    try:
        src = pydicom.dcmread(CT)
        sent = []
        for i in range(24):  # one association each
            src.SOPInstanceUID = generate_uid()
            src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
            f = tmp_path / f"i{i}.dcm"
            src.save_as(f)
            sent.append(str(src.SOPInstanceUID))
            assert pynetdicom_store(port, "ARCHIVE", [f]) == [0]
        assert sorted(stores) == sorted(sent)  # each exactly once
        handled = [
            r.metric("dimse_relay_associations_total", role="target", result="accepted")
            for r in replicas
        ]
        assert sum(handled) == 24
        assert all(h > 0 for h in handled), handled  # 2**-23 chance of a false failure

        replicas[0].kill()
        stores.clear()
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        src.save_as(tmp_path / "after.dcm")
        for _ in range(4):
            assert pynetdicom_store(port, "ARCHIVE", [tmp_path / "after.dcm"]) == [0]
        assert len(stores) == 4
    finally:
        edge.stop()
        for r in replicas:
            r.stop()
        scp.stop()
