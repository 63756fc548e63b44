"""Faults with a real 3-node NATS cluster (TLS clients, mTLS routes): a node killed mid-transfer,
a paused target SCP, the cloud agent killed mid-instance. What the SCU saw as Success is at the
SCP bit-exact; every other outcome is a documented relay status; the agents recover by
themselves."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pynetdicom import AE
from tests.harness import LOOPBACK
from tests.harness.agents import AgentProcess, nats_section
from tests.harness.cluster import NatsCluster
from tests.harness.dicom import (
    DcmtkStoreSCP,
    dataset_bytes,
    make_large_instance,
    pynetdicom_store,
    storescu,
)
from tests.harness.pki import TestPKI
from tests.harness.ports import free_port

CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SCP_AET = "CLUSTERSCP"
REQUEST_S = 4.0
LISTENER_TIMEOUTS = {"open_s": 3.0, "request_s": REQUEST_S, "chunk_ack_s": 3.0}
# What DCMTK storescu prints for the relay's own statuses (docs/operations.md):
# 0xA700 Refused: Out of Resources, 0x0110 Processing Failure.
DOCUMENTED_FAILURES = {"Refused: OutOfResources", "Failed: ProcessingFailure", "0xa700", "0x0110"}


@dataclass
class ClusterRig:
    cluster: NatsCluster
    edge: AgentProcess
    cloud: AgentProcess
    scp: DcmtkStoreSCP
    direct_scp: DcmtkStoreSCP
    port: int


def agent_nats(cluster: NatsCluster, pki: TestPKI, client: str) -> dict[str, object]:
    return {**nats_section(cluster.urls[0], pki, pki.client(client)), "servers": cluster.urls}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[ClusterRig]:
    work = tmp_path_factory.mktemp("cluster")
    cluster = NatsCluster(work / "nats", pki).start()
    scp = DcmtkStoreSCP(work / "scp", SCP_AET).start()
    direct_scp = DcmtkStoreSCP(work / "direct", SCP_AET).start()
    cloud = AgentProcess(
        "cl-cloud",
        work / "cloud",
        {
            "nats": agent_nats(cluster, pki, "cloud"),
            "targets": [{"ae_title": SCP_AET, "host": LOOPBACK, "port": scp.port}],
        },
    ).start()
    port = free_port()
    edge = AgentProcess(
        "cl-edge",
        work / "edge",
        {
            "nats": agent_nats(cluster, pki, "edge"),
            "listeners": [
                {
                    "ae_title": SCP_AET,
                    "bind": LOOPBACK,
                    "port": port,
                    "timeouts": LISTENER_TIMEOUTS,
                }
            ],
        },
    ).start()
    yield ClusterRig(cluster, edge, cloud, scp, direct_scp, port)
    edge.stop()
    cloud.stop()
    scp.stop()
    direct_scp.stop()
    cluster.stop()


def per_file_statuses(output: str) -> dict[str, str]:
    """File name -> the store response status storescu -v printed for it."""
    out: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = Path(m.group(1)).name
            continue
        m = re.search(r"Received Store Response \(([^)]*)\)", line)
        if m and current is not None:
            out[current] = m.group(1)
            current = None
    return out


def store_until_success(rig: ClusterRig, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        statuses = pynetdicom_store(rig.port, SCP_AET, [CT])
        if statuses == [0] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert statuses == [0]


def make_instances(directory: Path, n: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(CT)
    files = []
    for i in range(n):
        src.SOPInstanceUID = pydicom.uid.generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        out = directory / f"ct{i:03d}.dcm"
        src.save_as(out)
        files.append(out)
    return files


def stored_by_uid(scp: DcmtkStoreSCP) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes of what the SCP stored (file names carry the UID)."""
    return {p.name.split(".", 1)[1]: dataset_bytes(p) for p in scp.files()}


def test_cluster_routes_are_mutual_tls(rig: ClusterRig) -> None:
    for node in rig.cluster.nodes:
        routes = node.monitor("routez")
        peers = {r.get("remote_name") for r in routes["routes"]}  # pooled: several per peer
        assert peers == {p.name for p in node.peers}, routes
        varz = node.monitor("varz")
        assert varz["cluster"]["tls_required"] is True and varz["cluster"]["tls_verify"] is True
        assert varz["tls_verify"] is True


def test_node_killed_mid_transfer(rig: ClusterRig, tmp_path: Path) -> None:
    """200 instances on four associations; the node each agent is connected to is SIGKILLed
    once about a quarter of them are stored."""
    files = make_instances(tmp_path / "in", 200)
    uids = {f.name: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    rig.direct_scp.clear()
    direct = storescu(rig.direct_scp.port, files, SCP_AET)
    assert direct.statuses() == ["Success"] * 200
    expected = stored_by_uid(rig.direct_scp)
    rig.scp.clear()
    edge_pid, cloud_pid = rig.edge.proc.pid, rig.cloud.proc.pid  # type: ignore[union-attr]
    victims = {
        rig.cluster.node_of("dimse-relay/cl-edge"),
        rig.cluster.node_of("dimse-relay/cl-cloud"),
    }
    assert None not in victims
    outputs: list[str] = []

    def send() -> None:
        for i in range(4):
            # --no-halt: go on after a failed store (storescu stops at the first by default)
            chunk = files[i * 50 : (i + 1) * 50]
            outputs.append(storescu(rig.port, chunk, SCP_AET, extra=["--no-halt"]).output)

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 60
    while len(rig.scp.files()) < 50:
        assert time.monotonic() < deadline and sender.is_alive(), "transfer did not progress"
        time.sleep(0.01)
    killed_at = len(rig.scp.files())
    for node in victims:
        node.kill()  # type: ignore[union-attr]
    sender.join(180)
    assert not sender.is_alive()
    assert killed_at < 200
    statuses: dict[str, str] = {}
    for out in outputs:
        statuses.update(per_file_statuses(out))
    assert len(statuses) == 200, f"{200 - len(statuses)} files got no response status"
    stored = stored_by_uid(rig.scp)
    ok = [name for name, st in statuses.items() if st == "Success"]
    for name in ok:
        assert stored.get(uids[name]) == expected[uids[name]], name
    for uid, data in stored.items():  # whatever else arrived is complete, never partial
        assert data == expected[uid], uid
    failures = {st for st in statuses.values() if st != "Success"}
    assert failures <= DOCUMENTED_FAILURES, failures
    assert len(ok) >= killed_at
    # recovery without restarting anything but the killed nodes (which come back later)
    for agent in (rig.edge, rig.cloud):
        agent.wait_ready(30)
    assert (rig.edge.proc.pid, rig.cloud.proc.pid) == (edge_pid, cloud_pid)  # type: ignore[union-attr]
    store_until_success(rig)
    assert rig.edge.metric("dimse_relay_nats_reconnects_total") >= 1
    for node in victims:
        node.start()  # type: ignore[union-attr]
    rig.cluster.wait_routes()


def test_paused_target_scp_gives_out_of_resources_within_request_s(rig: ClusterRig) -> None:
    ae = AE(ae_title="PAUSER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1"])
    ds = pydicom.dcmread(CT)
    assoc = ae.associate(LOOPBACK, rig.port, ae_title=SCP_AET)
    assert assoc.is_established
    pid = rig.scp.proc.pid  # type: ignore[union-attr]
    try:
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        rsp = assoc.send_c_store(ds)
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert int(rsp.Status) == 0xA700
    assert REQUEST_S - 0.5 < elapsed < REQUEST_S + 2, elapsed
    rsp = assoc.send_c_store(ds)  # the SCP is back: the same association works again
    assoc.release()
    assert int(rsp.Status) == 0x0000
    assert pynetdicom_store(rig.port, SCP_AET, [CT]) == [0]


def test_cloud_agent_killed_mid_instance(rig: ClusterRig, tmp_path: Path) -> None:
    big = make_large_instance(tmp_path / "big.dcm", 200 * 1024 * 1024)
    rig.scp.clear()
    before = rig.cloud.metric("dimse_relay_dataset_bytes_total", direction="received")
    result: dict[str, object] = {}
    sender = threading.Thread(
        target=lambda: result.update(r=storescu(rig.port, [big], SCP_AET, timeout=120))
    )
    sender.start()
    deadline = time.monotonic() + 60
    while rig.cloud.metric("dimse_relay_dataset_bytes_total", direction="received") < before + (
        20 << 20
    ):
        assert time.monotonic() < deadline and sender.is_alive(), "transfer never started"
        time.sleep(0.05)
    rig.cloud.kill()
    sender.join(120)
    statuses = result["r"].statuses()  # type: ignore[attr-defined]
    assert statuses and statuses[0] != "Success", result["r"].output[-2000:]  # type: ignore[attr-defined]
    assert set(statuses) <= DOCUMENTED_FAILURES, statuses
    time.sleep(1)
    assert rig.scp.files() == []
    rig.cloud.start()
    store_until_success(rig)
    assert len(rig.scp.files()) == 1
