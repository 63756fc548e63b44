"""Agent configuration: YAML file validated with pydantic, secrets overridable from the environment.

Every key is documented in docs/configuration.md. Unknown keys are errors, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import urllib.parse
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "DIMSE_RELAY_"
# Largest PDU an agent announces it receives (DIMSE side). 1 MiB keeps a large instance to a
# few hundred PDUs instead of tens of thousands of 16 KiB ones. DICOM's 0 ("no limit") is not
# allowed: pynetdicom reads each PDU whole into memory, and a peer told "no limit" sends a
# whole instance as one PDU.
DEFAULT_MAX_PDU = 1 << 20
MAX_PDU = 64 << 20
_ALL_ADDRESSES = frozenset({"0.0.0.0", "::"})  # noqa: S104 - compared with, never bound


def _check_ae_title(value: str) -> str:
    """An AE title: 1-16 characters of the DICOM default repertoire, no backslash or control."""
    stripped = value.strip()
    if not stripped:
        raise ValueError("AE title must not be empty or only spaces")
    if len(value) > 16:
        raise ValueError("AE title must be at most 16 characters")
    if any(ord(ch) < 0x20 or ord(ch) > 0x7E or ch == "\\" for ch in value):
        raise ValueError("AE title may only contain printable ASCII characters except backslash")
    return stripped


AETitle = Annotated[str, Field(description="DICOM Application Entity Title")]
# A TCP port written as a number ('104' in quotes is a string, and an error).
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
HostName = Annotated[str, Field(min_length=1, pattern=r"^[^\s/]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_key_pair(cert_file: Path, key_file: Path, ca_file: Path | None) -> None:
    """The files load as the agent will load them: a PEM CA bundle, a certificate and the
    unencrypted private key that belongs to it. Otherwise the agent would start and then
    fail every TLS connection with an OpenSSL error."""

    def encrypted() -> bytes:
        raise ValueError(f"key_file is encrypted; the agent needs an unencrypted key: {key_file}")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(ca_file))
            except ssl.SSLError:
                raise ValueError(f"ca_file: no PEM certificate in {ca_file}") from None
        ctx.load_cert_chain(str(cert_file), str(key_file), password=encrypted)
    except PermissionError as exc:
        raise ValueError(f"cannot read {exc.filename} as this user") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ValueError(
                f"key_file {key_file} is not the private key of cert_file {cert_file}"
            ) from None
        why = f" ({exc.reason})" if exc.reason else ""
        raise ValueError(
            f"cert_file/key_file: not a PEM certificate and its private key{why}: "
            f"{cert_file}, {key_file}"
        ) from None


class TLSConfig(_Strict):
    """TLS material for the NATS connection (mutual TLS: the agent presents a client cert)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    server_hostname: str | None = None

    @model_validator(mode="after")
    def _files_exist(self) -> TLSConfig:
        for name in ("ca_file", "cert_file", "key_file"):
            path: Path = getattr(self, name)
            if not path.is_file():
                raise ValueError(f"{name}: no such file (or not a regular file): {path}")
        _check_key_pair(self.cert_file, self.key_file, self.ca_file)
        return self


class NATSConfig(_Strict):
    servers: list[str] = Field(min_length=1)
    tls: TLSConfig | None = None
    allow_insecure: bool = False
    user: str | None = None
    password: str | None = None
    creds_file: Path | None = None
    subject_prefix: str = "dimse"
    inbox_prefix: str = "_INBOX"
    name: str | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_wait_s: float = Field(default=1.0, gt=0)
    max_reconnect_wait_s: float = Field(default=30.0, gt=0)
    chunk_size: int = Field(default=1024 * 1024, ge=4096, le=8 * 1024 * 1024)
    window_chunks: int = Field(default=8, ge=1, le=256)

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, servers: list[str]) -> list[str]:
        for url in servers:
            if "://" not in url:
                raise ValueError(f"server URL needs a scheme (tls:// or nats://): {url!r}")
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("tls", "nats", "ws", "wss"):
                raise ValueError(f"server URL scheme must be tls, nats, ws or wss: {url!r}")
            try:
                port = parsed.port
            except ValueError:
                raise ValueError(f"server URL has an invalid port: {url!r}") from None
            if not parsed.hostname or port == 0:
                raise ValueError(f"server URL needs a host and a port 1-65535: {url!r}")
        return servers

    @field_validator("subject_prefix", "inbox_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        tokens = value.split(".")
        if any(not t or any(c in t for c in " *>\t\r\n") for t in tokens):
            raise ValueError(f"not a valid NATS subject prefix: {value!r}")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> NATSConfig:
        if self.password is not None and self.user is None:
            raise ValueError("password is set but user is not")
        if self.creds_file is not None and not self.creds_file.is_file():
            raise ValueError(f"creds_file: file not found: {self.creds_file}")
        return self

    @model_validator(mode="after")
    def _require_tls(self) -> NATSConfig:
        if self.tls is None and not self.allow_insecure:
            raise ValueError(
                "tls is required (set nats.allow_insecure: true only for local experiments)"
            )
        return self


class HTTPConfig(_Strict):
    """Metrics (/metrics), liveness (/healthz) and readiness (/readyz) endpoint, and the
    target reachability probes /readyz reports (probe.py)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9102, ge=0, le=65535)
    # Every target is probed this often (the first probe right at start), each probe given
    # at most target_probe_timeout_s: a C-ECHO association (kind scp), a test file in the
    # root (filesystem), one HTTP request (dicomweb).
    target_probe_interval_s: float = Field(default=30.0, ge=0.1, le=86400)
    target_probe_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # true: /readyz is 503 while a target is unreachable; false: reported only.
    ready_requires_targets: bool = True


class ListenerTimeouts(_Strict):
    open_s: float = Field(default=10.0, gt=0, description="far-side association negotiation")
    request_s: float = Field(default=60.0, gt=0, description="far-side DIMSE response")
    chunk_ack_s: float = Field(default=15.0, gt=0, description="one dataset chunk acknowledged")
    acse_s: float = Field(default=30.0, gt=0)
    dimse_s: float = Field(default=120.0, gt=0)
    network_s: float = Field(default=300.0, gt=0)


class DimseTLSConfig(_Strict):
    """DICOM TLS on a listener's port (PS3.15 B.1, TLS 1.2 or later): the agent presents
    cert_file; with ca_file it verifies SCU certificates, required if require_client_cert."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files(self) -> DimseTLSConfig:
        for name in ("cert_file", "key_file", "ca_file"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file (or not a regular file): {path}")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file to verify SCU certificates")
        _check_key_pair(self.cert_file, self.key_file, self.ca_file)
        return self


class ListenerConfig(_Strict):
    """A local DICOM SCP that stands in for a remote AE and relays to it over NATS."""

    ae_title: str
    remote_ae_title: str | None = None
    bind: str = "0.0.0.0"  # noqa: S104 - a DICOM SCP serves the hospital LAN
    port: Port
    # sync: the SCU gets the far target's own status. queued: C-STORE is acknowledged once the
    # instance is durably in the edge JetStream queue and delivered later (docs/queued-mode.md).
    mode: Literal["sync", "queued"] = "sync"
    allowed_calling_aets: list[str] = Field(default_factory=list)
    max_associations: int = Field(default=32, ge=1)
    max_pdu: int = Field(default=DEFAULT_MAX_PDU, ge=4096, le=MAX_PDU)
    timeouts: ListenerTimeouts = ListenerTimeouts()
    tls: DimseTLSConfig | None = None

    @field_validator("ae_title", "remote_ae_title")
    @classmethod
    def _aet(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"must be an IP address of this host: {value!r}") from None
        return value

    @property
    def far_ae_title(self) -> str:
        """The AE title whose NATS subjects this listener relays to."""
        return self.remote_ae_title or self.ae_title


class TargetTimeouts(_Strict):
    connect_s: float = Field(default=10.0, gt=0)
    acse_s: float = Field(default=30.0, gt=0)
    dimse_s: float = Field(default=50.0, gt=0)
    network_s: float = Field(default=300.0, gt=0)
    session_idle_s: float = Field(default=600.0, gt=0)


# Fields of a file-system layout, all read from the stored instance (never patient data).
LAYOUT_FIELDS = frozenset(
    {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "TransferSyntaxUID",
        "Modality",
        "CallingAETitle",
    }
)
DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


def _check_layout(layout: str) -> str:
    """A relative path template whose fields are in LAYOUT_FIELDS and that names each
    instance apart (it must contain {SOPInstanceUID})."""
    import string

    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(layout))
    except ValueError as exc:
        raise ValueError(f"layout: {exc}") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in LAYOUT_FIELDS:
            raise ValueError(f"layout: unknown field {{{name}}}; known: {sorted(LAYOUT_FIELDS)}")
        if spec or conversion:
            raise ValueError(f"layout: field {{{name}}} takes no format spec or conversion")
        fields.append(name)
    if "SOPInstanceUID" not in fields:
        raise ValueError("layout: must contain {SOPInstanceUID}")
    parts = layout.split("/")
    if layout.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError("layout: must be a relative path without empty, '.' or '..' parts")
    if "\\" in layout or "\0" in layout:
        raise ValueError("layout: must not contain backslashes or NUL")
    return layout


def _mode(value: str) -> int:
    if not isinstance(value, str) or not value.isdigit() or not 3 <= len(value) <= 4:
        raise ValueError("must be an octal mode written as a string, e.g. '0640'")
    mode = int(value, 8) if all(c in "01234567" for c in value) else -1
    if not 0 <= mode <= 0o777:
        raise ValueError("must be an octal mode written as a string, e.g. '0640'")
    return mode


class FilesystemSinkConfig(_Strict):
    """Store every C-STORE as a Part 10 file below ``root`` (docs/sinks.md)."""

    root: Path
    layout: str = DEFAULT_LAYOUT
    duplicates: Literal["keep_both", "reject"] = "keep_both"
    file_mode: str = "0640"
    dir_mode: str = "0750"
    fsync: bool = True
    events: bool = True

    @field_validator("layout")
    @classmethod
    def _layout(cls, value: str) -> str:
        return _check_layout(value)

    @field_validator("file_mode", "dir_mode")
    @classmethod
    def _modes(cls, value: str) -> str:
        _mode(value)
        return value

    @field_validator("root")
    @classmethod
    def _root(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"root must be an absolute path: {value}")
        return value

    @property
    def file_mode_bits(self) -> int:
        return _mode(self.file_mode)

    @property
    def dir_mode_bits(self) -> int:
        return _mode(self.dir_mode)


class DicomwebAuth(_Strict):
    """Credentials read from a secret file (re-read when the file changes)."""

    type: Literal["bearer", "basic"]
    token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> DicomwebAuth:
        if self.type == "bearer":
            if self.token_file is None or self.username or self.password_file:
                raise ValueError("bearer auth needs token_file (and no username/password_file)")
            files = [self.token_file]
        else:
            if not self.username or self.password_file is None or self.token_file:
                raise ValueError("basic auth needs username and password_file (no token_file)")
            files = [self.password_file]
        for path in files:
            if not path.is_file():
                raise ValueError(f"secret file not found: {path}")
        return self


class DicomwebRetry(_Strict):
    """Retries of 408/429/5xx answers and connection errors, with exponential backoff."""

    max_time_s: float = Field(default=40.0, gt=0, le=3600)
    initial_backoff_s: float = Field(default=0.5, gt=0)
    max_backoff_s: float = Field(default=8.0, gt=0)


class DicomwebBatch(_Strict):
    """Instances of one study arriving at the same time (on concurrent associations) may
    share one STOW-RS request; every C-STORE still waits for its own instance's result."""

    max_instances: int = Field(default=1, ge=1, le=1000)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    linger_s: float = Field(default=0.05, ge=0, le=5)


class DicomwebSinkConfig(_Strict):
    """Send every C-STORE to a DICOMweb server with STOW-RS (docs/sinks.md)."""

    url: str
    auth: DicomwebAuth | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify_tls: bool = True
    timeout_s: float = Field(default=30.0, gt=0)
    retry: DicomwebRetry = DicomwebRetry()
    batch: DicomwebBatch = DicomwebBatch()
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"url needs an http:// or https:// scheme: {value!r}")
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = {"authorization", "content-type", "content-length", "host"}
        bad = sorted(k for k in value if k.lower() in reserved)
        if bad:
            raise ValueError(f"headers: {bad} are set by the agent")
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> DicomwebSinkConfig:
        for name in ("ca_file", "cert_file", "key_file"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file (or not a regular file): {path}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if not self.verify_tls and self.ca_file is not None:
            raise ValueError("ca_file is set but verify_tls is false")
        return self


class TargetConfig(_Strict):
    """A NATS subscription for one AE title. ``kind: scp`` (default) forwards requests to a
    real local SCP; ``filesystem`` and ``dicomweb`` store C-STOREs in a sink (sinks.py)."""

    ae_title: str
    kind: Literal["scp", "filesystem", "dicomweb"] = "scp"
    host: HostName | None = None
    port: Port | None = None
    called_ae_title: str | None = None
    calling_ae_title: str | None = None
    max_sessions: int = Field(default=64, ge=1)
    max_pdu: int = Field(default=DEFAULT_MAX_PDU, ge=4096, le=MAX_PDU)
    timeouts: TargetTimeouts = TargetTimeouts()
    filesystem: FilesystemSinkConfig | None = None
    dicomweb: DicomwebSinkConfig | None = None

    @field_validator("ae_title", "called_ae_title", "calling_ae_title")
    @classmethod
    def _aet(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @model_validator(mode="after")
    def _kind(self) -> TargetConfig:
        scp_only = ("host", "port", "called_ae_title", "calling_ae_title")
        if self.kind == "scp":
            missing = [k for k in ("host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"kind scp needs {' and '.join(missing)}")
        else:
            given = [k for k in scp_only if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for kind scp (this is {self.kind})")
            if getattr(self, self.kind) is None:
                raise ValueError(f"kind {self.kind} needs a {self.kind} section")
        for other in ("filesystem", "dicomweb"):
            if other != self.kind and getattr(self, other) is not None:
                raise ValueError(f"{other} section given but kind is {self.kind}")
        return self

    @property
    def scp_ae_title(self) -> str:
        return self.called_ae_title or self.ae_title

    @property
    def scp_address(self) -> tuple[str, int]:
        """Host and port of the real SCP (kind scp: both are required)."""
        if self.host is None or self.port is None:
            raise ValueError(f"target {self.ae_title} has no SCP address (kind {self.kind})")
        return self.host, self.port

    @property
    def destination(self) -> str:
        """Where this target delivers, for /status and logs."""
        if self.filesystem is not None:
            return f"filesystem:{self.filesystem.root}"
        if self.dicomweb is not None:
            return f"dicomweb:{self.dicomweb.url}"
        return f"{self.host}:{self.port}"


class MoveDestination(_Strict):
    """Where a C-MOVE destination AE title lives on this agent's side."""

    host: HostName
    port: Port


class QueueConfig(_Strict):
    """The edge JetStream queue of the listeners in queued mode (docs/queued-mode.md)."""

    # Names of the JetStream assets; several agents of one site share them (and the work).
    stream: str = "DIMSE_QUEUE"
    dead_letter_stream: str = "DIMSE_DEAD"
    object_bucket: str = "DIMSE_OBJECTS"
    # JetStream domain of the edge leaf node (None: the domain of the server connected to).
    domain: str | None = None
    replicas: int = Field(default=1, ge=1, le=5)
    # Limits: a C-STORE that would pass them is refused with 0xA700 (out of resources).
    # The server reserves 2.1 x max_bytes (queue stream, bucket, dead letters): the default
    # fits the 10G max_file_store of the collection's leaf nodes.
    max_bytes: int = Field(default=4 * 1024**3, ge=1024 * 1024)
    max_items: int = Field(default=1_000_000, ge=1)
    # Instances up to this size travel inside the queue message; larger ones in the bucket.
    inline_max_bytes: int = Field(default=512 * 1024, ge=0, le=4 * 1024 * 1024)
    object_chunk_bytes: int = Field(default=1024 * 1024, ge=64 * 1024, le=8 * 1024 * 1024)
    # Same SOP Instance UID and same bytes within this window: stored once.
    duplicate_window_s: float = Field(default=86400.0, gt=0)
    # Delivery: attempts before the dead-letter stream, exponential backoff between them.
    max_attempts: int = Field(default=20, ge=1)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    concurrency: int = Field(default=4, ge=1, le=64)
    # Ingest first: while a queued listener wrote to the queue less than this long ago, the
    # deliverer starts no new deliveries (the modality's C-STOREs get the machine), except
    # one fetch per ingest_defer_max_s; 0 turns this off (docs/queued-mode.md).
    ingest_quiet_s: float = Field(default=0.25, ge=0, le=10)
    ingest_defer_max_s: float = Field(default=1.0, gt=0, le=60)
    ack_wait_s: float = Field(default=60.0, ge=5)
    write_timeout_s: float = Field(default=30.0, gt=0)
    stats_interval_s: float = Field(default=5.0, gt=0)

    @field_validator("stream", "dead_letter_stream", "object_bucket")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or any(not (c.isalnum() or c in "_-") for c in value):
            raise ValueError(f"JetStream names are letters, digits, '_' and '-': {value!r}")
        return value


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    log_identifiers: bool = False


class AgentConfig(_Strict):
    name: str = Field(default_factory=lambda: os.uname().nodename)
    nats: NATSConfig
    http: HTTPConfig = HTTPConfig()
    logging: LoggingConfig = LoggingConfig()
    work_dir: Path = Path("/var/lib/dimse-relay")
    listeners: list[ListenerConfig] = Field(default_factory=list)
    targets: list[TargetConfig] = Field(default_factory=list)
    queue: QueueConfig = QueueConfig()
    # AE table for C-MOVE: destination AE title -> address. A C-MOVE to a listener whose
    # destination is not here is refused with 0xA801 (Move Destination unknown).
    move_destinations: dict[str, MoveDestination] = Field(default_factory=dict)
    # How long pynetdicom's per-association threads sleep between polls of their queues.
    # Every relayed DIMSE message crosses several such loops: shorter is faster, at the cost
    # of more wake-ups per open association.
    dimse_poll_interval_s: float = Field(default=0.0002, ge=0.00005, le=0.01)
    # Associations that only use C-ECHO and C-STORE (Verification and storage contexts, no
    # role selection, no DICOM TLS) are served on the agent's asyncio loop without pynetdicom
    # (direct_listener.py, direct_target.py); false: pynetdicom serves every association.
    direct_dimse: bool = True

    @field_validator("move_destinations")
    @classmethod
    def _destination_aets(cls, table: dict[str, MoveDestination]) -> dict[str, MoveDestination]:
        return {_check_ae_title(aet): dest for aet, dest in table.items()}

    @model_validator(mode="after")
    def _consistent(self) -> AgentConfig:
        if not self.listeners and not self.targets:
            raise ValueError("at least one listener or target is required")
        seen: set[tuple[str, int, str]] = set()
        for idx, lst in enumerate(self.listeners):
            key = (lst.bind, lst.port, lst.ae_title)
            if key in seen:
                raise ValueError(
                    f"listeners.{idx}: AE title {lst.ae_title} is served twice on "
                    f"{lst.bind}:{lst.port}"
                )
            seen.add(key)
        binds_by_port: dict[int, set[str]] = {}
        for lst in self.listeners:
            binds_by_port.setdefault(lst.port, set()).add(lst.bind)
        for port, binds in binds_by_port.items():
            if len(binds) > 1 and binds & _ALL_ADDRESSES:
                raise ValueError(
                    f"listeners: port {port} is bound both on all addresses and on "
                    f"{sorted(binds - _ALL_ADDRESSES)}: the second bind cannot succeed"
                )
        if self.http.enabled and self.http.port in binds_by_port:
            raise ValueError(f"http.port {self.http.port} is also a listener port")
        tls_by_port: dict[tuple[str, int], DimseTLSConfig | None] = {}
        for idx, lst in enumerate(self.listeners):
            first = tls_by_port.setdefault((lst.bind, lst.port), lst.tls)
            if first != lst.tls:
                raise ValueError(
                    f"listeners.{idx}.tls: listeners on {lst.bind}:{lst.port} share one socket "
                    "and must have the same tls settings"
                )
        aets = [t.ae_title for t in self.targets]
        dupes = {a for a in aets if aets.count(a) > 1}
        if dupes:
            raise ValueError(f"targets: AE title served twice: {sorted(dupes)}")
        return self


class ConfigError(Exception):
    """A configuration problem, with one line per error naming its location."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def _apply_env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """Secrets and deployment-specific values from the environment win over the file.

    DIMSE_RELAY_NATS_PASSWORD, DIMSE_RELAY_NATS_USER, DIMSE_RELAY_NATS_CREDS_FILE,
    DIMSE_RELAY_NATS_SERVERS (comma separated), DIMSE_RELAY_NATS_TLS_KEY_FILE.
    """
    nats = raw.setdefault("nats", {})
    if not isinstance(nats, dict):
        return raw
    simple = {"USER": "user", "PASSWORD": "password", "CREDS_FILE": "creds_file"}
    for env, key in simple.items():
        if ENV_PREFIX + "NATS_" + env in environ:
            nats[key] = environ[ENV_PREFIX + "NATS_" + env]
    if ENV_PREFIX + "NATS_SERVERS" in environ:
        nats["servers"] = [s.strip() for s in environ[ENV_PREFIX + "NATS_SERVERS"].split(",")]
    if ENV_PREFIX + "NATS_TLS_KEY_FILE" in environ and isinstance(nats.get("tls"), dict):
        nats["tls"]["key_file"] = environ[ENV_PREFIX + "NATS_TLS_KEY_FILE"]
    return raw


def _format_error(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err.get("type") == "string_type" and isinstance(
        err.get("input"), int | float | bool | datetime.date
    ):
        # YAML reads 1234, 1.5, yes, no and 2024-01-01 as numbers, booleans and dates
        msg += " (YAML read a number, true/false or a date: write the value in quotes)"
    return f"{loc}: {msg}"


def parse_config(raw: Any, environ: dict[str, str] | None = None) -> AgentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): the configuration must be a YAML mapping"])
    raw = _apply_env_overrides(raw, dict(os.environ) if environ is None else environ)
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_format_error(e) for e in exc.errors()]) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last one, so a second `listeners:` block would silently replace the first."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        assert isinstance(node, yaml.MappingNode)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _safe_load_unique(text: str) -> Any:
    """One YAML document with the safe loader that refuses duplicate keys (what
    yaml.safe_load does, with _UniqueKeyLoader instead of SafeLoader)."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: Path | str, environ: dict[str, str] | None = None) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        raw = _safe_load_unique(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return parse_config(raw, environ)
