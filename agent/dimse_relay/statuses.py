"""DIMSE status codes the relay itself returns when it cannot relay a request.

A status the real target returned is always passed back unchanged; these are used only when
the relay has no real answer. The table is documented in docs/operations.md.
"""

from __future__ import annotations

from dataclasses import dataclass

SUCCESS = 0x0000
# C-STORE "Refused: Out of Resources": the far side is unreachable, too slow or the target SCP
# refused the association. The instance was not stored; the SCU should retry later.
STORE_OUT_OF_RESOURCES = 0xA700
# "Processing failure" (general status, PS3.7 C.4): used for C-ECHO and for relay-internal errors
# (corrupt chunk stream, digest mismatch) on any service.
PROCESSING_FAILURE = 0x0110
# "SOP Class not supported": the far target did not accept the presentation context.
SOP_CLASS_NOT_SUPPORTED = 0x0122
# C-FIND "Refused: Out of Resources" (PS3.4 C.4.1.1.4).
FIND_OUT_OF_RESOURCES = 0xA700
# C-GET / C-MOVE "Refused: Out of Resources - Unable to perform sub-operations" (C.4.2.1.5).
RETRIEVE_OUT_OF_RESOURCES = 0xA702
# C-GET / C-MOVE "Warning: Sub-operations complete - one or more failures or warnings"
# (C.4.2.1.5): a retrieve whose instances did not all reach the SCU or move destination.
RETRIEVE_SUBOPERATIONS_FAILED = 0xB000
# C-MOVE "Refused: Move Destination unknown".
MOVE_DESTINATION_UNKNOWN = 0xA801


@dataclass(frozen=True)
class RelayFailure:
    """Why the relay could not get a real response, as status per service plus a comment."""

    reason: str
    comment: str

    def status_for(self, service: str) -> int:
        if self.reason == "protocol":
            return PROCESSING_FAILURE
        if service == "C-STORE":
            return STORE_OUT_OF_RESOURCES
        if service == "C-FIND":
            return FIND_OUT_OF_RESOURCES
        if service in ("C-GET", "C-MOVE"):
            return RETRIEVE_OUT_OF_RESOURCES
        return PROCESSING_FAILURE


FAR_SIDE_UNAVAILABLE = RelayFailure(
    "unavailable", "dimse-relay: far side unavailable (no agent or no NATS)"
)
# NATS answered "no responders" for the far session: its agent stopped or restarted. The
# association's next request opens a new far session.
FAR_SESSION_GONE = RelayFailure("unavailable", "dimse-relay: far session gone (agent stopped)")
FAR_SIDE_TIMEOUT = RelayFailure("timeout", "dimse-relay: timed out waiting for the far side")
TARGET_UNREACHABLE = RelayFailure(
    "target_unreachable", "dimse-relay: target SCP refused or unreachable"
)
PROTOCOL_ERROR = RelayFailure("protocol", "dimse-relay: relay protocol error")
# Queued mode: the edge queue cannot take the instance (C-STORE 0xA700, out of resources).
QUEUE_FULL = RelayFailure("queue_full", "dimse-relay: edge queue full")
QUEUE_UNAVAILABLE = RelayFailure("queue_unavailable", "dimse-relay: edge queue unavailable")
