"""Fixtures: a throw-away PKI, a real TLS nats-server, real agents and real DICOM peers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.harness import kill_leftovers
from tests.harness.agents import AgentProcess, nats_section
from tests.harness.dicom import DcmtkStoreSCP, PynetdicomSCP
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI, make_pki
from tests.harness.ports import free_port

# An AE title with every character that is special in NATS subjects.
ODD_AET = "AI.SEG*>1 X"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Nothing a test started outlives the run, even when a fixture failed half-way."""
    kill_leftovers()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"), pki).start()
    yield server
    server.stop()


@dataclass
class Relay:
    """Edge agent (listeners) and cloud agent (targets) on one NATS server, with their SCPs."""

    edge: AgentProcess
    cloud: AgentProcess
    dcmtk_scp: DcmtkStoreSCP
    direct_scp: DcmtkStoreSCP
    py_scp: PynetdicomSCP
    odd_scp: PynetdicomSCP
    status_scp: PynetdicomSCP
    ct_only_scp: PynetdicomSCP  # only CT Image Storage, uncompressed
    port: int  # the edge agent's listener port (all listeners share it)


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, nats_server: NatsServer
) -> Iterator[Relay]:
    work = tmp_path_factory.mktemp("relay")
    dcmtk_scp = DcmtkStoreSCP(work / "dcmtk", "CLOUDSCP").start()
    direct_scp = DcmtkStoreSCP(work / "direct", "CLOUDSCP").start()
    py_scp = PynetdicomSCP("PYSCP").start()
    odd_scp = PynetdicomSCP("ODDSCP").start()
    status_scp = PynetdicomSCP("STATUSSCP", status=0xA702).start()
    ct_only_scp = PynetdicomSCP(
        "CTONLY", contexts=[(CT_IMAGE_STORAGE, [IMPLICIT_VR_LE, EXPLICIT_VR_LE])]
    ).start()
    targets = [
        {"ae_title": "CLOUDSCP", "host": "127.0.0.1", "port": dcmtk_scp.port},
        {"ae_title": "PYSCP", "host": "127.0.0.1", "port": py_scp.port},
        {"ae_title": ODD_AET, "host": "127.0.0.1", "port": odd_scp.port},
        {"ae_title": "STATUSSCP", "host": "127.0.0.1", "port": status_scp.port},
        {"ae_title": "CTONLY", "host": "127.0.0.1", "port": ct_only_scp.port},
    ]
    cloud = AgentProcess(
        "cloud",
        work / "cloud",
        {"nats": nats_section(nats_server.url, pki, pki.client("cloud")), "targets": targets},
    ).start()
    port = free_port()
    listeners = [{"ae_title": t["ae_title"], "bind": "127.0.0.1", "port": port} for t in targets]
    edge = AgentProcess(
        "edge",
        work / "edge",
        {"nats": nats_section(nats_server.url, pki, pki.client("edge")), "listeners": listeners},
    ).start()
    yield Relay(edge, cloud, dcmtk_scp, direct_scp, py_scp, odd_scp, status_scp, ct_only_scp, port)
    for proc in (edge, cloud):
        proc.stop()
    for scp in (dcmtk_scp, direct_scp):
        scp.stop()
    for pscp in (py_scp, odd_scp, status_scp, ct_only_scp):
        pscp.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
