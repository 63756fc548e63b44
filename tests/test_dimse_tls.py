"""DICOM TLS on a listener: DCMTK storescu over TLS with a client certificate relays; plain
TCP and certificates from another CA are refused."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom.data
import pytest
from tests.harness import LOOPBACK
from tests.harness.agents import AgentProcess, nats_section
from tests.harness.dicom import DcmtkStoreSCP, dataset_bytes, storescu
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI
from tests.harness.ports import free_port

CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))


@dataclass
class TlsRig:
    scp: DcmtkStoreSCP
    direct: DcmtkStoreSCP
    port: int


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, nats_server: NatsServer
) -> Iterator[TlsRig]:
    work = tmp_path_factory.mktemp("dimse-tls")
    scp = DcmtkStoreSCP(work / "scp", "TLSSCP").start()
    direct = DcmtkStoreSCP(work / "direct", "TLSSCP").start()
    cloud = AgentProcess(
        "cloud",
        work / "cloud",
        {
            "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
            "targets": [{"ae_title": "TLSSCP", "host": LOOPBACK, "port": scp.port}],
        },
    ).start()
    port = free_port()
    tls = {
        "cert_file": str(pki.server.cert),
        "key_file": str(pki.server.key),
        "ca_file": str(pki.ca),
        "require_client_cert": True,
    }
    edge = AgentProcess(
        "edge",
        work / "edge",
        {
            "nats": nats_section(nats_server.url, pki, pki.client("edge")),
            "listeners": [{"ae_title": "TLSSCP", "bind": LOOPBACK, "port": port, "tls": tls}],
        },
    ).start()
    yield TlsRig(scp, direct, port)
    edge.stop()
    cloud.stop()
    scp.stop()
    direct.stop()


def tls_options(pki: TestPKI, client: str | None = "tester", ca: Path | None = None) -> list[str]:
    opts = ["+tls"]
    if client is None:
        opts = ["+tla"]  # anonymous TLS: no client certificate
    elif client == "rogue":
        opts += [str(pki.rogue_client.key), str(pki.rogue_client.cert)]
    else:
        opts += [str(pki.client(client).key), str(pki.client(client).cert)]
    return [*opts, "+cf", str(ca or pki.ca)]


def test_store_over_dicom_tls_with_client_certificate(rig: TlsRig, pki: TestPKI) -> None:
    rig.direct.clear()
    assert storescu(rig.direct.port, [CT], "TLSSCP").statuses() == ["Success"]
    rig.scp.clear()
    result = storescu(rig.port, [CT], "TLSSCP", extra=tls_options(pki))
    assert result.returncode == 0, result.output[-2000:]
    assert result.statuses() == ["Success"]
    (stored,) = rig.scp.files()
    (expected,) = rig.direct.files()
    assert dataset_bytes(stored) == dataset_bytes(expected)


@pytest.mark.parametrize("case", ["plain_tcp", "no_client_cert", "rogue_client_cert"])
def test_dicom_tls_refuses(rig: TlsRig, pki: TestPKI, case: str) -> None:
    extra = {
        "plain_tcp": [],
        "no_client_cert": tls_options(pki, client=None),
        "rogue_client_cert": tls_options(pki, client="rogue"),
    }[case]
    rig.scp.clear()
    result = storescu(rig.port, [CT], "TLSSCP", extra=[*extra, "-to", "5", "-ta", "5"], timeout=60)
    assert result.returncode != 0, result.output[-2000:]
    assert result.statuses() == []
    assert rig.scp.files() == []
