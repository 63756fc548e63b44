"""Malformed DIMSE on a real listener: raw sockets send broken PDUs to an edge agent process
(relaying over TLS NATS to a cloud agent and a DCMTK storescp), plus hypothesis-generated
mutations of a valid A-ASSOCIATE-RQ.

For every case: the agent answers, aborts or closes within a bounded time (the test's own
socket timeouts make a hang a failure, not a stuck run), the process stays alive with a bounded
RSS, and afterwards a normal C-STORE through the same listener succeeds. Nothing partial ever
reaches the SCP.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from tests.harness import LOOPBACK
from tests.harness.agents import AgentProcess, nats_section, relay_pair
from tests.harness.dicom import DcmtkStoreSCP, PynetdicomSCP, dataset_bytes, storescu
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI
from tests.harness.ports import free_port

CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
CALLED = "FUZZSCP"
# Short pynetdicom timeouts towards the SCU so a stalled peer is dropped quickly.
NETWORK_S = 2.0
ACSE_S = 2.0
LISTENER_TIMEOUTS = {
    "open_s": 3.0,
    "request_s": 4.0,
    "chunk_ack_s": 2.0,
    "acse_s": ACSE_S,
    "dimse_s": 4.0,
    "network_s": NETWORK_S,
}
# The agent must have answered or closed the connection by then (timeouts above + margin).
BOUND_S = 8.0
SESSION_IDLE_S = 2.0  # the cloud agent reaps sessions leaked by the open/close race quickly
RSS_GROWTH_LIMIT_KIB = 64 * 1024
PDU_TYPES = {1, 2, 3, 4, 5, 6, 7}


@dataclass
class FuzzRig:
    edge: AgentProcess
    cloud: AgentProcess
    scp: PynetdicomSCP
    port: int
    rss_start_kib: int
    complete: set[bytes]  # what the SCP may hold: complete instances as SCUs sent them


def rss_kib(agent: AgentProcess) -> int:
    assert agent.proc is not None
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, nats_server: NatsServer
) -> Iterator[FuzzRig]:
    work = tmp_path_factory.mktemp("fuzz")
    # A pynetdicom SCP serves many associations at once: a session leaked by the race that
    # test_association_closed_during_open_leaks_no_session shows cannot block later cases.
    scp = PynetdicomSCP(CALLED).start()
    # storescu re-encodes what it sends, so the reference for its stores is a direct transfer.
    direct = storescu(scp.port, [CT], CALLED)
    assert direct.statuses() == ["Success"], direct.output
    complete = {CT_DATASET, *scp.received.values()}
    scp.received.clear()
    cloud = AgentProcess(
        "fuzz-cloud",
        work / "cloud",
        {
            "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
            "targets": [
                {
                    "ae_title": CALLED,
                    "host": LOOPBACK,
                    "port": scp.port,
                    "timeouts": {"session_idle_s": SESSION_IDLE_S},
                }
            ],
        },
    ).start()
    port = free_port()
    edge = AgentProcess(
        "fuzz-edge",
        work / "edge",
        {
            "nats": nats_section(nats_server.url, pki, pki.client("edge")),
            "listeners": [
                {
                    "ae_title": CALLED,
                    "bind": LOOPBACK,
                    "port": port,
                    "timeouts": LISTENER_TIMEOUTS,
                }
            ],
        },
    ).start()
    # Warm up (imports, first association) before taking the RSS baseline.
    assert storescu(port, [CT], CALLED).statuses() == ["Success"]
    yield FuzzRig(edge, cloud, scp, port, rss_kib(edge), complete)
    edge.stop()
    cloud.stop()
    scp.stop()


# -- PDU builders (PS3.8 section 9.3) ---------------------------------------------------------
def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pres_context(ctx_id: int, abstract: str, syntaxes: list[str]) -> bytes:
    body = bytes([ctx_id, 0, 0, 0]) + item(0x30, abstract.encode())
    body += b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return item(0x20, body)


def assoc_rq_body(called: str = CALLED, calling: str = "FUZZER", max_pdu: int = 16384) -> bytes:
    user_info = item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4.5"))
    return (
        struct.pack(">HH", 1, 0)
        + called.encode().ljust(16)
        + calling.encode().ljust(16)
        + b"\0" * 32
        + item(0x10, APP_CONTEXT)
        + pres_context(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])
        + user_info
    )


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


def assoc_rq(**kwargs: object) -> bytes:
    return pdu(0x01, assoc_rq_body(**kwargs))  # type: ignore[arg-type]


def pdv(ctx_id: int, control: int, fragment: bytes, length: int | None = None) -> bytes:
    """One PDV item; control bit 0: command (1) / dataset (0), bit 1: last fragment."""
    n = len(fragment) + 2 if length is None else length
    return struct.pack(">IBB", n, ctx_id, control) + fragment


def store_command(sop_instance_uid: str) -> bytes:
    """The encoded C-STORE-RQ command set (with a correct Command Group Length)."""
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CT_IMAGE_STORAGE
    req.AffectedSOPInstanceUID = sop_instance_uid
    req.Priority = 2
    req.DataSet = None
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.command_set.CommandDataSetType = 0x0001  # a dataset follows
    primitives = list(msg.encode_msg(1, 16384))
    raw = b""
    for prim in primitives:
        for _ctx, value in prim.presentation_data_value_list:
            raw += value[1:]
    return raw


CT_DATASET = dataset_bytes(CT)  # Explicit VR Little Endian, as CT_small.dcm is stored


# -- a raw conversation -----------------------------------------------------------------------
@dataclass
class Outcome:
    pdu_types: list[int]
    closed: bool
    elapsed: float

    @property
    def answered(self) -> bool:
        return bool(self.pdu_types) or self.closed


def read_pdus(sock: socket.socket, deadline: float, until_close: bool = True) -> Outcome:
    """Read PDUs until the agent closes the connection (or, without ``until_close``, until the
    first PDU). A socket timeout past ``deadline`` means the agent hung: the outcome says so."""
    started = time.monotonic()
    types: list[int] = []
    buf = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Outcome(types, False, time.monotonic() - started)
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return Outcome(types, False, time.monotonic() - started)
        except ConnectionResetError:
            return Outcome(types, True, time.monotonic() - started)
        if not data:
            return Outcome(types, True, time.monotonic() - started)
        buf += data
        while len(buf) >= 6:
            ptype, _, length = struct.unpack(">BBI", buf[:6])
            if len(buf) < 6 + length:
                break
            types.append(ptype)
            buf = buf[6 + length :]
            if not until_close:
                return Outcome(types, False, time.monotonic() - started)


def converse(
    port: int,
    steps: list[bytes | Callable[[socket.socket], None]],
    *,
    half_close: bool = True,
    bound_s: float = BOUND_S,
) -> Outcome:
    """Connect, send each step (bytes, or a callable doing its own exchange), optionally shut
    down our sending side, then read what the agent answers until it closes."""
    with socket.create_connection((LOOPBACK, port), timeout=bound_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for step in steps:
                if callable(step):
                    step(sock)
                else:
                    sock.sendall(step)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return Outcome([], True, 0.0)
        return read_pdus(sock, time.monotonic() + bound_s)


def associate_step(sock: socket.socket, called: str = CALLED) -> None:
    """Send a valid A-ASSOCIATE-RQ and require the A-ASSOCIATE-AC."""
    sock.sendall(assoc_rq(called=called))
    got = read_pdus(sock, time.monotonic() + BOUND_S, until_close=False)
    assert got.pdu_types == [0x02], f"expected A-ASSOCIATE-AC, got {got}"


def assert_healthy(rig: FuzzRig) -> None:
    """The agent is alive, its memory bounded, and a normal C-STORE still works."""
    assert rig.edge.proc is not None and rig.edge.proc.poll() is None, rig.edge.log_tail()
    assert rig.cloud.proc is not None and rig.cloud.proc.poll() is None, rig.cloud.log_tail()
    growth = rss_kib(rig.edge) - rig.rss_start_kib
    assert growth < RSS_GROWTH_LIMIT_KIB, f"edge RSS grew by {growth} KiB"
    result = storescu(rig.port, [CT], CALLED, timeout=60)
    assert result.statuses() == ["Success"], result.output[-2000:]


def target_sessions(agent: AgentProcess) -> int:
    """Sessions the agent holds right now, opening ones included (/status)."""
    _, body = agent.http_get("/status")
    return int(json.loads(body)["target_sessions"])


def assert_no_open_session(rig: FuzzRig, what: object) -> None:
    """Once the SCU's connection is gone, the relayed session (and the target's association
    with the real SCP) is closed too."""
    deadline = time.monotonic() + 3.0
    while target_sessions(rig.cloud) > 0:
        assert time.monotonic() < deadline, f"relayed session left open after {what!r}"
        time.sleep(0.05)


def assert_nothing_partial(rig: FuzzRig, also: tuple[bytes, ...] = ()) -> None:
    """Whatever reached the SCP is an instance exactly as an SCU sent it completely (or
    ``also``): never a part of a transfer that was cut short."""
    for uid, data in rig.scp.received.items():
        assert data in rig.complete | set(also), uid


# -- hand-written cases -------------------------------------------------------------------------
def _cases() -> dict[str, tuple[list[bytes | Callable[[socket.socket], None]], bool]]:
    """name -> (steps, half_close). half_close=False: the test stalls, the agent must time out."""
    body = assoc_rq_body()
    command = store_command("1.2.826.0.1.3680043.10.1484.99.1")
    cmd_pdata = pdu(0x04, pdv(1, 0x03, command))
    return {
        "unknown_pdu_type": ([pdu(0x09, b"\0" * 10)], True),
        "unknown_pdu_type_stalled": ([pdu(0xFF, b"")], False),
        "empty_connection": ([], True),
        "short_pdu_header": ([b"\x01\x00\x00"], True),
        "assoc_rq_length_too_long": ([pdu(0x01, body, len(body) + 100)], True),
        "assoc_rq_length_too_short": ([pdu(0x01, body, 20) + body[20:]], True),
        "assoc_rq_length_0xffffffff": ([pdu(0x01, body, 0xFFFFFFFF)], True),
        "assoc_rq_truncated": ([pdu(0x01, body[:90])], True),
        "assoc_rq_item_length_past_end": (
            [pdu(0x01, body[:68] + struct.pack(">BBH", 0x10, 0, 0xFFFF) + body[72:])],
            True,
        ),
        "assoc_rq_presentation_item_zero_length": (
            [pdu(0x01, body[:68] + item(0x10, APP_CONTEXT) + item(0x20, b""))],
            True,
        ),
        "assoc_rq_no_items": ([pdu(0x01, body[:68])], True),
        "assoc_rq_bad_protocol_version": ([pdu(0x01, b"\x00\x07" + body[2:])], True),
        "assoc_rq_empty_called_aet": ([assoc_rq(called=" ")], True),
        "pdata_before_association": ([cmd_pdata], True),
        "release_before_association": ([pdu(0x05, b"\0" * 4)], True),
        "assoc_ac_sent_to_acceptor": ([pdu(0x02, body)], True),
        "pdata_truncated_pdv": (
            [associate_step, pdu(0x04, pdv(1, 0x03, command, length=len(command) + 500))],
            True,
        ),
        "pdata_pdv_length_zero": ([associate_step, pdu(0x04, pdv(1, 0x03, b"", length=0))], True),
        "pdata_pdu_length_past_end_then_eof": (
            [associate_step, cmd_pdata, pdu(0x04, pdv(1, 0x02, CT_DATASET[:1000]), 50_000)],
            True,
        ),
        "store_dataset_shorter_than_announced_then_eof": (
            # the dataset PDV is not the last fragment, and the peer goes away
            [
                associate_step,
                cmd_pdata,
                pdu(0x04, pdv(1, 0x00, CT_DATASET[: len(CT_DATASET) // 2])),
            ],
            True,
        ),
        "store_dataset_shorter_than_announced_stalled": (
            [
                associate_step,
                cmd_pdata,
                pdu(0x04, pdv(1, 0x00, CT_DATASET[: len(CT_DATASET) // 2])),
            ],
            False,
        ),
        "store_dataset_elements_truncated": (
            # marked as the last fragment, but the last element's length runs past the end
            [associate_step, cmd_pdata, pdu(0x04, pdv(1, 0x02, CT_DATASET[:-1000]))],
            True,
        ),
        "garbage_after_association": ([associate_step, b"\xde\xad\xbe\xef" * 64], True),
        "second_assoc_rq_on_association": ([associate_step, assoc_rq()], True),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_is_answered_and_harmless(rig: FuzzRig, name: str) -> None:
    steps, half_close = CASES[name]
    rig.scp.received.clear()
    outcome = converse(rig.port, steps, half_close=half_close)
    assert outcome.closed, f"{name}: connection still open after {BOUND_S}s: {outcome}"
    limit = NETWORK_S + ACSE_S + 3 if not half_close else BOUND_S
    assert outcome.elapsed < limit, outcome
    assert all(t in PDU_TYPES for t in outcome.pdu_types), outcome
    assert 0x02 not in outcome.pdu_types or name in ("second_assoc_rq_on_association",), outcome
    time.sleep(0.3)
    # A dataset the SCU marked complete is relayed as it is, even if its last element is
    # cut: the relay does not parse datasets (the SCP decides, as it would directly).
    also = (CT_DATASET[:-1000],) if name == "store_dataset_elements_truncated" else ()
    assert_nothing_partial(rig, also)
    assert_no_open_session(rig, name)
    assert_healthy(rig)


def test_valid_raw_association_stores_bit_exact(rig: FuzzRig) -> None:
    """The raw PDU builders are right: a hand-built association and C-STORE succeed and the
    SCP stores the dataset byte for byte (so the malformed cases above are near misses)."""
    rig.scp.received.clear()
    uid = "1.2.826.0.1.3680043.10.1484.99.2"
    command = store_command(uid)
    got: dict[str, Outcome] = {}

    def store(sock: socket.socket) -> None:
        sock.sendall(pdu(0x04, pdv(1, 0x03, command)))
        sock.sendall(pdu(0x04, pdv(1, 0x02, CT_DATASET)))
        got["rsp"] = read_pdus(sock, time.monotonic() + BOUND_S, until_close=False)
        sock.sendall(pdu(0x05, b"\0" * 4))  # A-RELEASE-RQ

    outcome = converse(rig.port, [associate_step, store], half_close=False)
    assert got["rsp"].pdu_types == [0x04], got
    assert outcome.pdu_types == [0x06] and outcome.closed, outcome  # A-RELEASE-RP, then close
    assert rig.scp.received == {uid: CT_DATASET}


# -- hypothesis: mutations of a valid A-ASSOCIATE-RQ ---------------------------------------------
VALID_RQ = assoc_rq()


@st.composite
def mutated_rq(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID_RQ)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "length"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "length" and len(data) >= 6:
            # rewrite the PDU length or an item length (item headers start at offset 74)
            where = draw(st.sampled_from([2, 74 + 2, 74 + 4 + len(APP_CONTEXT) + 2]))
            size = 4 if where == 2 else 2
            if where + size <= len(data):
                value = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF]))
                data[where : where + size] = (value & (256**size - 1)).to_bytes(size, "big")
    return bytes(data)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=mutated_rq())
def test_mutated_association_requests(rig: FuzzRig, payload: bytes) -> None:
    outcome = converse(rig.port, [payload], half_close=True)
    assert outcome.closed, f"connection still open after {BOUND_S}s: {outcome} {payload.hex()}"
    assert all(t in PDU_TYPES for t in outcome.pdu_types), outcome
    assert rig.edge.proc is not None and rig.edge.proc.poll() is None, rig.edge.log_tail()
    # Sessions are not checked per example ("valid A-ASSOCIATE-RQ + junk" closes while the far
    # OPEN is in flight and is cleaned up asynchronously); the final test checks none is left.


def test_after_fuzzing_agent_is_healthy_and_logs_no_tracebacks(rig: FuzzRig) -> None:
    assert_nothing_partial(rig)
    assert_healthy(rig)
    code, _ = rig.edge.http_get("/readyz")
    assert code == 200
    deadline = time.monotonic() + SESSION_IDLE_S + 8  # the target's reaper runs every 5 s
    while target_sessions(rig.cloud) > 0:
        assert time.monotonic() < deadline, "target sessions not reaped"
        time.sleep(0.2)
    text = rig.edge.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def test_association_closed_during_open_leaks_no_session(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    """An SCU that gives up while the listener is still opening the far association (its
    ACSE timeout shorter than open_s): the far session and its association with the real
    SCP are closed at once, and the listener's gauge comes back down."""
    called = "FUZZRACE"
    scp = PynetdicomSCP(called).start()
    cloud, edge, port = relay_pair(
        tmp_path,
        nats_server.url,
        pki,
        called,
        scp.port,
        name="fuzz-race",
        listener={"timeouts": LISTENER_TIMEOUTS},
    )
    try:
        cloud.start()
        edge.start()
        for _ in range(5):
            # A-ASSOCIATE-RQ, then A-ABORT and close without waiting for the answer.
            converse(port, [assoc_rq(called=called) + pdu(0x07, b"\0" * 4)])
        time.sleep(2.0)
        assert target_sessions(cloud) == 0
        assert edge.metric("dimse_relay_active_associations", role="listener") == 0
    finally:
        edge.stop()
        cloud.stop()
        scp.stop()


def test_pdv_for_unknown_context_closes_the_relayed_session(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    """A P-DATA for a presentation context that was never accepted kills pynetdicom's DUL
    thread without any event; the listener still notices the dead association and closes the
    relayed session, so a single-association SCP is free for the next caller."""
    called = "FUZZLEAK"
    scp = DcmtkStoreSCP(tmp_path / "scp", called).start()
    cloud, edge, port = relay_pair(
        tmp_path,
        nats_server.url,
        pki,
        called,
        scp.port,
        name="fuzz-leak",
        listener={"timeouts": LISTENER_TIMEOUTS},
    )
    try:
        cloud.start()
        edge.start()
        command = store_command("1.2.826.0.1.3680043.10.1484.99.3")
        outcome = converse(
            port,
            [lambda s: associate_step(s, called), pdu(0x04, pdv(99, 0x03, command))],
        )
        assert outcome.closed, outcome
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            if cloud.metric("dimse_relay_active_associations", role="target") == 0:
                break
            time.sleep(0.2)
        assert cloud.metric("dimse_relay_active_associations", role="target") == 0
        result = storescu(port, [CT], called, timeout=30)
        assert result.statuses() == ["Success"], result.output[-1500:]
    finally:
        edge.stop()
        cloud.stop()
        scp.stop()


def test_stalled_partial_pdu_is_timed_out(rig: FuzzRig, tmp_path: Path) -> None:
    """Slowloris: peers that send the first bytes of an A-ASSOCIATE-RQ and stall must be cut
    after acse_s/network_s, and must not keep other SCUs out."""
    port = free_port()
    agent = AgentProcess(
        "fuzz-edge-stall",
        tmp_path,
        {
            "nats": rig.edge.config["nats"],
            "listeners": [
                {
                    "ae_title": CALLED,
                    "bind": LOOPBACK,
                    "port": port,
                    "max_associations": 2,
                    "timeouts": LISTENER_TIMEOUTS,
                }
            ],
        },
    ).start()
    socks = []
    try:
        body = assoc_rq_body()
        for _ in range(3):
            sock = socket.create_connection((LOOPBACK, port), timeout=BOUND_S)
            sock.sendall(pdu(0x01, body, len(body) + 100)[:40])
            socks.append(sock)
        time.sleep(NETWORK_S + ACSE_S + 1)
        outcomes = [read_pdus(s, time.monotonic() + 1.0) for s in socks]
        result = storescu(port, [CT], CALLED, timeout=60)
        assert result.statuses() == ["Success"], result.output[-1500:]
        assert all(o.closed for o in outcomes), outcomes
    finally:
        for sock in socks:
            sock.close()
        agent.stop()


def test_huge_announced_pdu_is_not_buffered(rig: FuzzRig, tmp_path: Path) -> None:
    """Announce a 4 GiB A-ASSOCIATE-RQ and stream 400 MiB of it: the listener should drop the
    connection long before; its RSS must stay bounded."""
    # Its own edge agent, so the memory it may take does not count against the rig's.
    port = free_port()
    agent = AgentProcess(
        "fuzz-edge-huge",
        tmp_path,
        {
            "nats": rig.edge.config["nats"],
            "listeners": [
                {"ae_title": CALLED, "bind": LOOPBACK, "port": port, "timeouts": LISTENER_TIMEOUTS}
            ],
        },
    ).start()
    try:
        base = rss_kib(agent)
        block = b"\0" * (1 << 20)
        sent = 0
        with socket.create_connection((LOOPBACK, port), timeout=BOUND_S) as sock:
            sock.sendall(pdu(0x01, b"", 0xFFFFFFFF))
            try:
                for _ in range(400):
                    sock.sendall(block)
                    sent += len(block)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            peak = agent.peak_rss_kib()
        assert agent.proc is not None and agent.proc.poll() is None
        growth_mib = (peak - base) / 1024
        assert growth_mib < 64, f"listener buffered {growth_mib:.0f} MiB of {sent >> 20} MiB sent"
    finally:
        agent.stop()
