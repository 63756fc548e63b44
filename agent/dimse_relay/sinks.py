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

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from pydicom import dcmread
from pydicom.dataset import Dataset

from dimse_relay import metrics, subjects
from dimse_relay.config import FilesystemSinkConfig, TargetConfig
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
                    stored_as = final.with_name(
                        f"{final.stem}.{copy.dataset_sha256[:16]}{final.suffix}"
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
        self._event(inst, stored_as, rel, copy, duplicate)
        return status(SUCCESS)

    def _event(self, inst: Instance, path: Path, rel: Path, copy: _Copy, duplicate: bool) -> None:
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
        del rel
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


def build_sink(tcfg: TargetConfig, prefix: str, publish: EventPublisher | None) -> Sink:
    if tcfg.kind == "filesystem":
        return FilesystemSink(tcfg, prefix, publish)
    raise ValueError(f"no sink for target kind {tcfg.kind}")
