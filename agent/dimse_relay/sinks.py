"""Sinks: targets that store C-STOREs themselves instead of forwarding them to an SCP.

A target with ``kind: filesystem`` or ``kind: dicomweb`` answers the OPEN itself (target.py)
and hands every received instance to its sink. An instance arrives as the Part 10 spool file
the target builds anyway (streaming.SpooledDataset: File Meta Information from the negotiated
transfer syntax, dataset bytes exactly as the SCU sent them), so a sink stores bit-exact
whatever the transfer syntax.

A sink's ``store`` runs on the session's worker thread, blocks until the instance is durably
stored (or definitely not), and returns the DIMSE status for it: a C-STORE is answered with
Success only once the file is on disk (fsync) or the DICOMweb server has acknowledged that
very instance. The statuses are documented in docs/sinks.md.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from pydicom import dcmread
from pydicom.dataset import Dataset

from dimse_relay import metrics, subjects
from dimse_relay.config import DicomwebSinkConfig, FilesystemSinkConfig, TargetConfig
from dimse_relay.dicom import dataset_offset

LOG = logging.getLogger("dimse_relay.sinks")

# DIMSE statuses a sink answers (PS3.4 B.2.3, PS3.7 C.4); see docs/sinks.md.
SUCCESS = 0x0000
WARNING_COERCION = 0xB000
OUT_OF_RESOURCES = 0xA700  # disk full, DICOMweb server unreachable/busy: retry later
DUPLICATE_SOP_INSTANCE = 0x0111  # filesystem duplicates: reject, different bytes
PROCESSING_FAILURE = 0x0110
CANNOT_UNDERSTAND = 0xC000  # dataset unreadable; 0xC000 + HTTP status for DICOMweb 4xx

VERIFICATION = "1.2.840.10008.1.1"

SINK_STORES = Counter(
    "dimse_relay_sink_stores",
    "Instances handed to a sink, by kind and result (stored, duplicate, rejected, failed)",
    ["kind", "result"],
    registry=metrics.REGISTRY,
)
SINK_EVENTS = Counter(
    "dimse_relay_sink_events",
    "Stored-instance events published on NATS, by result (published, failed)",
    ["result"],
    registry=metrics.REGISTRY,
)

EventPublisher = Callable[[str, bytes], None]


def event_subject(prefix: str, ae_title: str) -> str:
    """``<prefix>.v1.events.<encoded AET>.stored``: one message per stored instance."""
    return f"{prefix}.{subjects.VERSION}.events.{subjects.encode_aet(ae_title)}.stored"


def status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


@dataclass(frozen=True)
class Instance:
    """One received C-STORE: its Part 10 spool file and what the command set says."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae_title: str
    assoc_id: str


class Sink:
    kind = "none"

    def check(self) -> str | None:
        """None if the sink can store right now (C-ECHO answers Success), else why not."""
        raise NotImplementedError

    def store(self, inst: Instance) -> Dataset:
        """(worker thread) store one instance; its DIMSE status."""
        raise NotImplementedError

    def close(self) -> None:
        return None


# -- filesystem ------------------------------------------------------------------------------
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV)
_COPY_BLOCK = 1 << 20


def safe_component(value: Any) -> str:
    """One path component from a dataset value: a well-formed UID as it is; anything else
    with every character outside ``A-Z a-z 0-9 . _ -`` replaced by ``_``, at most 64
    characters, never empty, ``.``, ``..`` or starting with a dot."""
    text = str(value if value is not None else "").strip(" \x00")
    if _UID.match(text) and len(text) <= 64:
        return text
    text = _UNSAFE.sub("_", text)[:64]
    if not text:
        return "unknown"
    if text.startswith("."):
        text = "_" + text[1:]
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Copy:
    size: int
    sha256: str  # of the whole file as stored
    dataset_sha256: str  # of the dataset bytes only (what duplicate detection compares)


def _dataset_digest(path: Path) -> tuple[int, str]:
    """Size of the file and sha256 of its dataset bytes (after the File Meta group)."""
    offset = dataset_offset(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(offset)
        for block in iter(lambda: fh.read(_COPY_BLOCK), b""):
            digest.update(block)
    return path.stat().st_size, digest.hexdigest()


class FilesystemSink(Sink):
    """Part 10 files below ``root``, written atomically: a temporary file in the destination
    directory, fsync, a hard link to the final name (which never replaces an existing file,
    so concurrent writers of one instance cannot overwrite each other), directory fsync."""

    kind = "filesystem"

    def __init__(self, tcfg: TargetConfig, prefix: str, publish: EventPublisher | None):
        assert tcfg.filesystem is not None
        self.cfg: FilesystemSinkConfig = tcfg.filesystem
        self.ae_title = tcfg.ae_title
        self.subject = event_subject(prefix, tcfg.ae_title)
        self.publish = publish if self.cfg.events else None
        self.root = self.cfg.root
        self.root.mkdir(parents=True, exist_ok=True)

    def check(self) -> str | None:
        if not self.root.is_dir():
            return "root directory missing"
        if not os.access(self.root, os.W_OK | os.X_OK):
            return "root directory not writable"
        return None

    # -- layout ----------------------------------------------------------------------------
    def relative_path(self, inst: Instance) -> Path:
        tags = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality"]
        ds = dcmread(inst.path, stop_before_pixels=True, specific_tags=tags)
        values = {
            "StudyInstanceUID": ds.get("StudyInstanceUID"),
            "SeriesInstanceUID": ds.get("SeriesInstanceUID"),
            # The command set's Affected SOP Instance UID names the instance in DIMSE and in
            # the File Meta; the dataset's own value is used only if that is missing.
            "SOPInstanceUID": inst.sop_instance_uid or ds.get("SOPInstanceUID"),
            "SOPClassUID": inst.sop_class_uid,
            "TransferSyntaxUID": inst.transfer_syntax,
            "Modality": ds.get("Modality"),
            "CallingAETitle": inst.calling_ae_title,
        }
        safe = {k: safe_component(v) for k, v in values.items()}
        rendered = self.cfg.layout.format(**safe)
        # Values cannot contain "/" (sanitised) and the layout has no "..": stays below root.
        return Path(rendered)

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` below root; each new directory gets dir_mode and its parent
        is fsynced, so the file's path survives a crash once the file itself does."""
        missing: list[Path] = []
        cur = directory
        while cur != self.root and not cur.is_dir():
            missing.append(cur)
            cur = cur.parent
        for path in reversed(missing):
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                continue  # a concurrent writer of the same study created it
            os.chmod(path, self.cfg.dir_mode_bits)
            if self.cfg.fsync:
                _fsync_dir(path.parent)

    def _copy_to_temp(self, src: Path, directory: Path) -> tuple[Path, _Copy]:
        offset = dataset_offset(src)
        fd, name = tempfile.mkstemp(prefix=".dimse-relay-", suffix=".tmp", dir=directory)
        tmp = Path(name)
        whole = hashlib.sha256()
        data = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as fh:
                for block in iter(lambda: fh.read(_COPY_BLOCK), b""):
                    out.write(block)
                    whole.update(block)
                    if size + len(block) > offset:
                        data.update(block[max(0, offset - size) :])
                    size += len(block)
                out.flush()
                os.fchmod(out.fileno(), self.cfg.file_mode_bits)
                if self.cfg.fsync:
                    os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp, _Copy(size, whole.hexdigest(), data.hexdigest())

    def _same(self, existing: Path, copy: _Copy) -> bool:
        try:
            _size, digest = _dataset_digest(existing)
        except (OSError, ValueError):
            return False
        return digest == copy.dataset_sha256

    def _link(self, tmp: Path, final: Path) -> bool:
        """Give ``tmp`` the name ``final`` unless that exists; False if it does."""
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
        # No hard links on this file system: rename, which may replace a file a concurrent
        # writer created in the instant since this check (documented in docs/sinks.md).
        if final.exists():
            return False
        os.replace(tmp, final)
        return True

    # -- store -------------------------------------------------------------------------------
    def store(self, inst: Instance) -> Dataset:
        try:
            rel = self.relative_path(inst)
        except Exception as exc:
            SINK_STORES.labels(kind=self.kind, result="failed").inc()
            LOG.warning(
                "instance unreadable, not stored",
                extra={
                    "assoc_id": inst.assoc_id,
                    "target": self.ae_title,
                    "error": type(exc).__name__,
                },
            )
            return status(CANNOT_UNDERSTAND, "dimse-relay: dataset unreadable")
        final = self.root / rel
        tmp: Path | None = None
        try:
            self._makedirs(final.parent)
            tmp, copy = self._copy_to_temp(inst.path, final.parent)
            duplicate = False
            stored_as = final
            if not self._link(tmp, final):
                if self._same(final, copy):
                    duplicate = True
                elif self.cfg.duplicates == "reject":
                    SINK_STORES.labels(kind=self.kind, result="rejected").inc()
                    LOG.info(
                        "different instance with the same name rejected",
                        extra={"assoc_id": inst.assoc_id, "target": self.ae_title},
                    )
                    return status(
                        DUPLICATE_SOP_INSTANCE, "dimse-relay: instance exists with other content"
                    )
                else:
                    # keep_both: the other version is named after its content, so sending it
                    # again is a no-op as well.
                    tag = copy.dataset_sha256[:16]
                    stored_as = final.with_name(
                        f"{final.stem}.{tag}.dcm"
                        if final.suffix.lower() == ".dcm"
                        else f"{final.name}.{tag}"
                    )
                    if not self._link(tmp, stored_as):
                        if not self._same(stored_as, copy):
                            raise OSError(errno.EEXIST, "content-named duplicate differs")
                        duplicate = True
            if self.cfg.fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            SINK_STORES.labels(kind=self.kind, result="failed").inc()
            full = exc.errno in _DISK_FULL
            LOG.warning(
                "instance not stored",
                extra={
                    "assoc_id": inst.assoc_id,
                    "target": self.ae_title,
                    "error": errno.errorcode.get(exc.errno or 0, type(exc).__name__),
                },
            )
            if full:
                return status(OUT_OF_RESOURCES, "dimse-relay: sink file system full")
            return status(OUT_OF_RESOURCES, "dimse-relay: sink cannot write")
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        SINK_STORES.labels(kind=self.kind, result="duplicate" if duplicate else "stored").inc()
        self._event(inst, stored_as, copy, duplicate)
        return status(SUCCESS)

    def _event(self, inst: Instance, path: Path, copy: _Copy, duplicate: bool) -> None:
        if self.publish is None:
            return
        event = {
            "version": 1,
            "event": "stored",
            "target": self.ae_title,
            "kind": self.kind,
            "path": str(path),
            "relative_path": str(path.relative_to(self.root)),
            "sop_class_uid": inst.sop_class_uid,
            "sop_instance_uid": inst.sop_instance_uid,
            "transfer_syntax_uid": inst.transfer_syntax,
            "size": copy.size,
            "sha256": copy.sha256,
            "duplicate": duplicate,
            "calling_ae_title": inst.calling_ae_title,
            "assoc_id": inst.assoc_id,
            "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            self.publish(self.subject, json.dumps(event, separators=(",", ":")).encode())
            SINK_EVENTS.labels(result="published").inc()
        except Exception as exc:
            # The instance is stored and acknowledged; the event is at most once (a JetStream
            # stream on the events subject makes it durable, see docs/sinks.md).
            SINK_EVENTS.labels(result="failed").inc()
            LOG.warning(
                "stored event not published",
                extra={
                    "assoc_id": inst.assoc_id,
                    "target": self.ae_title,
                    "error": type(exc).__name__,
                },
            )


# -- DICOMweb (STOW-RS) ---------------------------------------------------------------------
SINK_RETRIES = Counter(
    "dimse_relay_sink_retries",
    "STOW-RS requests retried (408/429/5xx answers, connection errors), by kind",
    ["kind"],
    registry=metrics.REGISTRY,
)
SINK_REQUESTS = Counter(
    "dimse_relay_sink_requests",
    "STOW-RS requests sent, by HTTP status class (2xx, 4xx, 5xx, error)",
    ["kind", "status"],
    registry=metrics.REGISTRY,
)
_MAX_RESPONSE = 16 << 20
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_AUTH_STATUSES = (401, 403, 407)


def _failure_code(reason: Any) -> int:
    """A STOW-RS Failure Reason (a DIMSE failure code) as the C-STORE status, if it is one."""
    if isinstance(reason, int) and (
        0xA700 <= reason <= 0xA7FF
        or 0xA900 <= reason <= 0xA9FF
        or 0xC000 <= reason <= 0xCFFF
        or 0x0100 <= reason <= 0x02FF
    ):
        return reason
    return PROCESSING_FAILURE


def _warning_code(reason: Any) -> int:
    if isinstance(reason, int) and 0xB000 <= reason <= 0xBFFF:
        return reason
    return WARNING_COERCION


def _first_value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def parse_stow_response(body: bytes) -> tuple[dict[str, int | None], dict[str, int]]:
    """The DICOM JSON STOW-RS response: {SOP Instance UID: warning reason or None} of the
    Referenced SOP Sequence and {SOP Instance UID: failure reason} of the Failed SOP
    Sequence. Empty when the body is not DICOM JSON."""
    try:
        doc = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return {}, {}
    if isinstance(doc, list):
        doc = doc[0] if doc and isinstance(doc[0], dict) else {}
    if not isinstance(doc, dict):
        return {}, {}
    referenced: dict[str, int | None] = {}
    failed: dict[str, int] = {}
    for tag, out in ((_REFERENCED_SOP_SEQUENCE, referenced), (_FAILED_SOP_SEQUENCE, failed)):
        seq = doc.get(tag)
        items = seq.get("Value") if isinstance(seq, dict) else None
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            uid = _first_value(item, _REFERENCED_SOP_INSTANCE_UID)
            if not isinstance(uid, str):
                continue
            if out is failed:
                reason = _first_value(item, _FAILURE_REASON)
                failed[uid] = reason if isinstance(reason, int) else PROCESSING_FAILURE
            else:
                warning = _first_value(item, _WARNING_REASON)
                referenced[uid] = warning if isinstance(warning, int) else None
    return referenced, failed


@dataclass
class _Outcome:
    """What one STOW-RS request came to: an HTTP answer, or no usable answer at all."""

    http_status: int | None
    body: bytes = b""
    comment: str = ""


def map_stow_result(outcome: _Outcome, uids: list[str]) -> dict[str, Dataset | None]:
    """The DIMSE status of each instance of one STOW-RS request (docs/sinks.md); None where
    the answer says nothing certain about that instance (only possible with several)."""
    code = outcome.http_status
    if code is None:
        return {u: status(OUT_OF_RESOURCES, outcome.comment) for u in uids}
    referenced, failed = parse_stow_response(outcome.body)
    single = len(uids) == 1
    out: dict[str, Dataset | None] = {}
    for uid in uids:
        if uid in failed:
            reason = failed[uid]
            out[uid] = status(_failure_code(reason), f"dicomweb: failure reason 0x{reason:04X}")
        elif 200 <= code < 300 and uid in referenced:
            warning = referenced[uid]
            if warning is None:
                out[uid] = status(SUCCESS)
            else:
                out[uid] = status(_warning_code(warning), f"dicomweb: warning 0x{warning:04X}")
        elif code == 200:
            out[uid] = status(SUCCESS)  # "stored all instances" (PS3.18 10.5.3.2)
        elif 200 <= code < 300:
            # 202/other 2xx without a word about this instance: stored with warnings if it
            # was the only one (failures would be listed); unknown in a batch.
            out[uid] = status(WARNING_COERCION, f"dicomweb: HTTP {code}") if single else None
        elif code in _AUTH_STATUSES:
            out[uid] = status(OUT_OF_RESOURCES, f"dicomweb: HTTP {code} (credentials)")
        elif 400 <= code < 500:
            # The whole request was refused: certain for one instance, not for a batch.
            out[uid] = (
                status(CANNOT_UNDERSTAND | (code & 0xFFF), f"dicomweb: HTTP {code}")
                if single
                else None
            )
        else:
            out[uid] = status(PROCESSING_FAILURE, f"dicomweb: HTTP {code}")
    return out


class _MultipartBody:
    """multipart/related; type="application/dicom" with one Part 10 file per part, read
    from disk as it is sent (never held in memory); iterable again for every retry."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.boundary = f"dimse-relay-{os.urandom(12).hex()}"
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._tail = f"--{self.boundary}--\r\n".encode()
        self.length = sum(len(self._head) + p.stat().st_size + 2 for p in paths) + len(self._tail)

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __iter__(self) -> Iterator[bytes]:
        for path in self.paths:
            yield self._head
            with path.open("rb") as fh:
                yield from iter(lambda: fh.read(_COPY_BLOCK), b"")
            yield b"\r\n"
        yield self._tail


class _SecretFile:
    """A credential read from a file, read again whenever the file changes (rotation)."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._value = ""

    def value(self) -> str:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._value = self.path.read_text(encoding="utf-8").strip()
            self._stamp = stamp
        return self._value


@dataclass
class _Pending:
    inst: Instance
    size: int
    result: Dataset | None = None


@dataclass
class _Batch:
    items: list[_Pending]
    size: int
    full: bool = False


def _tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class DicomwebSink(Sink):
    """STOW-RS to ``url``/studies. Every C-STORE is answered with the server's verdict on
    that very instance: one instance per request by default; with ``batch.max_instances``
    > 1, instances of one study that arrive within ``linger_s`` of each other (on
    concurrent associations: one association sends its next instance only after this one's
    response) share a request, and any instance whose fate the answer leaves open is sent
    again on its own."""

    kind = "dicomweb"

    def __init__(self, tcfg: TargetConfig, prefix: str, publish: EventPublisher | None):
        import httpx

        assert tcfg.dicomweb is not None
        del prefix, publish
        self.cfg: DicomwebSinkConfig = tcfg.dicomweb
        self.ae_title = tcfg.ae_title
        self.stow_url = f"{self.cfg.url}/studies"
        verify: ssl.SSLContext | bool = False
        if self.cfg.verify_tls:
            ctx = ssl.create_default_context(
                cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None
            )
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            verify = ctx
        if self.cfg.cert_file is not None and isinstance(verify, ssl.SSLContext):
            verify.load_cert_chain(str(self.cfg.cert_file), str(self.cfg.key_file))
        self._httpx = httpx
        self.client = httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(self.cfg.timeout_s),
            follow_redirects=False,  # never carry credentials to another address
            headers={"Accept": "application/dicom+json", **self.cfg.headers},
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        auth = self.cfg.auth
        self._secret: _SecretFile | None = None
        if auth is not None:
            secret = auth.token_file if auth.type == "bearer" else auth.password_file
            assert secret is not None
            self._secret = _SecretFile(secret)
        self._lock = threading.Condition()
        self._open: dict[str, _Batch] = {}
        self._healthy: str | None = None

    def close(self) -> None:
        self.client.close()

    def _auth_header(self) -> dict[str, str]:
        auth = self.cfg.auth
        if auth is None or self._secret is None:
            return {}
        secret = self._secret.value()
        if auth.type == "bearer":
            return {"Authorization": f"Bearer {secret}"}
        token = base64.b64encode(f"{auth.username}:{secret}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def check(self) -> str | None:
        """C-ECHO: the server answers at all, and not with 'credentials refused'."""
        try:
            auth = self._auth_header()
        except OSError:
            return "secret file unreadable"
        try:
            rsp = self.client.request(
                "OPTIONS",
                self.stow_url,
                headers=auth,
                timeout=min(self.cfg.timeout_s, 10.0),
            )
        except Exception as exc:
            return f"unreachable ({type(exc).__name__})"
        if rsp.status_code in _AUTH_STATUSES:
            return f"credentials refused (HTTP {rsp.status_code})"
        if rsp.status_code >= 500:
            return f"server error (HTTP {rsp.status_code})"
        return None

    # -- one request, with retries --------------------------------------------------------
    def _post(self, paths: list[Path], log_extra: dict[str, Any]) -> _Outcome:
        retry = self.cfg.retry
        deadline = time.monotonic() + retry.max_time_s
        backoff = retry.initial_backoff_s
        body = _MultipartBody(paths)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            wait = min(backoff, retry.max_backoff_s) * (0.5 + random.random() / 2)  # noqa: S311
            try:
                auth = self._auth_header()
            except OSError:
                LOG.warning("DICOMweb secret file unreadable", extra=log_extra)
                return _Outcome(None, comment="dicomweb: secret file unreadable")
            headers = {
                "Content-Type": body.content_type,
                "Content-Length": str(body.length),
                **auth,
            }
            try:
                with self.client.stream(
                    "POST",
                    self.stow_url,
                    content=iter(body),
                    headers=headers,
                    timeout=self._httpx.Timeout(max(0.1, min(self.cfg.timeout_s, remaining))),
                ) as rsp:
                    data = b""
                    for block in rsp.iter_bytes():
                        if len(data) < _MAX_RESPONSE:
                            data += block
                code = rsp.status_code
                SINK_REQUESTS.labels(kind=self.kind, status=f"{code // 100}xx").inc()
                if code not in (408, 429) and code < 500:
                    return _Outcome(code, data)
                outcome = _Outcome(None, comment=f"dicomweb: HTTP {code} after {attempt} tries")
                after = rsp.headers.get("Retry-After", "")
                if after.isdigit():
                    wait = max(wait, float(after))
                why = f"HTTP {code}"
            except self._httpx.HTTPError as exc:
                SINK_REQUESTS.labels(kind=self.kind, status="error").inc()
                if _tls_error(exc):
                    LOG.warning("DICOMweb server certificate not trusted", extra=log_extra)
                    return _Outcome(None, comment="dicomweb: TLS verification failed")
                outcome = _Outcome(None, comment=f"dicomweb: unreachable after {attempt} tries")
                why = type(exc).__name__
            if time.monotonic() + wait >= deadline:
                LOG.warning(
                    "DICOMweb server unavailable, giving up",
                    extra={**log_extra, "why": why, "attempts": attempt},
                )
                return outcome
            SINK_RETRIES.labels(kind=self.kind).inc()
            LOG.info(
                "DICOMweb request retried",
                extra={**log_extra, "why": why, "attempt": attempt, "wait_s": round(wait, 2)},
            )
            time.sleep(wait)
            backoff *= 2

    def _send(self, pending: list[_Pending]) -> None:
        """Send ``pending`` in one request and set every result; instances the answer is not
        certain about are sent again one by one."""
        uids = [p.inst.sop_instance_uid for p in pending]
        log_extra = {
            "assoc_id": pending[0].inst.assoc_id,
            "target": self.ae_title,
            "instances": len(pending),
        }
        outcome = self._post([p.inst.path for p in pending], log_extra)
        results = map_stow_result(outcome, uids)
        for item in pending:
            item.result = results.get(item.inst.sop_instance_uid)
        if len(pending) > 1:
            for item in pending:
                if item.result is None:
                    self._send([item])
        for item in pending:
            if item.result is None:  # cannot happen for a single instance
                item.result = status(PROCESSING_FAILURE, "dicomweb: no verdict")

    # -- store --------------------------------------------------------------------------------
    def store(self, inst: Instance) -> Dataset:
        pending = _Pending(inst, inst.path.stat().st_size)
        batch = self.cfg.batch
        if batch.max_instances == 1:
            self._send([pending])
        else:
            self._store_batched(pending)
        assert pending.result is not None
        code = int(pending.result.Status)
        result = "stored" if code == SUCCESS or 0xB000 <= code <= 0xBFFF else "failed"
        SINK_STORES.labels(kind=self.kind, result=result).inc()
        return pending.result

    def _store_batched(self, pending: _Pending) -> None:
        """The first instance of a study opens a batch and sends it after linger_s or when
        it is full; instances of the same study arriving meanwhile join it and wait."""
        cfg = self.cfg.batch
        try:
            study = str(
                dcmread(
                    pending.inst.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
                ).get("StudyInstanceUID", "")
            )
        except Exception:
            study = ""
        if not study:  # nothing to group by: on its own, without waiting
            self._send([pending])
            return
        with self._lock:
            open_batch = self._open.get(study)
            if (
                open_batch is not None
                and not open_batch.full
                and open_batch.size + pending.size <= cfg.max_bytes
            ):
                open_batch.items.append(pending)
                open_batch.size += pending.size
                if len(open_batch.items) >= cfg.max_instances:
                    open_batch.full = True
                    self._lock.notify_all()
                leader = False
                mine = open_batch
            else:
                mine = _Batch([pending], pending.size)
                self._open[study] = mine
                leader = True
            if leader:
                self._lock.wait_for(lambda: mine.full, timeout=cfg.linger_s)
                mine.full = True
                if self._open.get(study) is mine:
                    del self._open[study]
            else:
                budget = cfg.linger_s + 3 * self.cfg.retry.max_time_s + 10
                self._lock.wait_for(lambda: pending.result is not None, timeout=budget)
                if pending.result is None:
                    pending.result = status(OUT_OF_RESOURCES, "dicomweb: batch timed out")
                return
        try:
            self._send(mine.items)
        finally:
            with self._lock:
                for item in mine.items:
                    if item.result is None:
                        item.result = status(PROCESSING_FAILURE, "dicomweb: batch failed")
                self._lock.notify_all()


def build_sink(tcfg: TargetConfig, prefix: str, publish: EventPublisher | None) -> Sink:
    if tcfg.kind == "filesystem":
        return FilesystemSink(tcfg, prefix, publish)
    if tcfg.kind == "dicomweb":
        return DicomwebSink(tcfg, prefix, publish)
    raise ValueError(f"no sink for target kind {tcfg.kind}")
