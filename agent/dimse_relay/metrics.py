"""Prometheus metrics. Labels carry service names, roles and status classes, never AE titles
chosen by remote peers or anything from a dataset (no patient data in metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

ASSOCIATIONS = Counter(
    "dimse_relay_associations",
    "DICOM associations handled, by role (listener/target) and result",
    ["role", "result"],
    registry=REGISTRY,
)
DIRECT_ASSOCIATIONS = Counter(
    "dimse_relay_direct_associations",
    "Associations served on the agent's asyncio loop without pynetdicom (C-ECHO/C-STORE "
    "only), by role (listener/target)",
    ["role"],
    registry=REGISTRY,
)
REQUESTS = Counter(
    "dimse_relay_requests",
    "DIMSE requests relayed, by role, service and status class of the response",
    ["role", "service", "status"],
    registry=REGISTRY,
)
BYTES = Counter(
    "dimse_relay_dataset_bytes",
    "Dataset bytes relayed, by direction (sent/received over NATS)",
    ["direction"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "dimse_relay_request_seconds",
    "Time from a DIMSE request at the listener to its response, by service",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
WIRE_REJECTED = Counter(
    "dimse_relay_wire_rejected",
    "NATS messages dropped because they were not valid relay messages, by reason",
    ["reason"],
    registry=REGISTRY,
)
NATS_CONNECTED = Gauge(
    "dimse_relay_nats_connected", "1 while the NATS connection is up", registry=REGISTRY
)
NATS_RECONNECTS = Counter("dimse_relay_nats_reconnects", "NATS reconnections", registry=REGISTRY)
ACTIVE_SESSIONS = Gauge(
    "dimse_relay_active_associations",
    "Associations currently open, by role",
    ["role"],
    registry=REGISTRY,
)

# Queued mode (docs/queued-mode.md): the edge queue as the agent last saw it, and what the
# listeners and the deliverer did with it.
QUEUE_DEPTH = Gauge(
    "dimse_relay_queue_depth", "Instances waiting in the edge queue", registry=REGISTRY
)
QUEUE_BYTES = Gauge(
    "dimse_relay_queue_bytes", "Bytes held by the edge queue and its bucket", registry=REGISTRY
)
QUEUE_OLDEST_AGE = Gauge(
    "dimse_relay_queue_oldest_age_seconds",
    "Age of the oldest instance waiting in the edge queue",
    registry=REGISTRY,
)
QUEUE_DEAD_LETTERS = Gauge(
    "dimse_relay_queue_dead_letters", "Instances in the dead-letter stream", registry=REGISTRY
)
QUEUE_ENQUEUED = Counter(
    "dimse_relay_queue_enqueued", "C-STOREs written to the edge queue", registry=REGISTRY
)
QUEUE_DUPLICATES = Counter(
    "dimse_relay_queue_duplicates",
    "C-STOREs of an instance already queued (same SOP Instance UID and bytes), stored once",
    registry=REGISTRY,
)
QUEUE_REFUSED = Counter(
    "dimse_relay_queue_refused",
    "C-STOREs refused by a queued-mode listener, by reason (full, unavailable)",
    ["reason"],
    registry=REGISTRY,
)
QUEUE_ATTEMPTS = Counter(
    "dimse_relay_queue_delivery_attempts",
    "Delivery attempts of queued instances, by result (delivered, retry, dead_letter)",
    ["result"],
    registry=REGISTRY,
)
QUEUE_DEAD_LETTERED = Counter(
    "dimse_relay_queue_dead_lettered",
    "Queued instances moved to the dead-letter stream",
    registry=REGISTRY,
)
# Every label value exists from the start (at 0), so rates and alerts work before the first event.
for _reason in ("full", "unavailable"):
    QUEUE_REFUSED.labels(reason=_reason)
for _result in ("delivered", "retry", "dead_letter"):
    QUEUE_ATTEMPTS.labels(result=_result)


def status_class(status: int) -> str:
    """Map a DIMSE status to its class: success, warning, pending, cancel, failure."""
    if status == 0x0000:
        return "success"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    if status == 0x0001 or (status & 0xF000) == 0xB000 or status == 0x0107 or status == 0x0116:
        return "warning"
    return "failure"


# Target reachability (probe.py): a count, not a series per target, so that no AE title is
# ever a label value.
TARGETS_UNREACHABLE = Gauge(
    "dimse_relay_targets_unreachable",
    "Configured targets whose last reachability probe failed (or that were not probed yet)",
    registry=REGISTRY,
)
