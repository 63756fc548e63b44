"""The storage contexts a target proposes when it performs a C-MOVE as a C-GET.

A direct C-MOVE lets the PACS propose each instance in the transfer syntax it holds it in. A
C-GET reverses that: the agent proposes and the PACS accepts one transfer syntax per context,
normally an uncompressed one, and must then transcode (or fail: Orthanc cannot transcode
JPEG 2000 without a plugin). So the target first asks the PACS which SOP classes the move
covers (a C-FIND at IMAGE level for the move's keys) and proposes, for each of them, one
context per transfer syntax, so the PACS finds the syntax it holds and sends the instance as
it is. If the PACS does not answer that query, the target falls back to one context per
common storage SOP class with every transfer syntax.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_context
from pynetdicom.presentation import PresentationContext

LOG = logging.getLogger("dimse_relay.target")

# C-MOVE models and the C-FIND model of the same information model (Patient/Study Only has
# no IMAGE level, so it is not asked).
FIND_FOR_MOVE = {
    "1.2.840.10008.5.1.4.1.2.1.2": "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root
    "1.2.840.10008.5.1.4.1.2.2.2": "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root
}
STORAGE_CONTEXTS = 127  # 128 presentation contexts, one of them for the C-GET model
# The syntaxes images are stored in most, in that order; the others (video, JPIP, JPEG XL,
# HTJ2K, SMPTE) follow in pynetdicom's order. When a move covers several SOP classes there is
# no room for every syntax of each, and the rarest are left out: with five classes each gets
# 25, all of these included.
COMMON_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still in old archives)
    "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile / Level 4.1
]
TRANSFER_SYNTAXES = COMMON_TRANSFER_SYNTAXES + [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in COMMON_TRANSFER_SYNTAXES
]


def storage_contexts(sop_classes: list[str] | None) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) for the SOP classes the move covers, as
    many syntaxes per class as fit; without them (or with too many), every common storage
    SOP class with all transfer syntaxes in one context."""
    if sop_classes:
        per_class = STORAGE_CONTEXTS // len(sop_classes)
        if per_class >= 2:
            return [
                build_context(sop, ts)
                for sop in sop_classes
                for ts in TRANSFER_SYNTAXES[:per_class]
            ]
        if len(sop_classes) <= STORAGE_CONTEXTS:
            return [build_context(sop, ALL_TRANSFER_SYNTAXES) for sop in sop_classes]
    return [
        build_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        for cx in StoragePresentationContexts[:STORAGE_CONTEXTS]
    ]


def image_query(identifier: Dataset) -> Dataset:
    """The move's keys as an IMAGE level C-FIND returning each instance's SOP Class UID."""
    query = Dataset()
    for elem in identifier:
        if elem.keyword not in ("QueryRetrieveLevel", "SOPClassUID"):
            query.add(elem)
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPClassUID = ""
    if "SOPInstanceUID" not in query:
        query.SOPInstanceUID = ""
    return query


def moved_sop_classes(
    ae: AE, address: tuple[str, int], called: str, move_model: str, identifier: Dataset, **kw: Any
) -> list[str] | None:
    """(worker thread) The SOP classes of the instances a C-MOVE covers, asked of the SCP;
    None when it cannot say (no IMAGE level query, refused, failed, a match without the
    class). ``kw`` are pynetdicom associate() options."""
    find_model = FIND_FOR_MOVE.get(move_model)
    if find_model is None:
        return None
    assoc = ae.associate(*address, contexts=[build_context(find_model)], ae_title=called, **kw)
    if not assoc.is_established:
        return None
    classes: set[str] = set()
    known = False
    try:
        for status, match in assoc.send_c_find(image_query(identifier), find_model):
            code = int(status.get("Status", -1)) if status is not None else -1
            if code in (0xFF00, 0xFF01):
                sop = getattr(match, "SOPClassUID", None) if match is not None else None
                if sop:
                    classes.add(str(sop))
                else:
                    known = False  # a match without its class: the answer is incomplete
                    break
                continue
            known = code == 0x0000  # the final response; Success only if all came
            break
    except Exception as exc:  # the query is an optimisation: fall back on any failure
        LOG.debug("SOP class query failed", extra={"error": type(exc).__name__})
        return None
    finally:
        if assoc.is_established:
            if known:
                assoc.release()
            else:
                assoc.abort()  # responses may still be coming
    return sorted(classes) if known and classes else None
