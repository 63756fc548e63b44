"""Pure logic: subject encoding, the wire envelope decoder, statuses, configuration."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.harness.pki import TestPKI

from dimse_relay import envelope, subjects
from dimse_relay.config import ConfigError, load_config, parse_config
from dimse_relay.envelope import (
    ChunkHeader,
    ContextProposal,
    EnvelopeError,
    OpenHeader,
    RequestHeader,
)
from dimse_relay.metrics import status_class
from dimse_relay.statuses import FAR_SIDE_TIMEOUT, PROTOCOL_ERROR

AET_CHARS = st.text(
    alphabet=st.sampled_from([c for c in string.printable if c not in "\\\t\n\r\x0b\x0c"]),
    min_size=1,
    max_size=16,
).filter(lambda s: s.strip(" "))


@given(AET_CHARS)
def test_subject_token_roundtrip_and_legal(aet: str) -> None:
    token = subjects.encode_aet(aet)
    assert subjects.decode_aet(token) == aet.strip(" ")
    assert token and not any(c in token for c in ". *>\t")


def test_subject_tokens_of_distinct_titles_differ() -> None:
    titles = ["A.B", "A~2EB", "A*", "A>", "A B", "AB"]
    tokens = {subjects.encode_aet(t) for t in titles}
    assert len(tokens) == len(titles)
    assert subjects.open_subject("dimse", "AI.SEG*>1 X") == "dimse.v1.aet.AI~2ESEG~2A~3E1~20X.open"


@settings(max_examples=500)
@given(st.binary(max_size=2048))
def test_envelope_decoder_never_crashes_on_garbage(data: bytes) -> None:
    try:
        header, body = envelope.decode(data)
    except EnvelopeError as exc:
        assert exc.reason in {"truncated", "bad_magic", "bad_version", "bad_kind", "bad_header"}
    else:
        assert len(body) <= len(data)
        assert header is not None


@given(
    st.integers(0, 2**31),
    st.integers(0, 2**20),
    st.integers(0, 2**40),
    st.booleans(),
    st.binary(max_size=4096),
)
def test_chunk_envelope_roundtrip(
    op_id: int, seq: int, offset: int, final: bool, body: bytes
) -> None:
    hdr = ChunkHeader(op_id=op_id, seq=seq, offset=offset, final=final)
    decoded, rest = envelope.decode(envelope.encode(hdr, body))
    assert decoded == hdr
    assert bytes(rest) == body


@given(st.binary(min_size=8, max_size=512), st.integers(0, 511))
def test_mutated_envelopes_are_rejected_or_valid(body: bytes, flip: int) -> None:
    hdr = RequestHeader(
        op_id=1,
        service="C-STORE",
        abstract_syntax="1.2",
        transfer_syntax="1.2",
        command_length=4,
        dataset_length=len(body),
    )
    raw = bytearray(envelope.encode(hdr, body))
    raw[flip % len(raw)] ^= 0xFF
    try:
        envelope.decode(bytes(raw))
    except EnvelopeError:
        pass


def test_open_for_128_contexts_with_every_transfer_syntax_fits() -> None:
    """The largest OPEN a real SCU causes (128 contexts, each with every transfer syntax
    pynetdicom knows) round-trips; version 1's 2-byte header length could not carry it."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

    contexts = [
        ContextProposal(
            id=2 * i + 1,
            abstract_syntax=str(cx.abstract_syntax),
            transfer_syntaxes=list(ALL_TRANSFER_SYNTAXES),
            scu_role=False,
            scp_role=True,
        )
        for i, cx in enumerate(StoragePresentationContexts[:128])
    ]
    hdr = OpenHeader(
        assoc_id="a" * 32,
        calling_ae_title="WORKSTATION",
        called_ae_title="PACS",
        contexts=contexts,
        reply_inbox="_INBOX.x",
    )
    raw = envelope.encode(hdr)
    assert 0xFFFF < len(raw) < 1024 * 1024  # above version 1's limit, within max_payload
    assert raw[4] == 2
    decoded, body = envelope.decode(raw)
    assert decoded == hdr and len(body) == 0


def test_short_headers_are_version_1_and_both_versions_decode() -> None:
    """A header that fits version 1 is sent as version 1 (agents built before version 2 read
    it); version 2 with the same header decodes the same; an oversized or truncated version 2
    prefix is rejected."""
    hdr = ChunkHeader(op_id=7, seq=1, offset=10, final=False)
    raw = hdr.model_dump_json(exclude_none=True).encode()
    kind = bytes([int(envelope.Kind.CHUNK)])
    v1 = b"DRLY\x01" + kind + len(raw).to_bytes(2, "big")
    assert envelope.encode(hdr, b"data") == v1 + raw + b"data"
    v2 = b"DRLY\x02" + kind + len(raw).to_bytes(4, "big")
    decoded, body = envelope.decode(v2 + raw + b"data")
    assert decoded == hdr and bytes(body) == b"data"
    for truncated in (b"DRLY\x02" + kind + b"\x00\x00", v2 + raw[:-1]):
        with pytest.raises(EnvelopeError) as exc:
            envelope.decode(truncated)
        assert exc.value.reason == "truncated"
    nested = b"[" * 100_000
    with pytest.raises(EnvelopeError) as exc:
        envelope.decode(b"DRLY\x02" + kind + len(nested).to_bytes(4, "big") + nested)
    assert exc.value.reason == "bad_header"
    too_long = b"DRLY\x02" + bytes([int(envelope.Kind.CHUNK)]) + (1 << 30).to_bytes(4, "big")
    with pytest.raises(EnvelopeError) as exc:
        envelope.decode(too_long + raw)
    assert exc.value.reason == "bad_header"


def test_move_storage_contexts_fit_and_cover_the_moved_classes() -> None:
    from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

    from dimse_relay.move_contexts import COMMON_TRANSFER_SYNTAXES, storage_contexts

    ct, mr, sr = (
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.88.22",
    )
    one = storage_contexts([ct])
    assert all(len(cx.transfer_syntax) == 1 for cx in one)
    assert sorted(cx.transfer_syntax[0] for cx in one) == sorted(ALL_TRANSFER_SYNTAXES)
    # a study of five SOP classes: 25 syntaxes each, every common image syntax among them
    five = storage_contexts([ct, mr, sr, "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.1"])
    assert len(five) == 125
    for sop in (ct, mr):
        offered = {cx.transfer_syntax[0] for cx in five if cx.abstract_syntax == sop}
        assert set(COMMON_TRANSFER_SYNTAXES) <= offered, sop
        rle, big_endian, j2k = (
            "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.4.90",
        )
        assert {rle, big_endian, j2k} <= offered
    three = storage_contexts([ct, mr, sr])
    assert len(three) <= 127 and {str(cx.abstract_syntax) for cx in three} == {ct, mr, sr}
    assert all(len(cx.transfer_syntax) == 1 for cx in three)
    many = storage_contexts([f"1.2.3.{i}" for i in range(100)])
    assert len(many) == 100 and all(len(cx.transfer_syntax) > 30 for cx in many)
    fallback = storage_contexts(None)
    assert (
        len(fallback) == min(127, len(StoragePresentationContexts))
        and storage_contexts([f"1.2.{i}" for i in range(200)]) == fallback
    )


def test_status_classes() -> None:
    assert status_class(0x0000) == "success"
    assert status_class(0xFF00) == "pending"
    assert status_class(0xFE00) == "cancel"
    assert status_class(0xB000) == "warning"
    assert status_class(0xA700) == "failure"
    assert FAR_SIDE_TIMEOUT.status_for("C-STORE") == 0xA700
    assert FAR_SIDE_TIMEOUT.status_for("C-ECHO") == 0x0110
    assert PROTOCOL_ERROR.status_for("C-STORE") == 0x0110


def base_config(**extra: object) -> dict[str, object]:
    return {"nats": {"servers": ["tls://x:4222"], "allow_insecure": True}, **extra}


def test_config_requires_tls_unless_explicitly_insecure() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "nats": {"servers": ["tls://x:4222"]},
                "targets": [{"ae_title": "A", "host": "h", "port": 104}],
            },
            environ={},
        )
    assert any("tls is required" in e for e in err.value.errors)


def test_config_rejects_duplicates_and_bad_titles() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            base_config(
                listeners=[
                    {"ae_title": "PACS", "port": 104},
                    {"ae_title": "X", "port": 105},
                    {"ae_title": "PACS", "port": 104},
                ]
            ),
            environ={},
        )
    assert any("served twice" in e for e in err.value.errors)
    with pytest.raises(ConfigError) as err:
        parse_config(
            base_config(targets=[{"ae_title": "BAD\\AET", "host": "h", "port": 104}]), environ={}
        )
    assert any(e.startswith("targets.0.ae_title") for e in err.value.errors)


def test_max_pdu_defaults_to_one_mib_and_refuses_no_limit() -> None:
    cfg = parse_config(
        base_config(
            listeners=[{"ae_title": "PACS", "port": 104}],
            targets=[{"ae_title": "AI", "host": "h", "port": 104}],
        ),
        environ={},
    )
    assert cfg.listeners[0].max_pdu == cfg.targets[0].max_pdu == 1 << 20
    with pytest.raises(ConfigError) as err:
        parse_config(
            base_config(
                listeners=[{"ae_title": "PACS", "port": 104, "max_pdu": 0}],
                targets=[{"ae_title": "AI", "host": "h", "port": 104, "max_pdu": 1 << 30}],
            ),
            environ={},
        )
    assert any(e.startswith("listeners.0.max_pdu") for e in err.value.errors)
    assert any(e.startswith("targets.0.max_pdu") for e in err.value.errors)


def test_pdus_sent_are_at_most_one_mib_whatever_the_peer_announces() -> None:
    from types import SimpleNamespace

    from dimse_relay import dicom

    def sent(peer_maximum: int) -> int:
        peer = SimpleNamespace(maximum_length=peer_maximum)
        dimse = SimpleNamespace(assoc=SimpleNamespace(is_requestor=True, acceptor=peer))
        return dicom._capped_maximum_pdu(dimse)  # type: ignore[arg-type]

    assert sent(0) == sent(1 << 30) == dicom.MAX_PDU_SENT == 1 << 20
    assert sent(16384) == 16384


def test_config_environment_overrides_secrets() -> None:
    cfg = parse_config(
        base_config(targets=[{"ae_title": "A", "host": "h", "port": 104}]),
        environ={
            "DIMSE_RELAY_NATS_PASSWORD": "s3cret",
            "DIMSE_RELAY_NATS_USER": "edge",
            "DIMSE_RELAY_NATS_SERVERS": "tls://a:4222, tls://b:4222",
        },
    )
    assert cfg.nats.password == "s3cret" and cfg.nats.user == "edge"
    assert cfg.nats.servers == ["tls://a:4222", "tls://b:4222"]


def test_listener_tls_config_checks(pki: TestPKI) -> None:
    edge = pki.client("edge")
    tls = {"cert_file": str(edge.cert), "key_file": str(edge.key), "require_client_cert": True}
    with pytest.raises(ConfigError) as err:
        parse_config(base_config(listeners=[{"ae_title": "A", "port": 104, "tls": tls}]), {})
    assert any("require_client_cert needs ca_file" in e for e in err.value.errors)
    ok = {"cert_file": str(edge.cert), "key_file": str(edge.key)}
    with pytest.raises(ConfigError) as err:
        parse_config(
            base_config(
                listeners=[
                    {"ae_title": "A", "port": 104, "tls": ok},
                    {"ae_title": "B", "port": 104},
                ]
            ),
            {},
        )
    assert any("must have the same tls settings" in e for e in err.value.errors)


def test_config_rejects_ports_that_cannot_both_be_bound() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(base_config(listeners=[{"ae_title": "A", "port": 9102}]), {})
    assert any("http.port 9102 is also a listener port" in e for e in err.value.errors)
    with pytest.raises(ConfigError) as err:
        parse_config(
            base_config(
                listeners=[
                    {"ae_title": "A", "port": 104},
                    {"ae_title": "B", "port": 104, "bind": "127.0.0.1"},
                ]
            ),
            {},
        )
    assert any("bound both on all addresses" in e for e in err.value.errors)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("listeners: []\nlisteners: []\n", ":2:1: invalid YAML: duplicate key 'listeners'"),
        ("listeners:\n  - {ae_title: A, port: 1, port: 2}\n", "duplicate key 'port'"),
    ],
)
def test_a_key_given_twice_is_an_error_not_last_one_wins(
    tmp_path: Path, text: str, where: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert where in str(err.value), err.value
