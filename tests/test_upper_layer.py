"""The direct path's Upper Layer codec (upper_layer.py): pure logic, checked against
pynetdicom's own PDU classes where it has them."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import P_DATA_TF

from dimse_relay import upper_layer as ul


def _decoded_pdvs(parts: list[bytes | memoryview]) -> list[tuple[int, int, bytes]]:
    """Split the written byte stream into PDUs and decode each with pynetdicom."""
    stream = b"".join(bytes(p) for p in parts)
    out = []
    while stream:
        length = struct.unpack(">I", stream[2:6])[0]
        pdu = P_DATA_TF()
        pdu.decode(stream[: 6 + length])
        for item in pdu.presentation_data_value_items:
            value = item.presentation_data_value
            out.append((item.presentation_context_id, value[0], value[1:]))
        stream = stream[6 + length :]
    return out


@pytest.mark.parametrize("max_pdu", [0, 1024, 16384, 1 << 20, 64 << 20])
def test_fragments_respect_the_peer_maximum_and_mark_only_the_last(max_pdu: int) -> None:
    data = bytes(range(256)) * 1000  # 256,000 bytes
    parts = list(ul.pdata_fragments(5, data, False, True, max_pdu))
    pdvs = _decoded_pdvs(parts)
    limit = min(max_pdu or ul.MAX_SEND_PDU, ul.MAX_SEND_PDU)
    assert all(len(value) + 6 <= limit for _, _, value in pdvs)
    assert b"".join(value for _, _, value in pdvs) == data
    assert [control for _, control, _ in pdvs] == [0] * (len(pdvs) - 1) + [2]
    assert {cid for cid, _, _ in pdvs} == {5}


def test_a_command_not_last_and_an_empty_fragment() -> None:
    ((cid, control, value),) = _decoded_pdvs(
        list(ul.pdata_fragments(1, b"\x01\x02", True, False, 0))
    )
    assert (cid, control, value) == (1, 1, b"\x01\x02")
    ((_, control, value),) = _decoded_pdvs(list(ul.pdata_fragments(3, b"", False, True, 0)))
    assert (control, value) == (2, b"")


@pytest.mark.parametrize("max_pdu", [1, 5, 6, 7])
def test_a_tiny_peer_maximum_still_ends(max_pdu: int) -> None:
    """A peer announcing less than one PDV header is not served the direct way; should the
    codec meet one anyway, fragmenting must end (it once looped forever)."""
    parts = list(ul.pdata_fragments(1, b"x" * 5000, False, True, max_pdu))
    assert b"".join(v for _, _, v in _decoded_pdvs(parts)) == b"x" * 5000


def test_parse_pdata_reads_what_pdata_fragments_writes_and_refuses_bad_lengths() -> None:
    body = b"".join(bytes(p) for p in ul.pdata_fragments(7, b"abc", True, True, 0))[6:]
    (pdv,) = ul.parse_pdata(body)
    assert (pdv.context_id, pdv.command, pdv.last, bytes(pdv.data)) == (7, True, True, b"abc")
    for broken in (body[:5], struct.pack(">IBB", 1, 7, 3), struct.pack(">IBB", 99, 7, 3) + b"x"):
        with pytest.raises(ul.ULError):
            ul.parse_pdata(broken)


def test_command_sets_round_trip_and_responses_answer_the_request() -> None:
    request = ul.encode_elements(
        {
            ul.TAG_AFFECTED_SOP_CLASS: ul.uid("1.2.840.10008.5.1.4.1.1.2"),
            ul.TAG_COMMAND_FIELD: ul.us(ul.C_STORE_RQ),
            ul.TAG_MESSAGE_ID: ul.us(42),
            ul.TAG_DATA_SET_TYPE: ul.us(0),
            ul.TAG_AFFECTED_SOP_INSTANCE: ul.uid("1.2.3.4"),
        }
    )
    command = ul.parse_command(request)
    assert command.command_field == ul.C_STORE_RQ and command.has_data_set
    assert command.text(ul.TAG_AFFECTED_SOP_INSTANCE) == "1.2.3.4"
    status = {ul.TAG_STATUS: ul.us(0xA700), 0x00000902: ul.error_comment("full")}
    rsp = ul.parse_command(ul.response(command, status))
    assert rsp.command_field == ul.C_STORE_RSP and not rsp.has_data_set
    assert rsp.us(ul.TAG_MESSAGE_ID_RESPONDED) == 42
    assert ul.status_of(ul.status_elements(rsp)) == 0xA700
    assert rsp.text(ul.TAG_AFFECTED_SOP_INSTANCE) == "1.2.3.4"
    # The group length is what follows it.
    assert struct.unpack("<I", request[8:12])[0] == len(request) - 12
    with pytest.raises(ul.ULError):
        ul.parse_command(b"\x08\x00\x18\x00\x02\x00\x00\x00ab")  # not group 0000


def test_association_pdus_decode_with_pynetdicom() -> None:
    rq = ul.associate_rq_pdu(
        "SCU",
        "SCP",
        [ul.ProposedContext(3, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])],
        16384,
        "1.2.3",
    )
    prim = ul.decode_associate_rq(rq[6:])
    assert (str(prim.calling_ae_title), str(prim.called_ae_title)) == ("SCU", "SCP")
    assert prim.maximum_length_received == 16384
    ac = ul.associate_ac_pdu(
        "SCU",
        "SCP",
        [ul.ContextAnswer(3, 0, "1.2.840.10008.1.2"), ul.ContextAnswer(5, 3)],
        1 << 20,
        "1.2.3",
    )
    results = ul.decode_associate_ac(ac[6:]).presentation_context_definition_results_list
    assert [(cx.context_id, cx.result) for cx in results] == [(3, 0), (5, 3)]
    assert ul.decode_associate_rj(ul.associate_rj_pdu(1, 1, 7)[6:]) == (1, 1, 7)
