"""Bad input and failures: every case gives the SCU a documented status (never an abort)
within the configured timeout, and the agents keep serving everyone else."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom.data
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from tests.harness import DIMSE_RELAY, LOOPBACK
from tests.harness.agents import AgentProcess, nats_section
from tests.harness.dicom import DcmtkStoreSCP, PynetdicomSCP, pynetdicom_echo, pynetdicom_store
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI
from tests.harness.ports import free_port

from dimse_relay import envelope, subjects
from dimse_relay.envelope import ChunkHeader, ContextProposal, OpenHeader, RequestHeader

CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
OPEN_S = 2.0
REQUEST_S = 3.0
LISTENER_TIMEOUTS = {"open_s": OPEN_S, "request_s": REQUEST_S, "chunk_ack_s": 2.0}
SESSION_IDLE_S = 3.0
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0x0110


@dataclass
class FailureRig:
    nats: NatsServer
    edge: AgentProcess
    cloud: AgentProcess
    slow_scp: PynetdicomSCP
    good_scp: DcmtkStoreSCP
    port: int


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[FailureRig]:
    """Its own NATS server (these tests stop it) and agents with short timeouts."""
    work = tmp_path_factory.mktemp("failures")
    nats = NatsServer(work / "nats", pki).start()
    slow_scp = PynetdicomSCP("SLOWSCP", delay_s=REQUEST_S + 3).start()
    good_scp = DcmtkStoreSCP(work / "good", "GOODSCP").start()
    dead_port = free_port()  # nothing listens here
    targets = [
        {"ae_title": "SLOWSCP", "host": LOOPBACK, "port": slow_scp.port},
        {"ae_title": "GOODSCP", "host": LOOPBACK, "port": good_scp.port},
        {"ae_title": "DEADSCP", "host": LOOPBACK, "port": dead_port},
    ]
    for t in targets:
        t["timeouts"] = {"session_idle_s": SESSION_IDLE_S}
    # The good SCP again, with the default (long) idle session timeout: an upload whose
    # listener went away must be ended by the target's probe, not by the idle reaper.
    targets.append(
        {
            "ae_title": "BIGSCP",
            "host": LOOPBACK,
            "port": good_scp.port,
            "called_ae_title": "GOODSCP",
        }
    )
    cloud = AgentProcess(
        "cloud",
        work / "cloud",
        {
            "nats": nats_section(nats.url, pki, pki.client("cloud")),
            # DEADSCP is down on purpose: readiness reports it without depending on it.
            "http": {"ready_requires_targets": False},
            "targets": targets,
        },
    ).start()
    port = free_port()
    listeners = [
        {"ae_title": aet, "bind": LOOPBACK, "port": port, "timeouts": LISTENER_TIMEOUTS}
        for aet in ("SLOWSCP", "GOODSCP", "DEADSCP", "NOBODY")
    ]
    listeners.append(
        {
            "ae_title": "GUARDED",
            "remote_ae_title": "GOODSCP",
            "bind": LOOPBACK,
            "port": port,
            "allowed_calling_aets": ["TRUSTED"],
            "timeouts": LISTENER_TIMEOUTS,
        }
    )
    # The same target with patient timeouts, for the large transfer that a loaded machine may
    # slow to seconds per chunk (the short timeouts above are for the timeout tests).
    listeners.append(
        {
            "ae_title": "GOODBIG",
            "remote_ae_title": "BIGSCP",
            "bind": LOOPBACK,
            "port": port,
            "timeouts": {"open_s": 15.0, "request_s": 120.0, "chunk_ack_s": 60.0},
        }
    )
    edge = AgentProcess(
        "edge",
        work / "edge",
        {"nats": nats_section(nats.url, pki, pki.client("edge")), "listeners": listeners},
    ).start()
    yield FailureRig(nats, edge, cloud, slow_scp, good_scp, port)
    edge.stop()
    cloud.stop()
    slow_scp.stop()
    good_scp.stop()
    nats.stop()


def associate(port: int, called: str, calling: str = "PYSCU") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate(LOOPBACK, port, ae_title=called)


def timed_store(port: int, called: str) -> tuple[list[int | None], float]:
    started = time.monotonic()
    statuses = pynetdicom_store(port, called, [CT])
    return statuses, time.monotonic() - started


def test_unknown_called_aet_is_rejected_with_called_aet_not_recognised(rig: FailureRig) -> None:
    assoc = associate(rig.port, "NOSUCHAET")
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    # rejected-permanent (1), service-user (1), called AE title not recognised (7)
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x07)


def test_calling_aet_not_allowed_is_rejected(rig: FailureRig) -> None:
    assoc = associate(rig.port, "GUARDED", calling="INTRUDER")
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x03)
    status, _ = pynetdicom_echo(rig.port, "GUARDED", calling="TRUSTED")
    assert status == 0


def test_no_target_subscribed_gives_out_of_resources_fast(rig: FailureRig) -> None:
    statuses, elapsed = timed_store(rig.port, "NOBODY")
    assert statuses == [OUT_OF_RESOURCES]
    assert elapsed < OPEN_S + REQUEST_S + 2
    status, _ = pynetdicom_echo(rig.port, "NOBODY")
    assert status == PROCESSING_FAILURE


def test_target_scp_down_gives_out_of_resources(rig: FailureRig) -> None:
    statuses, elapsed = timed_store(rig.port, "DEADSCP")
    assert statuses == [OUT_OF_RESOURCES]
    assert elapsed < OPEN_S + REQUEST_S + 2
    # the cloud agent reports it (report-only in this rig, tests/test_readyz_targets.py)
    code, body = rig.cloud.http_get("/readyz")
    probes = json.loads(body)["target_reachability"]
    assert code == 200 and probes["DEADSCP"]["reachable"] is False, probes
    assert probes["GOODSCP"]["reachable"] is True, probes


def test_slow_target_times_out_while_others_are_served(rig: FailureRig) -> None:
    """A target slower than request_s: the SCU gets 0xA700 after about request_s; meanwhile
    another association through the same agents succeeds. What the slow SCP stores later is
    the complete instance, never a part of it."""
    rig.slow_scp.received.clear()
    result: dict[str, object] = {}

    def slow() -> None:
        result["statuses"], result["elapsed"] = timed_store(rig.port, "SLOWSCP")

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    rig.good_scp.clear()
    assert pynetdicom_store(rig.port, "GOODSCP", [CT]) == [0]
    assert len(rig.good_scp.files()) == 1
    thread.join(30)
    assert result["statuses"] == [OUT_OF_RESOURCES]
    assert REQUEST_S - 0.5 < float(result["elapsed"]) < REQUEST_S + OPEN_S + 2  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while not rig.slow_scp.received and time.monotonic() < deadline:
        time.sleep(0.1)
    from tests.harness.dicom import dataset_bytes

    assert list(rig.slow_scp.received.values()) in ([], [dataset_bytes(CT)])


def test_nats_down_gives_status_and_agents_recover(rig: FailureRig) -> None:
    rig.nats.stop()
    try:
        statuses, elapsed = timed_store(rig.port, "GOODSCP")
        assert statuses == [OUT_OF_RESOURCES]
        assert elapsed < OPEN_S + REQUEST_S + 2
        assert not rig.edge.ready()
    finally:
        rig.nats.start()
    rig.edge.wait_ready(20)
    rig.cloud.wait_ready(20)
    deadline = time.monotonic() + 20
    while True:  # the cloud agent's subscriptions come back with its reconnect
        statuses = pynetdicom_store(rig.port, "GOODSCP", [CT])
        if statuses == [0] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert statuses == [0]
    # The server closing the TLS connections is reported once by the agent ("NATS
    # disconnected"), not also by asyncio as a warning about eof_received.
    for agent in (rig.edge, rig.cloud):
        lines = agent.log_lines()
        assert any(line.get("msg") == "NATS disconnected" for line in lines)
        assert not [line for line in lines if "eof_received" in str(line.get("msg"))]


def _client_tls(pki: TestPKI, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    client = pki.client(name)
    ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


async def _inject_garbage(url: str, tls: ssl.SSLContext) -> dict[str, int]:
    """Act as a hostile or broken publisher on the relay subjects; return error replies."""
    import nats

    nc = await nats.connect(url, tls=tls)
    errors: dict[str, int] = {}
    try:
        open_subject = subjects.open_subject("dimse", "GOODSCP")
        for junk in (
            b"",  # truncated
            b"garbage",  # bad_magic
            b"DRLY\x01\x01\xff\xff",  # header length past the end: truncated
            b"DRLY\x09\x01\x00\x02{}",  # bad_version
            b"DRLY\x01\x63\x00\x02{}",  # bad_kind
            b"DRLY\x01\x01\x00\x05[1,2]",  # bad_header
            b'DRLY\x01\x01\x00\x0b{"evil": 1}',  # bad_header (unknown field)
            envelope.encode(ChunkHeader(op_id=1, seq=0, offset=0)),  # unexpected_kind
        ):
            await nc.publish(open_subject, junk, reply="_INBOX.junk")
        await nc.publish("_INBOX.nobody.listens", b"garbage")
        # Open a real session like a listener would, then send it a broken chunk stream.
        inbox = nc.new_inbox()
        hdr = OpenHeader(
            assoc_id="fuzz",
            calling_ae_title="FUZZER",
            called_ae_title="GOODSCP",
            contexts=[
                ContextProposal(
                    id=1, abstract_syntax=CTImageStorage, transfer_syntaxes=["1.2.840.10008.1.2.1"]
                )
            ],
            reply_inbox=inbox,
            timeout_s=5,
        )
        reply = await nc.request(open_subject, envelope.encode(hdr), timeout=5)
        result, _ = envelope.decode(reply.data)
        assert result.result == "accepted", result
        session = result.session_subject
        sub = await nc.subscribe(inbox + ".ops")
        from pydicom.dataset import Dataset

        from dimse_relay.dicom import encode_command

        cmd = Dataset()
        cmd.CommandGroupLength = 0
        cmd.AffectedSOPClassUID = CTImageStorage
        cmd.CommandField = 0x0001
        cmd.MessageID = 1
        cmd.Priority = 0
        cmd.CommandDataSetType = 0x0000
        cmd.AffectedSOPInstanceUID = "1.2.3.4"
        command = encode_command(cmd)
        base = dict(
            service="C-STORE",
            abstract_syntax=CTImageStorage,
            transfer_syntax="1.2.840.10008.1.2.1",
            command_length=len(command),
            inline=False,
        )
        cases = {
            "out_of_order": (1, [(1, 0, b"x" * 10)], 20),
            "oversized": (2, [(0, 0, b"x" * 30)], 20),
            "bad_digest": (3, [(0, 0, b"x" * 20)], 20),
        }
        for name, (op_id, chunks, total) in cases.items():
            req = RequestHeader(op_id=op_id, dataset_length=total, chunk_count=len(chunks), **base)
            await nc.publish(session, envelope.encode(req, command), reply=inbox + ".ops")
            for seq, offset, data in chunks:
                ch = ChunkHeader(op_id=op_id, seq=seq, offset=offset, final=True, digest="0" * 64)
                await nc.publish(session, envelope.encode(ch, data), reply=inbox + ".ops")
            msg = await sub.next_msg(timeout=5)
            header, _ = envelope.decode(msg.data)
            errors[name] = 1 if header.reason == "protocol" else 0
        # Datasets inline in the request (sent to the SCP from memory): the same checks.
        inline_cases = {
            "inline_bad_digest": (4, b"x" * 20, hashlib.sha256(b"y" * 20).hexdigest()),
            "inline_length_mismatch": (5, b"x" * 10, hashlib.sha256(b"x" * 10).hexdigest()),
        }
        for name, (op_id, data, digest) in inline_cases.items():
            fields = {**base, "inline": True}
            req = RequestHeader(op_id=op_id, dataset_length=20, digest=digest, **fields)
            await nc.publish(session, envelope.encode(req, command + data), reply=inbox + ".ops")
            msg = await sub.next_msg(timeout=5)
            header, _ = envelope.decode(msg.data)
            errors[name] = 1 if header.reason == "protocol" else 0
        await nc.publish(session, b"\x00" * 100)  # garbage on the session subject
        await nc.publish(session, envelope.encode(envelope.CloseHeader(mode="abort")))
        await nc.flush()
    finally:
        await nc.close()
    return errors


def test_garbage_on_relay_subjects_is_dropped_counted_and_harmless(
    rig: FailureRig, pki: TestPKI
) -> None:
    before = rig.cloud.metric("dimse_relay_wire_rejected_total")
    reasons_before = {
        r: rig.cloud.metric("dimse_relay_wire_rejected_total", reason=r)
        for r in ("bad_digest", "length_mismatch")
    }
    errors = asyncio.run(_inject_garbage(rig.nats.url, _client_tls(pki, "tester")))
    assert errors == {
        "out_of_order": 1,
        "oversized": 1,
        "bad_digest": 1,
        "inline_bad_digest": 1,
        "inline_length_mismatch": 1,
    }
    time.sleep(0.5)
    cloud = rig.cloud
    for reason in (
        "truncated",
        "bad_magic",
        "bad_version",
        "bad_kind",
        "bad_header",
        "unexpected_kind",
        "out_of_order",
        "oversized",
        "bad_digest",
    ):
        assert cloud.metric("dimse_relay_wire_rejected_total", reason=reason) >= 1, reason
    # one bad digest chunked and one inline, one inline length mismatch
    for reason, injected in (("bad_digest", 2), ("length_mismatch", 1)):
        got = cloud.metric("dimse_relay_wire_rejected_total", reason=reason)
        assert got - reasons_before[reason] == injected, reason
    assert cloud.metric("dimse_relay_wire_rejected_total") >= before + 13
    assert rig.edge.metric("dimse_relay_wire_rejected_total", reason="no_such_inbox") >= 0
    # nothing of the rejected datasets reached the SCP (storescp names files by UID)
    assert not [p for p in rig.good_scp.files() if "1.2.3.4" in p.name]
    # the agents still relay
    rig.good_scp.clear()
    assert pynetdicom_store(rig.port, "GOODSCP", [CT]) == [0]
    assert rig.cloud.proc.poll() is None and rig.edge.proc.poll() is None


def test_client_with_certificate_from_another_ca_is_refused(
    tmp_path: Path, pki: TestPKI, rig: FailureRig
) -> None:
    rogue = AgentProcess(
        "rogue",
        tmp_path,
        {
            "nats": nats_section(rig.nats.url, pki, pki.rogue_client),
            "targets": [{"ae_title": "GOODSCP", "host": LOOPBACK, "port": 9}],
        },
    ).start(wait_ready=False)
    try:
        time.sleep(3)
        assert rogue.proc.poll() is None  # keeps retrying, does not crash
        assert not rogue.ready()
        assert any(
            line.get("msg") in ("NATS connect failed, retrying", "NATS error")
            and "UNKNOWN_CA" in str(line.get("detail"))
            for line in rogue.log_lines()
        ), rogue.log_tail()
    finally:
        rogue.stop()


def test_client_without_certificate_is_refused(rig: FailureRig, pki: TestPKI) -> None:
    import nats

    async def connect() -> None:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        await nats.connect(
            rig.nats.url,
            tls=ctx,
            connect_timeout=2,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )

    with pytest.raises(Exception):
        asyncio.run(connect())


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_check_config_names_every_bad_key(tmp_path: Path, pki: TestPKI) -> None:
    cfg = write_config(
        tmp_path / "bad.yml",
        f"""
nats:
  servers: [tls://localhost:4222]
  tls: {{ca_file: {pki.ca}, cert_file: {pki.client("edge").cert}, key_file: /nonexistent}}
listeners:
  - ae_title: THIS_AE_TITLE_IS_TOO_LONG
    port: 70000
    colour: blue
""",
    )
    proc = subprocess.run(
        [str(DIMSE_RELAY), "check-config", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    err = proc.stderr
    assert "nats.tls: Value error" in err or "nats.tls" in err
    assert "key_file: no such file (or not a regular file)" in err
    assert "listeners.0.ae_title" in err and "at most 16" in err
    assert "listeners.0.port" in err
    assert "listeners.0.colour" in err
    run = subprocess.run(
        [str(DIMSE_RELAY), "run", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 2
    assert "listeners.0.port" in run.stderr


def test_check_config_catches_wrong_key_and_unquoted_numbers(tmp_path: Path, pki: TestPKI) -> None:
    """A key that belongs to another certificate, a CA file that is no certificate, an
    encrypted key and an AE title YAML reads as a number: each named, before the agent would
    fail its TLS handshakes."""
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    edge, cloud = pki.client("edge"), pki.client("cloud")
    encrypted = tmp_path / "encrypted.key"
    lock = ["openssl", "pkey", "-aes256", "-passout", "pass:x"]
    subprocess.run([*lock, "-in", str(edge.key), "-out", str(encrypted)], check=True)
    cfg = write_config(
        tmp_path / "wrong.yml",
        f"""
nats:
  servers: [tls://localhost:4222]
  tls: {{ca_file: {pki.ca}, cert_file: {edge.cert}, key_file: {cloud.key}}}
listeners:
  - {{ae_title: 1234, port: 11112}}
  - ae_title: TLSPACS
    port: 11113
    tls: {{cert_file: {edge.cert}, key_file: {edge.key}, ca_file: {not_pem}}}
  - ae_title: LOCKED
    port: 11114
    tls: {{cert_file: {edge.cert}, key_file: {encrypted}}}
  - {{ae_title: 2024-01-01, port: 11115}}
""",
    )
    proc = subprocess.run(
        [str(DIMSE_RELAY), "check-config", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    err = proc.stderr
    assert f"key_file {cloud.key} is not the private key of cert_file" in err, err
    assert "listeners.0.ae_title" in err and "write the value in quotes" in err, err
    assert "listeners.1.tls" in err and f"ca_file: no PEM certificate in {not_pem}" in err, err
    assert "listeners.2.tls" in err, err
    assert "listeners.3.ae_title" in err and "true/false or a date: write the value" in err, err
    assert f"key_file is encrypted; the agent needs an unencrypted key: {encrypted}" in err, err


def test_check_config_accepts_valid_and_reports_yaml_errors(tmp_path: Path, pki: TestPKI) -> None:
    edge = pki.client("edge")
    good = write_config(
        tmp_path / "good.yml",
        f"""
nats:
  servers: [tls://localhost:4222]
  tls: {{ca_file: {pki.ca}, cert_file: {edge.cert}, key_file: {edge.key}}}
listeners:
  - {{ae_title: PACS, port: 11112}}
""",
    )
    proc = subprocess.run(
        [str(DIMSE_RELAY), "check-config", str(good)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    broken = write_config(tmp_path / "broken.yml", "nats: [unclosed\n")
    proc = subprocess.run(
        [str(DIMSE_RELAY), "check-config", str(broken)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "broken.yml:" in proc.stderr and "invalid YAML" in proc.stderr


def test_agent_refuses_a_server_that_does_not_negotiate_tls(tmp_path: Path, pki: TestPKI) -> None:
    """nats-py would silently talk plaintext to a server that does not ask for TLS; the agent
    configured for TLS must refuse such a server (downgrade protection)."""
    plain = NatsServer(tmp_path / "plain", pki, tls=False).start()
    agent = AgentProcess(
        "downgrade",
        tmp_path,
        {
            "nats": nats_section(f"tls://localhost:{plain.port}", pki, pki.client("edge")),
            "targets": [{"ae_title": "GOODSCP", "host": LOOPBACK, "port": 9}],
        },
    ).start(wait_ready=False)
    try:
        time.sleep(3)
        assert agent.proc.poll() is None
        assert not agent.ready()
        assert plain.varz("connz")["num_connections"] == 0
        assert any("did not negotiate TLS" in str(line.get("detail")) for line in agent.log_lines())
    finally:
        agent.stop()
        plain.stop()


def _big_store_under_way(
    rig: FailureRig, tmp_path: Path
) -> tuple[threading.Thread, dict[str, object]]:
    """storescu sending a 300 MB instance to GOODBIG on its own thread, returned once 20 MiB
    of it have reached the cloud agent; ``result["r"]`` is storescu's result when it ends."""
    from tests.harness.dicom import make_large_instance, storescu

    big = make_large_instance(tmp_path / "big.dcm", 300 * 1024 * 1024)
    rig.good_scp.clear()
    before = rig.cloud.metric("dimse_relay_dataset_bytes_total", direction="received")
    result: dict[str, object] = {}
    sender = threading.Thread(
        target=lambda: result.update(r=storescu(rig.port, [big], "GOODBIG", timeout=180))
    )
    sender.start()
    deadline = time.monotonic() + 120
    while rig.cloud.metric("dimse_relay_dataset_bytes_total", direction="received") < before + (
        20 << 20
    ):
        assert sender.is_alive(), f"storescu ended early: {result}\n{rig.edge.log_tail()}"
        assert time.monotonic() < deadline, f"transfer never started\n{rig.edge.log_tail()}"
        time.sleep(0.05)
    return sender, result


def test_edge_killed_mid_instance_leaves_nothing_partial(rig: FailureRig, tmp_path: Path) -> None:
    """SIGKILL the edge agent while a 300 MB instance is streaming: the target SCP never
    completes any of it (the cloud agent passes the instance on as it arrives but holds back
    its last fragment; it finds the listener gone within seconds and aborts, on which the SCP
    discards what it had), and the cloud agent keeps serving once the edge agent is back."""
    sender, result = _big_store_under_way(rig, tmp_path)
    rig.edge.kill()
    sender.join(180)
    assert result["r"].statuses() != ["Success"]  # type: ignore[attr-defined]
    spool = Path(rig.cloud.config["work_dir"]) / "spool"
    # Well before BIGSCP's session_idle_s (600 s): the target finds the listener gone.
    deadline = time.monotonic() + 30
    while (any(spool.iterdir()) or rig.good_scp.files()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(spool.iterdir()), list(spool.iterdir())
    assert rig.good_scp.files() == []
    assert any(
        "listener gone during an upload" in str(line.get("msg")) for line in rig.cloud.log_lines()
    ), rig.cloud.log_tail()
    rig.edge.start()
    assert pynetdicom_store(rig.port, "GOODSCP", [CT]) == [0]
    assert len(rig.good_scp.files()) == 1


def test_cloud_agent_stopped_mid_instance_fails_the_store_at_once(
    rig: FailureRig, tmp_path: Path
) -> None:
    """SIGTERM the cloud agent while a 300 MB instance is streaming (the listener would wait
    up to 60 s for a chunk acknowledgement): the stopping agent tells the listener why (the
    retryable "unavailable", not a broken SCP association), so storescu gets a failure within
    seconds, the SCP keeps nothing, and a restarted agent serves again."""
    sender, result = _big_store_under_way(rig, tmp_path)
    stopped = time.monotonic()
    rig.cloud.stop()
    sender.join(180)
    took = time.monotonic() - stopped
    out = result["r"]
    # 0xA700, as DCMTK names it
    assert out.statuses() == ["Refused: OutOfResources"], out.output[-2000:]  # type: ignore[attr-defined]
    assert took < 20, f"{took:.1f} s: the listener waited for its chunk_ack_s"
    assert any(
        line.get("msg") == "relay failed" and line.get("why") == "target agent stopping"
        for line in rig.edge.log_lines()
    ), rig.edge.log_tail()
    time.sleep(1)
    assert rig.good_scp.files() == []
    rig.cloud.start()
    deadline = time.monotonic() + 20
    while pynetdicom_store(rig.port, "GOODSCP", [CT]) != [0]:
        assert time.monotonic() < deadline, rig.cloud.log_tail()
        time.sleep(0.5)
    assert len(rig.good_scp.files()) == 1


def test_cloud_agent_stopped_during_many_small_stores_fails_the_rest_at_once(
    rig: FailureRig, tmp_path: Path
) -> None:
    """SIGTERM the cloud agent while storescu sends 300 small instances on one association
    (listener request_s 120 s): the request the stopping agent still holds is answered
    "target agent stopping", one that reaches its session subject after it is gone gets
    NATS's "no responders"; either way storescu gets 0xA700 at once instead of after
    request_s, every Success is at the SCP, and a restarted agent serves again."""
    from tests.harness.dicom import small_instances, storescu

    files = small_instances(tmp_path / "small", 300)
    rig.good_scp.clear()
    result: dict[str, object] = {}
    sender = threading.Thread(
        target=lambda: result.update(r=storescu(rig.port, files, "GOODBIG", timeout=300))
    )
    sender.start()
    deadline = time.monotonic() + 60
    while len(rig.good_scp.files()) < 20:
        assert sender.is_alive(), f"storescu ended before the stop: {result}"
        assert time.monotonic() < deadline, rig.edge.log_tail()
        time.sleep(0.01)
    stopped = time.monotonic()
    rig.cloud.stop()
    sender.join(300)
    took = time.monotonic() - stopped
    out = result["r"]
    answers = out.statuses()  # type: ignore[attr-defined]
    assert took < 30, f"{took:.1f} s after the stop: a request waited for its timeout"
    succeeded = answers.count("Success")
    assert succeeded >= 20, out.output[-2000:]  # type: ignore[attr-defined]
    # storescu halts at the first failure status: 0xA700, as DCMTK names it
    assert answers == ["Success"] * succeeded + ["Refused: OutOfResources"], answers[-3:]
    time.sleep(1)
    # an instance in flight at the stop may be stored although it was answered 0xA700
    assert succeeded <= len(rig.good_scp.files()) <= succeeded + 1
    rig.cloud.start()
    deadline = time.monotonic() + 20
    while pynetdicom_store(rig.port, "GOODSCP", [CT]) != [0]:
        assert time.monotonic() < deadline, rig.cloud.log_tail()
        time.sleep(0.5)


def test_subscription_refused_by_server_permissions_makes_agent_unready(
    tmp_path: Path, pki: TestPKI
) -> None:
    """A target whose NATS user may not subscribe to its AE title's subjects never reports
    ready (so systemd/Kubernetes readiness checks catch a wrong permission set)."""
    users = [
        {
            "user": "CN=tester,O=dimse-relay tests",
            "permissions": {
                "publish": {"allow": ["_INBOX.>"]},
                "subscribe": {"allow": ["_INBOX.>", "dimse.v1.aet.OTHER.>"]},
            },
        }
    ]
    server = NatsServer(tmp_path / "nats", pki, users=users).start()
    agent = AgentProcess(
        "unpermitted",
        tmp_path,
        {
            "nats": nats_section(server.url, pki, pki.client("tester")),
            "targets": [{"ae_title": "GOODSCP", "host": LOOPBACK, "port": 9}],
        },
    ).start(wait_ready=False)
    try:
        # poll (a loaded machine may take seconds to start the agent); it must never turn ready
        deadline = time.monotonic() + 20
        while not any(
            line.get("msg") == "NATS refused a subscription" for line in agent.log_lines()
        ):
            assert time.monotonic() < deadline, agent.log_tail()
            assert not agent.ready()
            time.sleep(0.1)
        code, body = agent.http_get("/readyz")
        assert code == 503, body
        assert b'"subscriptions_permitted": false' in body
    finally:
        agent.stop()
        server.stop()


def test_far_agent_killed_mid_association_costs_one_timeout_not_one_per_request(
    rig: FailureRig,
) -> None:
    """The cloud agent dies (SIGKILL) while an SCU's association is open and comes back. The
    first C-STORE after it fails (NATS answers "no responders" for its far session, or it
    times out), the listener drops the session, and the next C-STOREs of the same association
    go through a new far session: Success, stored, no timeout each."""
    from pydicom import dcmread

    ds = dcmread(CT)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [ds.file_meta.TransferSyntaxUID])
    ae.dimse_timeout = 60
    assoc = ae.associate(LOOPBACK, rig.port, ae_title="GOODSCP")
    assert assoc.is_established
    rig.good_scp.clear()
    try:
        assert assoc.send_c_store(ds).Status == 0
        rig.cloud.kill()
        rig.cloud.start()
        started = time.monotonic()
        first = int(assoc.send_c_store(ds).Status)
        assert first == 0xA700, hex(first)  # out of resources: far session gone
        assert time.monotonic() - started < REQUEST_S + 5
        started = time.monotonic()
        later = [int(assoc.send_c_store(ds).Status) for _ in range(3)]
        assert later == [0, 0, 0], later
        assert time.monotonic() - started < REQUEST_S, "a later request waited for a timeout"
    finally:
        assoc.release()
    assert rig.good_scp.files(), "nothing stored through the new far session"
    assert any("far session lost" in str(line.get("msg")) for line in rig.edge.log_lines()), (
        rig.edge.log_tail()
    )
