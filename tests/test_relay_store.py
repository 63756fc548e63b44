"""C-ECHO and C-STORE through two real agents and a real TLS nats-server, with DCMTK and
pynetdicom as the modality and as the target SCPs."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import pydicom.data
import pytest
from tests.conftest import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, ODD_AET, Relay
from tests.harness.dicom import (
    PynetdicomSCP,
    dataset_bytes,
    echoscu,
    make_large_instance,
    pynetdicom_echo,
    pynetdicom_store,
    storescu,
)

TEST_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent


# storescu proposes uncompressed syntaxes unless told which compressed one a file is in;
# with these it sends each file in its own transfer syntax, so nothing is transcoded.
PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


def corpus() -> list[tuple[Path, str | None]]:
    """Every file in pydicom's test data with its transfer syntax (None: not readable)."""
    out = []
    for path in sorted(p for p in TEST_FILES.iterdir() if p.is_file()):
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
            ts = str(meta.TransferSyntaxUID) if "TransferSyntaxUID" in meta else None
        except Exception:
            ts = None
        out.append((path, ts))
    return out


def storescu_options(ts: str | None) -> list[str]:
    return ["-R", *([PROPOSE[ts]] if ts in PROPOSE else [])]


def test_echo_through_relay_dcmtk_and_pynetdicom(relay: Relay) -> None:
    result = echoscu(relay.port, "CLOUDSCP")
    assert result.returncode == 0, result.output
    assert result.statuses() == ["Success"]
    status, _ = pynetdicom_echo(relay.port, "PYSCP")
    assert status == 0x0000


def test_every_sendable_pydicom_file_arrives_bit_exact(relay: Relay) -> None:
    """Each pydicom test file that DCMTK storescu can send directly to storescp is sent the
    same way through the relay; what storescp stores must be byte-identical."""
    relayed = []
    syntaxes = set()
    for path, ts in corpus():
        relay.direct_scp.clear()
        relay.dcmtk_scp.clear()
        opts = storescu_options(ts)
        direct = storescu(relay.direct_scp.port, [path], "CLOUDSCP", extra=opts)
        direct_files = relay.direct_scp.files()
        if direct.returncode != 0 or direct.statuses() != ["Success"] or len(direct_files) != 1:
            continue  # not something storescu can send (not Part 10, unsupported, ...)
        through = storescu(relay.port, [path], "CLOUDSCP", extra=opts)
        assert through.returncode == 0, f"{path.name}: {through.output[-2000:]}"
        assert through.statuses() == ["Success"], f"{path.name}: {through.output[-2000:]}"
        relay_files = relay.dcmtk_scp.files()
        assert [f.name for f in relay_files] == [f.name for f in direct_files], path.name
        assert dataset_bytes(relay_files[0]) == dataset_bytes(direct_files[0]), path.name
        relayed.append(path.name)
        syntaxes.add(ts)
    # pydicom ships ~86 files, 66 of them sendable by storescu. A broken relay must not pass
    # by finding nothing sendable.
    assert len(relayed) >= 60, relayed
    assert len(syntaxes) >= 10, syntaxes


def test_one_association_many_files_pynetdicom_target(relay: Relay) -> None:
    """Several SOP classes and transfer syntaxes on one association; the pynetdicom SCP gets
    exactly the dataset bytes it gets when the same pynetdicom SCU sends directly, and sees
    the modality's AE title."""
    names = [
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "rtplan.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
    ]
    files = [TEST_FILES / n for n in names]
    direct = PynetdicomSCP("PYSCP").start()
    try:
        assert pynetdicom_store(direct.port, "PYSCP", files) == [0] * len(files)
    finally:
        direct.stop()
    relay.py_scp.received.clear()
    relay.py_scp.calling_aets.clear()
    statuses = pynetdicom_store(relay.port, "PYSCP", files, calling="MODALITY_7")
    assert statuses == [0] * len(files)
    assert len(direct.received) == len(files)
    assert relay.py_scp.received == direct.received
    assert relay.py_scp.calling_aets == ["MODALITY_7"]


def test_target_status_is_relayed_unchanged(relay: Relay) -> None:
    """The SCP answers 0xA702 (Refused: out of resources, a real target status): the SCU
    sees exactly that, not a relay status."""
    statuses = pynetdicom_store(relay.port, "STATUSSCP", [TEST_FILES / "CT_small.dcm"])
    assert statuses == [0xA702]


def test_ae_title_with_nats_special_characters(relay: Relay) -> None:
    relay.odd_scp.received.clear()
    result = storescu(relay.port, [TEST_FILES / "CT_small.dcm"], ODD_AET)
    assert result.returncode == 0, result.output
    assert result.statuses() == ["Success"]
    assert len(relay.odd_scp.received) == 1
    # and nothing leaked to the plain-named targets
    status, _ = pynetdicom_echo(relay.port, ODD_AET)
    assert status == 0


def test_many_small_instances_on_one_association(relay: Relay, tmp_path: Path) -> None:
    """100 instances with distinct UIDs on one DCMTK association, all stored bit-exact."""
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    files = []
    for i in range(100):
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        out = tmp_path / f"ct{i:03d}.dcm"
        src.save_as(out)
        files.append(out)
    relay.direct_scp.clear()
    direct = storescu(relay.direct_scp.port, files, "CLOUDSCP")
    assert direct.statuses() == ["Success"] * 100
    relay.dcmtk_scp.clear()
    result = storescu(relay.port, files, "CLOUDSCP")
    assert result.returncode == 0, result.output[-2000:]
    assert result.statuses() == ["Success"] * 100
    stored = {f.name: dataset_bytes(f) for f in relay.dcmtk_scp.files()}
    expected = {f.name: dataset_bytes(f) for f in relay.direct_scp.files()}
    assert len(stored) == 100
    assert stored == expected


def test_large_instance_streams_with_bounded_memory(relay: Relay, tmp_path: Path) -> None:
    """A 600 MB instance relays bit-exact (by digest) and neither agent's peak RSS reaches
    200 MB: the dataset is streamed in chunks with a bounded window, never held whole."""
    size = 600 * 1024 * 1024
    big = make_large_instance(tmp_path / "big.dcm", size)
    relay.dcmtk_scp.clear()
    started = time.monotonic()
    result = storescu(relay.port, [big], "CLOUDSCP", timeout=600)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.output[-2000:]
    assert result.statuses() == ["Success"]
    (stored,) = relay.dcmtk_scp.files()

    def digest(data_path: Path) -> str:
        h = hashlib.sha256()
        with data_path.open("rb") as fh:
            fh.seek(132)
            head = fh.read(12)
            fh.seek(132 + 12 + int.from_bytes(head[8:12], "little"))
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    assert digest(stored) == digest(big)
    stored.unlink()
    for agent in (relay.edge, relay.cloud):
        rss_mib = agent.peak_rss_kib() / 1024
        assert rss_mib < 200, f"{agent.name} peak RSS {rss_mib:.0f} MiB ({elapsed:.1f}s)"


@pytest.mark.parametrize("called", ["CLOUDSCP", "PYSCP"])
def test_echo_metrics_count_requests(relay: Relay, called: str) -> None:
    before = relay.edge.metric(
        "dimse_relay_requests_total", role="listener", service="C-ECHO", status="success"
    )
    status, _ = pynetdicom_echo(relay.port, called)
    assert status == 0
    after = relay.edge.metric(
        "dimse_relay_requests_total", role="listener", service="C-ECHO", status="success"
    )
    assert after == before + 1


def test_no_patient_data_in_agent_logs(relay: Relay) -> None:
    """After all the relaying above, neither agent's log holds a patient name, patient ID or
    SOP Instance UID of what was sent (identifiers are logged only with log_identifiers)."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    secrets = [str(ds.PatientName), str(ds.PatientID), str(ds.SOPInstanceUID), "LARGE^INSTANCE"]
    for agent in (relay.edge, relay.cloud):
        text = agent.log_path.read_text()
        assert len(text) > 1000  # the agents did log
        for secret in secrets:
            assert secret not in text, (agent.name, secret)
        _, metrics_text = agent.http_get("/metrics")
        for secret in secrets:
            assert secret not in metrics_text.decode()


def test_negotiation_mirrors_what_the_real_scp_accepts(relay: Relay) -> None:
    """The listener accepts exactly what the real SCP accepts: the SCP supports only CT in
    uncompressed syntaxes, so through the relay MR and Verification are rejected too and CT
    is accepted in the syntax the SCP chose, as when the SCU talks to the SCP directly."""
    from pynetdicom import AE

    ae = AE(ae_title="SCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.4.50", EXPLICIT_VR_LE])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification

    def negotiate(port: int) -> tuple[list[tuple[str, str]], list[str]]:
        assoc = ae.associate("127.0.0.1", port, ae_title="CTONLY")
        assert assoc.is_established
        accepted = [(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
        rejected = [cx.abstract_syntax for cx in assoc.rejected_contexts]
        assoc.release()
        return sorted(accepted), sorted(rejected)

    direct = negotiate(relay.ct_only_scp.port)
    assert direct[0] == [(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)]
    assert negotiate(relay.port) == direct


def test_listener_announces_a_one_mib_maximum_pdu(relay: Relay) -> None:
    """The listener's A-ASSOCIATE-AC announces 1 MiB (the default max_pdu), so an SCU sends a
    large instance in few PDUs rather than in pynetdicom's default 16 KiB ones."""
    from pynetdicom import AE

    ae = AE(ae_title="SCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", relay.port, ae_title="CLOUDSCP")
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == 1 << 20
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_sop_class_the_scp_refuses_is_refused_through_the_relay_too(relay: Relay) -> None:
    """An association whose only context the real SCP refuses (MR to a CT-only SCP): through
    the relay the SCU gets the same answer, no context accepted, and sends nothing; it is
    not accepted locally to fail every C-STORE afterwards."""
    mr = TEST_FILES / "MR_small.dcm"
    # -R: propose the file's SOP class only (storescu proposes every storage class otherwise)
    direct = storescu(relay.ct_only_scp.port, [mr], "CTONLY", extra=["-R"])
    through = storescu(relay.port, [mr], "CTONLY", extra=["-R"])
    assert direct.returncode != 0 and direct.statuses() == [], direct.output[-2000:]
    assert through.returncode == direct.returncode, through.output[-2000:]
    assert through.statuses() == [], through.output[-2000:]
    assert "no acceptable presentation contexts" in through.output.lower(), through.output[-2000:]
    assert (
        relay.edge.metric("dimse_relay_associations_total", role="listener", result="no_contexts")
        >= 1
    )


def test_no_ae_titles_or_association_ids_in_info_logs(relay: Relay) -> None:
    """At the default info level, log lines carry no AE titles, association ids or subjects
    (they are written only at debug level)."""
    for agent in (relay.edge, relay.cloud):
        lines = agent.log_lines()
        assert lines
        for line in lines:
            assert not {"assoc_id", "listener", "target", "ae_titles", "subject"} & line.keys()
        text = agent.log_path.read_text()
        for aet in ("CLOUDSCP", "STATUSSCP", "CTONLY", "MODALITY_7", "~2E"):
            assert aet not in text, (agent.name, aet)


def test_storage_associations_take_the_direct_path(relay: Relay, tmp_path: Path) -> None:
    """An association that only proposes Verification and storage contexts is served by the
    agents' direct (asyncio) path at both ends; one that also proposes a query/retrieve
    context stays with pynetdicom. Both relay."""
    from pynetdicom import AE

    def direct(role: str) -> tuple[float, float]:
        return (
            relay.edge.metric("dimse_relay_direct_associations_total", role=role),
            relay.cloud.metric("dimse_relay_direct_associations_total", role=role),
        )

    before = direct("listener"), direct("target")
    result = storescu(relay.port, [TEST_FILES / "CT_small.dcm"], "CLOUDSCP")
    assert result.returncode == 0, result.output
    after = direct("listener"), direct("target")
    assert after[0][0] == before[0][0] + 1  # the edge's listener
    assert after[1][1] == before[1][1] + 1  # the cloud's target

    ae = AE(ae_title="SCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root C-FIND
    assoc = ae.associate("127.0.0.1", relay.port, ae_title="CLOUDSCP")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert (direct("listener"), direct("target")) == after


def test_scu_announcing_a_tiny_maximum_pdu_is_served_and_harmless(relay: Relay) -> None:
    """An SCU whose A-ASSOCIATE-RQ announces a maximum PDU length of 6 bytes (no room for a
    single PDV) is left to pynetdicom rather than the direct path, which could not fragment
    a response for it; the agent keeps serving everyone else."""
    import socket

    from dimse_relay import upper_layer as ul

    before = relay.edge.metric("dimse_relay_direct_associations_total", role="listener")
    rq = ul.associate_rq_pdu(
        "TINY",
        "CLOUDSCP",
        [ul.ProposedContext(1, "1.2.840.10008.1.1", [EXPLICIT_VR_LE])],
        6,
        "1.2.3",
    )
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(rq)
        head = sock.recv(6)
        assert head[:1] in (b"\x02", b"\x03", b"\x07"), head  # AC, RJ or abort: an answer
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass
    assert relay.edge.metric("dimse_relay_direct_associations_total", role="listener") == before
    status, _ = pynetdicom_echo(relay.port, "CLOUDSCP")
    assert status == 0
    assert relay.edge.proc.poll() is None
