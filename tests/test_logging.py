"""Identifier logging for debugging (logging.log_identifiers) still redacts patient data:
names, IDs and birth dates never reach the log, other elements do."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)
from tests.harness import LOOPBACK
from tests.harness.agents import relay_pair
from tests.harness.dicom import PynetdicomFindSCP
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI


def test_identifier_logging_redacts_patient_data(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    scp = PynetdicomFindSCP("LOGSCP", matches=3).start()
    debug = {"level": "debug", "format": "json", "log_identifiers": True}
    cloud, edge, port = relay_pair(tmp_path, nats_server.url, pki, "LOGSCP", scp.port)
    cloud.config["logging"] = debug
    edge.config["logging"] = debug
    cloud.start()
    edge.start()
    try:
        ae = AE(ae_title="WORKSTATION")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate(LOOPBACK, port, ae_title="LOGSCP")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientName = "Secret^Query*"
        query.PatientID = "PID-4711"
        query.StudyInstanceUID = ""
        statuses = [
            int(s.Status)
            for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        ]
        assoc.release()
        assert statuses == [0xFF00] * 3 + [0x0000]
    finally:
        edge.stop()
        cloud.stop()
        scp.stop()
    logs = edge.log_path.read_text() + cloud.log_path.read_text()
    # identifiers were logged (the debugging switch works) ...
    assert "(0010,0010) PN [redacted]" in logs
    assert "1.2.826.0.1.3680043.10.1484.1" in logs  # a Study Instance UID of a match
    # ... but no patient name or ID, from the query or from the matches
    for secret in ("Secret^Query", "PID-4711", "Müller", "M\\u00fcller", "Jürgen"):
        assert secret not in logs, secret
