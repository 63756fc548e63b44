"""Queued mode with real servers: a hub nats-server (the cloud) and a site leaf node with its
own JetStream domain (the edge), a cloud agent in front of a real DCMTK storescp and an edge
agent whose listener queues C-STOREs in the leaf's JetStream (docs/queued-mode.md)."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from tests.harness import DIMSE_RELAY, LOOPBACK
from tests.harness.agents import AgentProcess, nats_section
from tests.harness.dicom import (
    DcmtkStoreSCP,
    PynetdicomSCP,
    dataset_bytes,
    make_large_instance,
    pynetdicom_echo,
    pynetdicom_store,
    small_instances,
    storescu,
)
from tests.harness.leaf import HubServer, LeafServer
from tests.harness.pki import TestPKI
from tests.harness.ports import free_port

CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
OUT_OF_RESOURCES = 0xA700
QUEUE = {
    "max_bytes": 256 * 1024 * 1024,
    "max_attempts": 3,
    "backoff_initial_s": 0.2,
    "backoff_max_s": 1.0,
    "stats_interval_s": 0.5,
    "inline_max_bytes": 256 * 1024,
    "object_chunk_bytes": 256 * 1024,
}


@dataclass
class QueueRig:
    hub: HubServer
    leaf: LeafServer
    cloud: AgentProcess
    edge: AgentProcess
    scp: DcmtkStoreSCP
    picky: PynetdicomSCP
    port: int
    work: Path

    def wait_delivered(self, count: int, timeout: float) -> list[Path]:
        deadline = time.monotonic() + timeout
        while len(self.scp.files()) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.scp.files()

    def wait_stored(self, expected: list[bytes], timeout: float) -> list[bytes]:
        """Poll until the SCP holds exactly the datasets ``expected`` (a file storescp is
        still writing reads short, so this never compares a half-written file)."""
        deadline = time.monotonic() + timeout
        got: list[bytes] = []
        while time.monotonic() < deadline:
            try:
                got = sorted(dataset_bytes(p) for p in self.scp.files())
            except Exception:  # a file being written
                got = []
            if got == sorted(expected):
                break
            time.sleep(0.2)
        return got

    def wait_drained(self, timeout: float) -> None:
        """The edge queue empty (every item acknowledged after the target's Success), seen in
        two stats polls a poll interval apart, so not a reading from before the items came."""
        deadline = time.monotonic() + timeout
        empty_since: float | None = None
        while time.monotonic() < deadline:
            if self.edge.metric("dimse_relay_queue_depth") == 0:
                empty_since = empty_since or time.monotonic()
                if time.monotonic() - empty_since > 2 * QUEUE["stats_interval_s"]:
                    return
            else:
                empty_since = None
            time.sleep(0.2)
        raise AssertionError(f"edge queue not drained\n{self.edge.log_tail()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(DIMSE_RELAY), "queue", "--config", str(self.edge.config_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )


def edge_config(leaf: LeafServer, pki: TestPKI, port: int, queue: dict[str, Any]) -> dict[str, Any]:
    listener = {"bind": LOOPBACK, "port": port, "mode": "queued"}
    return {
        "nats": nats_section(leaf.url, pki, pki.client("edge")),
        "listeners": [
            {"ae_title": "ARCHIVE", **listener},
            {"ae_title": "PICKY", **listener},
            # No agent serves GHOST until a test starts one.
            {"ae_title": "GHOST", **listener},
        ],
        "queue": queue,
    }


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[QueueRig]:
    work = tmp_path_factory.mktemp("queued")
    hub = HubServer(work / "hub", pki).start()
    leaf = LeafServer(work / "leaf", pki, hub, pki.client("tester")).start()
    scp = DcmtkStoreSCP(work / "scp", "ARCHIVE").start()
    # Accepts CT only: an MR instance queued for it can never be delivered.
    picky = PynetdicomSCP(
        "PICKY", contexts=[("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]
    ).start()
    cloud = AgentProcess(
        "q-cloud",
        work / "cloud",
        {
            "nats": nats_section(hub.url, pki, pki.client("cloud")),
            "targets": [
                {"ae_title": "ARCHIVE", "host": LOOPBACK, "port": scp.port},
                {"ae_title": "PICKY", "host": LOOPBACK, "port": picky.port},
            ],
        },
    ).start()
    port = free_port()
    edge = AgentProcess("q-edge", work / "edge", edge_config(leaf, pki, port, QUEUE)).start()
    yield QueueRig(hub, leaf, cloud, edge, scp, picky, port, work)
    edge.stop()
    cloud.stop()
    picky.stop()
    scp.stop()
    leaf.stop()
    hub.stop()


def test_queued_store_is_acknowledged_then_delivered_bit_exact(
    rig: QueueRig, tmp_path: Path
) -> None:
    rig.scp.clear()
    files = small_instances(tmp_path / "ct", 5)
    result = storescu(rig.port, files, "ARCHIVE")
    assert result.statuses() == ["Success"] * 5, result
    expected = [dataset_bytes(f) for f in files]
    assert rig.wait_stored(expected, 30) == sorted(expected)
    rig.wait_drained(10)
    assert pynetdicom_echo(rig.port, "ARCHIVE")[0] == 0


def target_stores(rig: QueueRig) -> float:
    """C-STOREs the cloud agent relayed to its SCPs (each delivery attempt that reached one)."""
    return rig.cloud.metric("dimse_relay_requests_total", role="target", service="C-STORE")


def test_same_instance_twice_is_delivered_once_and_a_changed_one_is_not_dropped(
    rig: QueueRig, tmp_path: Path
) -> None:
    """Dedupe is by SOP Instance UID plus content digest: a modality's retry of the same
    instance reaches the target once; different bytes under the same UID are delivered."""
    rig.scp.clear()
    (original,) = small_instances(tmp_path / "one", 1)
    before = target_stores(rig)
    dupes = rig.edge.metric("dimse_relay_queue_duplicates_total")
    assert storescu(rig.port, [original], "ARCHIVE").statuses() == ["Success"]
    assert storescu(rig.port, [original], "ARCHIVE").statuses() == ["Success"]
    rig.wait_delivered(1, 30)
    rig.wait_drained(10)
    assert rig.edge.metric("dimse_relay_queue_duplicates_total") == dupes + 1
    ds = pydicom.dcmread(original)
    ds.InstitutionName = "changed content, same UID"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    assert storescu(rig.port, [changed], "ARCHIVE").statuses() == ["Success"]
    deadline = time.monotonic() + 30
    while target_stores(rig) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    rig.wait_drained(10)
    assert target_stores(rig) == before + 2
    (stored,) = rig.scp.files()  # the SCP keeps one file per UID: the second version
    assert dataset_bytes(stored) == dataset_bytes(changed)


def test_undeliverable_instance_is_dead_lettered_and_managed_from_the_cli(
    rig: QueueRig, tmp_path: Path
) -> None:
    """An MR instance for a target that accepts CT only. With the far side up the queued
    listener refuses it as the target does (no context accepted); sent during an outage from
    a modality never seen, it is accepted on local contexts (Success: it is in the queue),
    then becomes a dead letter with its reason; `dimse-relay queue` lists, retries and
    purges it."""
    mr = Path(pydicom.data.get_testdata_file("MR_small.dcm"))
    refused = storescu(rig.port, [mr], "PICKY", calling="PICKYMOD", extra=["-R"])
    assert refused.returncode != 0 and refused.statuses() == [], refused.output[-2000:]
    assert "no acceptable presentation contexts" in refused.output.lower(), refused.output[-2000:]
    rig.hub.stop()
    try:
        assert pynetdicom_store(rig.port, "PICKY", [mr], calling="NEVERSEEN") == [0]
    finally:
        rig.hub.start()
    deadline = time.monotonic() + 60
    while rig.edge.metric("dimse_relay_queue_dead_letters") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    listed = rig.cli("--json", "dead-letters")
    assert listed.returncode == 0, listed.stderr
    (item,) = json.loads(listed.stdout)
    assert item["called_ae_title"] == "PICKY"
    assert "not accepted" in item["reason"]
    assert item["sop_instance_uid"] == str(pydicom.dcmread(mr).SOPInstanceUID)
    retried = rig.cli("retry", str(item["seq"]))
    assert retried.returncode == 0 and "1 dead letter(s) requeued" in retried.stdout, retried
    deadline = time.monotonic() + 30
    again: list[dict[str, Any]] = []
    while time.monotonic() < deadline:  # still undeliverable: back in the dead letters
        again = json.loads(rig.cli("--json", "dead-letters").stdout)
        if again:
            break
        time.sleep(0.3)
    assert [d["item_id"] for d in again] == [item["item_id"]]
    purged = rig.cli("purge", "--all")
    assert purged.returncode == 0 and "1 dead letter(s) purged" in purged.stdout, purged
    assert json.loads(rig.cli("--json", "dead-letters").stdout) == []
    nothing = rig.cli("retry", "--all")  # nothing to do is not an error
    assert nothing.returncode == 0 and "0 dead letter(s) requeued" in nothing.stdout, nothing
    status = json.loads(rig.cli("--json", "status").stdout)
    assert status["dead_letters"] == 0
    assert rig.picky.received == {}


def test_garbage_in_the_queue_stream_is_dropped_and_delivery_goes_on(
    rig: QueueRig, pki: TestPKI, tmp_path: Path
) -> None:
    async def inject() -> None:
        import nats

        ctx = ssl.create_default_context(cafile=str(pki.ca))
        client = pki.client("tester")
        ctx.load_cert_chain(str(client.cert), str(client.key))
        nc = await nats.connect(rig.leaf.url, tls=ctx)
        js = nc.jetstream()
        await js.publish("dimse.v1.queue.ARCHIVE", b"not an envelope")
        await js.publish("dimse.v1.queue.ARCHIVE", b"DRLY\x01\x0a\x00\x02{}")
        await nc.close()

    rejected = rig.edge.metric("dimse_relay_wire_rejected_total")
    asyncio.run(inject())
    rig.scp.clear()
    files = small_instances(tmp_path / "after", 2)
    assert storescu(rig.port, files, "ARCHIVE").statuses() == ["Success"] * 2
    assert len(rig.wait_delivered(2, 30)) == 2
    rig.wait_drained(10)
    assert rig.edge.metric("dimse_relay_wire_rejected_total") >= rejected + 2


def test_outage_with_restarts_loses_nothing_and_duplicates_nothing(
    rig: QueueRig, tmp_path: Path
) -> None:
    """Cut the site off from the cloud (hub down), queue 500 instances, restart the edge agent
    and the leaf node meanwhile, restore the link: all 500 arrive once, bit-exact."""
    files = small_instances(tmp_path / "many", 500)
    expected = {dataset_bytes(f) for f in files}
    rig.scp.clear()
    before = target_stores(rig)
    rig.hub.stop()
    try:
        result = storescu(rig.port, files[:250], "ARCHIVE", timeout=300)
        assert result.statuses() == ["Success"] * 250, result.output[-2000:]
        rig.edge.stop()
        rig.edge.start()
        rig.leaf.restart()
        rig.edge.wait_ready(30)
        result = storescu(rig.port, files[250:], "ARCHIVE", timeout=300)
        assert result.statuses() == ["Success"] * 250, result.output[-2000:]
        assert rig.scp.files() == []
        depth = json.loads(rig.cli("--json", "status").stdout)["depth"]
        assert depth == 500
    finally:
        rig.hub.start()
    stored = rig.wait_delivered(500, 180)
    rig.wait_drained(30)
    assert len(stored) == 500
    assert {dataset_bytes(p) for p in stored} == expected
    assert target_stores(rig) == before + 500  # exactly once: no second delivery of any


def test_cloud_agent_killed_mid_large_instance_delivers_it_whole_later(
    rig: QueueRig, tmp_path: Path
) -> None:
    big = make_large_instance(tmp_path / "big.dcm", 96 * 1024 * 1024)
    rig.scp.clear()
    received = rig.cloud.metric("dimse_relay_dataset_bytes_total", direction="received")
    result: dict[str, Any] = {}
    sender = threading.Thread(
        target=lambda: result.update(r=storescu(rig.port, [big], "ARCHIVE", timeout=180))
    )
    sender.start()
    deadline = time.monotonic() + 120
    while rig.cloud.metric("dimse_relay_dataset_bytes_total", direction="received") < received + (
        16 << 20
    ):
        assert time.monotonic() < deadline, f"delivery never started\n{rig.edge.log_tail()}"
        time.sleep(0.05)
    rig.cloud.kill()
    sender.join(180)
    assert result["r"].statuses() == ["Success"], result["r"].output[-2000:]
    assert rig.scp.files() == []  # nothing partial reached the SCP
    rig.cloud.start()
    rig.wait_delivered(1, 180)
    rig.wait_drained(60)
    (stored,) = rig.scp.files()
    assert dataset_bytes(stored) == dataset_bytes(big)


def test_full_edge_queue_refuses_with_out_of_resources_and_keeps_what_it_accepted(
    rig: QueueRig, pki: TestPKI, tmp_path: Path
) -> None:
    """A second, tiny queue on the same leaf (own subject prefix and names) for an AE title
    nobody serves, so nothing drains it: C-STOREs past its limit get 0xA700; every one that
    got Success is in the queue."""
    port = free_port()
    config = edge_config(
        rig.leaf,
        pki,
        port,
        {
            **QUEUE,
            "stream": "FILL_QUEUE",
            "dead_letter_stream": "FILL_DEAD",
            "object_bucket": "FILL_OBJECTS",
            "max_bytes": 1024 * 1024,
        },
    )
    config["nats"]["subject_prefix"] = "fill"
    edge = AgentProcess("q-fill", tmp_path / "fill", config).start()
    try:
        files = small_instances(tmp_path / "fill-ct", 60)  # ~38 KB each: ~2.3 MB
        statuses = pynetdicom_store(port, "ARCHIVE", files)
        accepted = statuses.count(0)
        assert 0 < accepted < 60, statuses
        assert set(statuses) == {0, OUT_OF_RESOURCES}, statuses
        first_refused = statuses.index(OUT_OF_RESOURCES)
        assert all(s == OUT_OF_RESOURCES for s in statuses[first_refused:]), statuses
        time.sleep(1.0)
        status = subprocess.run(
            [str(DIMSE_RELAY), "queue", "--config", str(edge.config_path), "--json", "status"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(status.stdout)["depth"] == accepted, status
        assert edge.metric("dimse_relay_queue_refused_total", reason="full") == 60 - accepted
    finally:
        edge.stop()


def _collection_filters() -> Any:
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("relay_filters", root / "plugins/filter/relay.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collection_permissions_are_enough_for_queued_mode_and_no_more(
    rig: QueueRig, pki: TestPKI, tmp_path: Path
) -> None:
    """A leaf node whose edge user has exactly what the collection grants a site with a queued
    listener (plugins/filter/relay.py): the queue works end to end and the CLI with it, while
    JetStream assets other than the site's own stay out of reach."""
    sites = {
        "site": {
            "zone": "edge",
            "listeners": [{"ae_title": "ARCHIVE", "port": 1, "mode": "queued"}],
        },
        "cloud": {"zone": "cloud", "targets": [{"ae_title": "ARCHIVE", "host": "x", "port": 1}]},
    }
    permissions = _collection_filters().relay_site_permissions(sites, "site", "dimse")
    users = [{"user": "CN=edge,O=dimse-relay tests", "permissions": permissions}]
    leaf = LeafServer(tmp_path / "leaf", pki, rig.hub, pki.client("tester"), domain="edge-perm")
    leaf.users = users
    leaf.start()
    port = free_port()
    config = edge_config(leaf, pki, port, QUEUE)
    config["nats"]["inbox_prefix"] = "_INBOX.site"
    edge = AgentProcess("q-perm", tmp_path / "edge", config)
    try:
        edge.start()
        rig.scp.clear()
        files = small_instances(tmp_path / "ct", 3)
        big = make_large_instance(tmp_path / "big.dcm", 4 * 1024 * 1024)  # through the bucket
        assert storescu(port, [*files, big], "ARCHIVE").statuses() == ["Success"] * 4
        expected = [dataset_bytes(f) for f in [*files, big]]
        assert rig.wait_stored(expected, 60) == sorted(expected)
        status = subprocess.run(
            [str(DIMSE_RELAY), "queue", "--config", str(edge.config_path), "--json", "status"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert not [x for x in edge.log_lines() if "ermission" in str(x)], edge.log_tail()

        async def forbidden() -> list[str]:
            import nats

            ctx = ssl.create_default_context(cafile=str(pki.ca))
            client = pki.client("edge")
            ctx.load_cert_chain(str(client.cert), str(client.key))
            errors: list[str] = []

            async def on_error(exc: Exception) -> None:
                errors.append(str(exc))

            nc = await nats.connect(
                leaf.url, tls=ctx, inbox_prefix="_INBOX.site", error_cb=on_error
            )
            js = nc.jetstream(timeout=2)
            for attempt in (
                js.add_stream(name="OTHER", subjects=["other.>"]),
                js.delete_stream("DIMSE_QUEUE"),
            ):
                try:
                    await attempt
                    errors.append("allowed")
                except Exception as exc:
                    errors.append(type(exc).__name__)
            await nc.close()
            return errors

        outcome = asyncio.run(forbidden())
        assert "allowed" not in outcome, outcome
        assert any("ermissions violation" in e for e in outcome), outcome
    finally:
        edge.stop()
        leaf.stop()


def test_queued_listener_negotiates_like_the_target_also_during_an_outage(
    rig: QueueRig, tmp_path: Path
) -> None:
    """DCMTK's storescu offers an Implicit VR file in two contexts; the target (storescp)
    takes Explicit VR there, so storescu converts. A queued listener accepts what the target
    accepts (asked at association time, remembered for the outage), so what arrives is what
    the same modality stores directly at the target, byte for byte."""
    src = pydicom.dcmread(pydicom.data.get_testdata_file("rtplan.dcm"))
    assert src.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    copies = []
    for name in ("up.dcm", "outage.dcm", "local.dcm"):
        src.SOPInstanceUID = pydicom.uid.generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        src.save_as(tmp_path / name)
        copies.append(tmp_path / name)

    def direct(path: Path) -> bytes:
        rig.scp.clear()
        assert storescu(rig.scp.port, [path], "ARCHIVE", extra=["-R"]).statuses() == ["Success"]
        (stored,) = rig.wait_delivered(1, 10)
        time.sleep(0.5)
        data = dataset_bytes(stored)
        rig.scp.clear()
        return data

    up, outage, local = (direct(p) for p in copies)
    assert storescu(rig.port, [copies[0]], "ARCHIVE", extra=["-R"]).statuses() == ["Success"]
    assert rig.wait_stored([up], 30) == [up]
    rig.wait_drained(10)
    rig.scp.clear()
    rig.hub.stop()
    try:
        result = storescu(rig.port, [copies[1]], "ARCHIVE", extra=["-R"])
        assert result.statuses() == ["Success"], result.output[-2000:]
        # A calling AE title never seen: local contexts, which prefer Explicit VR as storescp
        result = storescu(rig.port, [copies[2]], "ARCHIVE", calling="NEWMOD", extra=["-R"])
        assert result.statuses() == ["Success"], result.output[-2000:]
    finally:
        rig.hub.start()
    assert rig.wait_stored([outage, local], 60) == sorted([outage, local])
    rig.wait_drained(30)
    negotiated = [x.get("negotiated") for x in rig.edge.log_lines() if x.get("negotiated")]
    assert {"target", "remembered", "local"} <= set(negotiated), negotiated


def test_status_command_shows_listener_modes_and_target_reachability(rig: QueueRig) -> None:
    def status(agent: AgentProcess) -> str:
        proc = subprocess.run(
            [str(DIMSE_RELAY), "status", "--url", f"http://127.0.0.1:{agent.http_port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "listener ARCHIVE" in status(rig.edge) and "(queued)" in status(rig.edge)
    cloud = status(rig.cloud)
    assert f"target ARCHIVE -> ARCHIVE@{LOOPBACK}:{rig.scp.port}  reachable" in cloud, cloud


def test_same_large_instance_twice_during_an_outage_is_delivered_once_whole(
    rig: QueueRig, tmp_path: Path
) -> None:
    """A large instance (through the object bucket) sent again, as a modality does after an
    unconfirmed store: the second copy is a duplicate that reuses the object the queued
    first copy names, so that one is delivered whole and nothing is dead-lettered."""
    big = make_large_instance(tmp_path / "big.dcm", 3 << 20)
    rig.scp.clear()
    dead = rig.edge.metric("dimse_relay_queue_dead_letters")
    dupes = rig.edge.metric("dimse_relay_queue_duplicates_total")
    rig.hub.stop()
    try:
        for _ in range(2):
            assert storescu(rig.port, [big], "ARCHIVE").statuses() == ["Success"]
    finally:
        rig.hub.start()
    got = rig.wait_stored([dataset_bytes(big)], 90)
    assert got == [dataset_bytes(big)], rig.edge.log_tail()
    rig.wait_drained(30)
    assert rig.edge.metric("dimse_relay_queue_duplicates_total") == dupes + 1
    assert rig.edge.metric("dimse_relay_queue_dead_letters") == dead
    status = json.loads(rig.cli("--json", "status").stdout)
    assert status["bytes"] < 64 * 1024, status  # the object went with its delivered item


def test_far_ae_title_without_an_agent_holds_only_its_own_items(
    rig: QueueRig, pki: TestPKI, tmp_path: Path
) -> None:
    """More items than the delivery concurrency for a far AE title that no agent serves yet
    are held (an outage for that AE title only); items for another far AE title are
    delivered meanwhile. Once an agent serves the first AE title, its items arrive."""
    rig.scp.clear()
    held = small_instances(tmp_path / "ghost", 6)
    assert storescu(rig.port, held, "GHOST").statuses() == ["Success"] * 6
    others = small_instances(tmp_path / "others", 3)
    assert storescu(rig.port, others, "ARCHIVE").statuses() == ["Success"] * 3
    expected = [dataset_bytes(f) for f in others]
    assert rig.wait_stored(expected, 30) == sorted(expected)
    ghost_scp = PynetdicomSCP("GHOST").start()
    ghost = AgentProcess(
        "q-ghost",
        rig.work / "ghost",
        {
            "nats": nats_section(rig.hub.url, pki, pki.client("cloud")),
            "targets": [{"ae_title": "GHOST", "host": LOOPBACK, "port": ghost_scp.port}],
        },
    ).start()
    try:
        deadline = time.monotonic() + 60
        while len(ghost_scp.received) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(ghost_scp.received.values()) == sorted(dataset_bytes(f) for f in held)
        rig.wait_drained(30)
    finally:
        ghost.stop()
        ghost_scp.stop()


def test_queue_sized_close_to_the_leaf_store_survives_agent_and_leaf_restarts(
    rig: QueueRig, pki: TestPKI, tmp_path: Path
) -> None:
    """The queue's reservation (2.1 x max_bytes) nearly fills the leaf's max_file_store, as in
    the lab. Restarting the edge agent or the leaf must find the existing streams and bucket
    (nats-server refuses to create them a second time for lack of storage): ready again, and
    an instance queued before the restarts is delivered after them."""
    queue = {**QUEUE, "max_bytes": 64 * 1024 * 1024}  # reserves 134.4 MiB
    leaf = LeafServer(
        tmp_path / "leaf",
        pki,
        rig.hub,
        pki.client("tester"),
        domain="edge-tight",
        max_file_store="150M",
    ).start()
    port = free_port()
    edge = AgentProcess("q-tight", tmp_path / "edge", edge_config(leaf, pki, port, queue))
    try:
        edge.start()
        rig.scp.clear()
        (first, second) = small_instances(tmp_path / "ct", 2)
        rig.cloud.stop()
        try:
            assert storescu(port, [first], "ARCHIVE").statuses() == ["Success"]
            edge.stop()
            edge.start()
            leaf.restart()
            edge.wait_ready(30)
            _, body = edge.http_get("/readyz")
            assert json.loads(body)["edge_queue_ready"] is True, body
            assert storescu(port, [second], "ARCHIVE").statuses() == ["Success"]
        finally:
            rig.cloud.start()
        expected = [dataset_bytes(first), dataset_bytes(second)]
        assert rig.wait_stored(expected, 60) == sorted(expected), edge.log_tail()
        assert not [x for x in edge.log_lines() if x.get("level") == "error"], edge.log_tail()
    finally:
        edge.stop()
        leaf.stop()


def test_same_instance_for_two_far_ae_titles_is_delivered_to_both(
    rig: QueueRig, tmp_path: Path
) -> None:
    """Dedupe is per far AE title: a modality sending one instance to the archive and to
    another queued destination gets both deliveries, not one and a silent duplicate."""
    (instance,) = small_instances(tmp_path / "both", 1)
    rig.scp.clear()
    rig.picky.received.clear()
    assert storescu(rig.port, [instance], "ARCHIVE").statuses() == ["Success"]
    assert storescu(rig.port, [instance], "PICKY", extra=["-R"]).statuses() == ["Success"]
    expected = dataset_bytes(instance)
    assert rig.wait_stored([expected], 30) == [expected]
    deadline = time.monotonic() + 30
    while not rig.picky.received and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(rig.picky.received.values()) == [expected]
    rig.wait_drained(10)
