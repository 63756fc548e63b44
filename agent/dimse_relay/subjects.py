"""NATS subject names for AE titles.

AE titles may contain characters that are not legal in a NATS subject token (``.``, ``*``,
``>``, spaces) or that we keep out for safety. A token keeps ``A-Z a-z 0-9 _ -`` as they are
and writes every other byte as ``~`` followed by two upper-case hex digits, so the mapping is
reversible and ``~`` itself is escaped. Leading and trailing spaces (DICOM padding) are
removed before encoding.

Subjects (``P`` is ``nats.subject_prefix``, ``T`` the encoded AE title)::

    P.v1.aet.T.open            association open requests, queue group "dimse-relay.T"
    P.v1.aet.T.session.SID     every message of one relayed association, to the agent holding it

The same rule is implemented by the Ansible filter ``aet_subject_token`` so the NATS
permissions the collection renders always match what the agent uses.
"""

from __future__ import annotations

import re
import string

_SAFE = frozenset(string.ascii_letters + string.digits + "_-")
_ESCAPE = re.compile(r"~([0-9A-F]{2})")
VERSION = "v1"


def encode_aet(ae_title: str) -> str:
    """Encode an AE title as one NATS subject token."""
    stripped = ae_title.strip(" ")
    if not stripped:
        raise ValueError("empty AE title")
    out = []
    for byte in stripped.encode("ascii"):
        ch = chr(byte)
        out.append(ch if ch in _SAFE else f"~{byte:02X}")
    return "".join(out)


def decode_aet(token: str) -> str:
    """Invert :func:`encode_aet`."""
    if not all(c in _SAFE or c == "~" or c in string.hexdigits for c in token):
        raise ValueError(f"not an encoded AE title token: {token!r}")
    pieces = []
    i = 0
    while i < len(token):
        if token[i] == "~":
            match = _ESCAPE.match(token, i)
            if not match:
                raise ValueError(f"bad escape in AE title token: {token!r}")
            pieces.append(chr(int(match.group(1), 16)))
            i = match.end()
        else:
            pieces.append(token[i])
            i += 1
    return "".join(pieces)


def aet_root(prefix: str, ae_title: str) -> str:
    return f"{prefix}.{VERSION}.aet.{encode_aet(ae_title)}"


def open_subject(prefix: str, ae_title: str) -> str:
    return f"{aet_root(prefix, ae_title)}.open"


def open_queue_group(ae_title: str) -> str:
    return f"dimse-relay.{encode_aet(ae_title)}"


def session_subject(prefix: str, ae_title: str, session_id: str) -> str:
    return f"{aet_root(prefix, ae_title)}.session.{session_id}"
