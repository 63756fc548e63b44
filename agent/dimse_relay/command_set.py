"""DIMSE command sets and Part 10 File Meta Information, without pydicom datasets.

A relayed C-STORE or C-ECHO crosses pynetdicom's message layer four times (request and
response, on both agents). There each command set becomes a pydicom ``Dataset`` element by
element, with value validation, is written with pydicom's generic writer and, on the other
side, read back into a ``Dataset`` and converted element by element; the spool files get
their File Meta Information the same way. For a small instance that was a large part of an
agent's CPU time (profiled: 4.3 to 4.9 ms per instance and agent before, about half after),
and the relay is a chain: every millisecond of it is a millisecond the modality waits for
its status.

The few messages on that path are encoded here directly from pynetdicom's primitives, to the
same bytes pynetdicom would produce, and decoded to the same values pynetdicom's pydicom-based
decoder gives the primitive (the tests compare both ways). Anything unusual returns ``None``
and the caller uses pynetdicom's own code: when encoding, a value that is not plain ASCII,
contains a backslash, is out of range or of another type; when decoding, also an element the
message does not define, a value with more than one item or an empty one, and an Error
Comment or Offending Element (failure responses). File Meta is written here only for
non-empty ASCII UIDs (meta_values_supported) and read only where its group length ends the
group; the callers use pydicom otherwise.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pynetdicom.dimse_messages import _COMMAND_SET_KEYWORDS

# Command Field values (PS3.7 E.1-1) and whether the message carries a data set.
_COMMAND_FIELD = {
    "C-STORE-RQ": 0x0001,
    "C-STORE-RSP": 0x8001,
    "C-ECHO-RQ": 0x0030,
    "C-ECHO-RSP": 0x8030,
}
FAST_MESSAGES = frozenset(_COMMAND_FIELD)
_NO_DATA_SET = 0x0101
_DATA_SET = 0x0001
_COMPUTED = ("CommandGroupLength", "CommandField", "CommandDataSetType")


def _fields(message: str) -> tuple[tuple[str, int, str], ...]:
    out = []
    for keyword in _COMMAND_SET_KEYWORDS[message]:
        if keyword in _COMPUTED:
            continue
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        out.append((keyword, int(tag), dictionary_VR(tag)))
    return tuple(out)


# (keyword, tag, VR) of each primitive-supplied element of a message, as pynetdicom lists them.
_MESSAGE_FIELDS = {message: _fields(message) for message in _COMMAND_FIELD}
_TAG_COMMAND_FIELD = 0x00000100
_TAG_DATA_SET_TYPE = 0x00000800
_TAG_GROUP_LENGTH = 0x00000000
_PAD = {"UI": b"\0", "AE": b" ", "LO": b" ", "SH": b" "}


def _element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _value_bytes(vr: str, value: Any) -> bytes | None:
    if vr == "US":
        if type(value) is not int or not 0 <= value <= 0xFFFF:
            return None
        return struct.pack("<H", value)
    if vr in _PAD:
        # A backslash would be a value delimiter: pydicom writes such values its own way.
        if not isinstance(value, str) or not value.isascii() or "\\" in value:
            return None
        raw = value.encode("ascii")
        return raw + _PAD[vr] if len(raw) % 2 else raw
    if vr == "AT":
        tags = [value] if type(value) is int else value
        # A tuple is one tag (group, element) to pydicom: left to it.
        if not isinstance(tags, list) or not all(
            isinstance(t, int) and 0 <= t <= 0xFFFFFFFF for t in tags
        ):
            return None
        return b"".join(struct.pack("<HH", int(t) >> 16, int(t) & 0xFFFF) for t in tags)
    return None


def encode_primitive(primitive: Any, message: str, has_data_set: bool) -> bytes | None:
    """The command set pynetdicom's ``primitive_to_message`` and ``encode_msg`` give for
    ``primitive`` as ``message`` ("C-STORE-RQ" ...), or None where this module does not
    handle the message or one of its values."""
    fields = _MESSAGE_FIELDS.get(message)
    if fields is None:
        return None
    elements: list[tuple[int, bytes]] = [
        (_TAG_COMMAND_FIELD, struct.pack("<H", _COMMAND_FIELD[message])),
        (_TAG_DATA_SET_TYPE, struct.pack("<H", _DATA_SET if has_data_set else _NO_DATA_SET)),
    ]
    for keyword, tag, vr in fields:
        value = getattr(primitive, keyword, None)
        if value is None:
            continue
        raw = _value_bytes(vr, value)
        if raw is None:
            return None
        elements.append((tag, raw))
    elements.sort()
    body = b"".join(_element(tag, raw) for tag, raw in elements)
    return _element(_TAG_GROUP_LENGTH, struct.pack("<I", len(body))) + body


# --- decoding received command sets ---------------------------------------------------------

# Command Field -> {tag: (keyword, VR)} of the elements a received message may carry on the
# fast path: those pynetdicom defines for it with a UI, US or AE value (an ErrorComment or
# OffendingElement, as in failure responses, goes to pydicom).
_RECEIVED_FIELDS = {
    _COMMAND_FIELD[message]: {
        tag: (keyword, vr) for keyword, tag, vr in fields if vr in ("UI", "US", "AE")
    }
    for message, fields in _MESSAGE_FIELDS.items()
}


class ReceivedCommand:
    """A received C-ECHO or C-STORE command set, standing in for the pydicom ``Dataset``
    pynetdicom's ``decode_msg`` makes of it: the attributes it reads and, in ``values``, what
    its ``message_to_primitive`` puts on the primitive (keyword -> value, in tag order)."""

    def __init__(self, command_field: int, data_set_type: int, values: dict[str, Any]):
        self.CommandField = command_field
        self.CommandDataSetType = data_set_type
        self.values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def _received_value(vr: str, raw: bytes) -> Any:
    """The value pydicom decodes (VM 1, ASCII only), or None to leave it to pydicom."""
    if vr == "US":
        return struct.unpack("<H", raw)[0] if len(raw) == 2 else None
    if not raw.isascii() or b"\\" in raw:
        return None
    text = raw.decode("ascii")
    text = (text.rstrip("\0 ") if vr == "UI" else text).strip()
    return text or None


def decode_command_set(raw: bytes) -> ReceivedCommand | None:
    """A received Implicit VR Little Endian command set of a C-ECHO or C-STORE message, or
    None where pynetdicom's decoder is to handle it."""
    elements: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        tag = group << 16 | element
        if pos + length > end or tag in elements:
            return None
        elements[tag] = raw[pos : pos + length]
        pos += length
    group_length = elements.pop(_TAG_GROUP_LENGTH, b"\0\0\0\0")
    command_field = elements.pop(_TAG_COMMAND_FIELD, b"")
    data_set_type = elements.pop(_TAG_DATA_SET_TYPE, b"")
    if len(group_length) != 4 or len(command_field) != 2 or len(data_set_type) != 2:
        return None
    field = struct.unpack("<H", command_field)[0]
    allowed = _RECEIVED_FIELDS.get(field)
    if allowed is None:
        return None
    values: dict[str, Any] = {}
    for tag in sorted(elements):
        spec = allowed.get(tag)
        if spec is None:
            return None
        value = _received_value(spec[1], elements[tag])
        if value is None:
            return None
        values[spec[0]] = value
    return ReceivedCommand(field, struct.unpack("<H", data_set_type)[0], values)


# --- Part 10 File Meta Information (Explicit VR Little Endian, PS3.10 7.1) ----------------

_META_VERSION = b"\x00\x01"
_LONG_LENGTH_VRS = frozenset(
    (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"SV", b"UC", b"UR", b"UT", b"UN", b"UV")
)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", 2, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def meta_values_supported(*values: str) -> bool:
    """Whether file_meta_bytes writes these values as pydicom would: plain ASCII, not
    empty (pydicom refuses an empty required element), no value delimiter."""
    return all(v and v.isascii() and "\\" not in v for v in values)


def file_meta_bytes(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_uid: str,
    implementation_version: str,
) -> bytes:
    """Preamble, "DICM" and the File Meta Information group, as pydicom writes it for these
    values (group length first, elements in tag order); only for values that
    meta_values_supported accepts (others raise UnicodeEncodeError or differ)."""
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", _META_VERSION),
            _meta_element(0x0002, b"UI", _text(sop_class_uid, b"\0")),
            _meta_element(0x0003, b"UI", _text(sop_instance_uid, b"\0")),
            _meta_element(0x0010, b"UI", _text(transfer_syntax, b"\0")),
            _meta_element(0x0012, b"UI", _text(implementation_uid, b"\0")),
            _meta_element(0x0013, b"SH", _text(implementation_version, b" ")),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body


# Largest File Meta group read by read_file_meta; anything larger is left to pydicom.
_MAX_META = 64 * 1024


def read_file_meta(fh: BinaryIO) -> tuple[dict[int, bytes], int] | None:
    """The File Meta elements (element number -> raw value) and the dataset offset of a Part
    10 file that starts with a preamble, "DICM" and a File Meta Information Group Length, as
    the relay's and pynetdicom's spool files do; None for any other layout."""
    fh.seek(0)
    head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return None
    if struct.unpack_from("<H", head, 138)[0] != 4:
        return None
    length = struct.unpack_from("<I", head, 140)[0]
    if length > _MAX_META:
        return None
    group = fh.read(length)
    if len(group) != length:
        return None
    values: dict[int, bytes] = {}
    pos = 0
    while pos < length:
        if pos + 8 > length:
            return None
        grp, element, vr = struct.unpack_from("<HH2s", group, pos)
        if grp != 2:
            return None
        if vr in _LONG_LENGTH_VRS:
            if pos + 12 > length:
                return None
            size = struct.unpack_from("<I", group, pos + 8)[0]
            pos += 12
        else:
            size = struct.unpack_from("<H", group, pos + 6)[0]
            pos += 8
        if pos + size > length:
            return None
        values[element] = group[pos : pos + size]
        pos += size
    # pydicom reads File Meta elements up to the first one of another group, whatever the
    # group length says: a group length that ends the group early is left to it.
    if fh.read(2) == b"\x02\x00":
        return None
    return values, 144 + length


def meta_text(values: dict[int, bytes], element: int) -> str | None:
    """A UI value of read_file_meta's result; None if absent or not plain ASCII."""
    raw = values.get(element)
    if raw is None or not raw.isascii():
        return None
    return raw.decode("ascii").rstrip("\0 ")
