"""dimse-relay: DICOM DIMSE over TLS NATS between a hospital imaging zone and a cloud zone."""

__version__ = "0.1.0"
