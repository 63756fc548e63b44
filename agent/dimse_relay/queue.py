"""The edge queue of queued-mode listeners, on the JetStream of the NATS server the edge agent
connects to (normally the site's leaf node, with its own JetStream domain and file storage).

Three JetStream assets, shared by every agent of the site (names in ``queue`` config):

- the queue stream (work-queue retention, file storage, ``discard: new``): one message per
  accepted C-STORE, an envelope of kind QUEUED (docs/queued-mode.md). Instances up to
  ``inline_max_bytes`` travel inside it; larger ones in the object bucket, written first, so a
  queue message only ever names a complete object (a half-written object is never queued).
- the object bucket (JetStream object store, ``discard: new``) for large instances.
- the dead-letter stream: items that failed permanently or ran out of attempts, with the
  reason in headers; `dimse-relay queue` lists, retries and purges them.

Dedupe: the queue message's ``Nats-Msg-Id`` is the far AE title, the SOP Instance UID and the
dataset's sha256, so the same instance offered twice for one far AE title within
``duplicate_window_s`` is stored once, while a different instance reusing a UID is queued (and
delivered) as the separate instance it is. A large instance's object is named after that id
(hashed), so a modality's resend after an unconfirmed write reuses the object its first queue
message may already name.

Delivery: one durable pull consumer per far AE title (``deliver-<AE token>``, filtered on
that AE title's queue subject), so an outage of one far AE title holds only its own items.

Coroutines here run on the NATS loop (transport.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError
from nats.js.object_store import ObjectStore

from dimse_relay import envelope, metrics, subjects
from dimse_relay.config import QueueConfig
from dimse_relay.envelope import QueuedHeader
from dimse_relay.transport import NatsTransport

LOG = logging.getLogger("dimse_relay.queue")
CONSUMER_PREFIX = "deliver-"
H_REASON = "Dimse-Relay-Reason"
H_STATUS = "Dimse-Relay-Status"
H_ATTEMPTS = "Dimse-Relay-Attempts"
H_DEAD_AT = "Dimse-Relay-Dead-At"
# JetStream error codes of a full store (stream limits with discard new, or the server's
# max_file_store): the SCU gets out-of-resources.
_FULL_CODES = {10047, 10077, 10078, 10027, 10028}


class QueueFull(Exception):
    """The edge queue is at its configured limit (or the server's store is full)."""


class QueueUnavailable(Exception):
    """JetStream could not be reached or did not confirm the write."""


@dataclass(frozen=True)
class Enqueued:
    item_id: str
    duplicate: bool


@dataclass
class QueueStats:
    depth: int = 0
    bytes: int = 0
    oldest_age_s: float = 0.0
    dead_letters: int = 0
    object_bytes: int = 0


def queue_subject(prefix: str, ae_title: str) -> str:
    return f"{prefix}.{subjects.VERSION}.queue.{subjects.encode_aet(ae_title)}"


def dead_subject(prefix: str, ae_title: str) -> str:
    return f"{prefix}.{subjects.VERSION}.dead.{subjects.encode_aet(ae_title)}"


def dedupe_id(far_ae_title: str, sop_instance_uid: str, digest: str) -> str:
    """One instance for one far AE title: the same instance queued for two far AE titles is
    two items."""
    return f"{far_ae_title}:{sop_instance_uid}:{digest}"


def object_name(dedupe: str, unique: str = "") -> str:
    """The bucket object of a large instance: the same for the same item (a resend within
    the duplicate window reuses it), or made unique; no UID in the bucket's subjects."""
    return hashlib.sha256(f"{dedupe}{unique}".encode()).hexdigest()


def _age_s(mtime: str | None) -> float | None:
    """Seconds since an object's RFC 3339 mtime (nanoseconds allowed), None if unreadable."""
    if not mtime:
        return None
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", mtime)
    if not match:
        return None
    frac = (match.group(2) or ".0")[:7]
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    when = datetime.datetime.fromisoformat(match.group(1) + frac + zone)
    return time.time() - when.timestamp()


def consumer_name(far_ae_title: str) -> str:
    return CONSUMER_PREFIX + subjects.encode_aet(far_ae_title)


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, APIError):
        text = (exc.description or "").lower()
        return exc.err_code in _FULL_CODES or "maximum" in text or "insufficient" in text
    return False


def file_digest(path: Path, offset: int) -> str:
    """sha256 of ``path[offset:]`` (run in a thread: instances may be GBs)."""
    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(offset)
        while block := fh.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()


class EdgeQueue:
    def __init__(
        self,
        cfg: QueueConfig,
        transport: NatsTransport,
        prefix: str,
        far_ae_titles: list[str] | None = None,
    ):
        self.cfg = cfg
        self.transport = transport
        self.prefix = prefix
        # The far AE titles of this agent's queued listeners: one delivery consumer each.
        self.far_ae_titles = sorted(set(far_ae_titles or []))
        self._ready = False
        self._setup_lock = asyncio.Lock()
        self._objects: ObjectStore | None = None
        self._writes: dict[str, asyncio.Future[api.ObjectInfo]] = {}
        self.stats = QueueStats()
        self.last_write = 0.0  # time.monotonic() of the latest enqueue (ingest priority)

    # -- JetStream assets ------------------------------------------------------------------
    def js(self) -> JetStreamContext:
        return self.transport.client().jetstream(
            domain=self.cfg.domain, timeout=self.cfg.write_timeout_s
        )

    @property
    def ready(self) -> bool:
        return self._ready

    def invalidate(self) -> None:
        """Set the assets up again before the next use (after an error that may mean they
        are gone)."""
        self._ready = False

    def _stream_configs(self) -> list[api.StreamConfig]:
        cfg = self.cfg
        return [
            api.StreamConfig(
                name=cfg.stream,
                description="dimse-relay: C-STOREs accepted in queued mode, to be delivered",
                subjects=[f"{self.prefix}.{subjects.VERSION}.queue.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                discard=api.DiscardPolicy.NEW,
                max_bytes=cfg.max_bytes,
                max_msgs=cfg.max_items,
                duplicate_window=cfg.duplicate_window_s,
                num_replicas=cfg.replicas,
            ),
            api.StreamConfig(
                name=cfg.dead_letter_stream,
                description="dimse-relay: queued C-STOREs that could not be delivered",
                subjects=[f"{self.prefix}.{subjects.VERSION}.dead.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                discard=api.DiscardPolicy.NEW,
                # Dead letters keep large instances in the bucket: a tenth is plenty.
                max_bytes=dead_letter_max_bytes(cfg),
                max_msgs=cfg.max_items,
                num_replicas=cfg.replicas,
            ),
        ]

    async def setup(self) -> None:
        """Create or update the streams and the bucket (idempotent;
        every agent of a site runs it at start and after a reconnect)."""
        async with self._setup_lock:
            if self._ready:  # set up by a concurrent caller meanwhile
                return
            js = self.js()
            try:
                for stream in self._stream_configs():
                    await _ensure_stream(js, stream)
                self._objects = await _ensure_bucket(js, self.cfg)
            except APIError as exc:
                if exc.err_code == 10047:
                    LOG.error(
                        "edge queue: the NATS server's JetStream cannot reserve the configured "
                        "limits (needs max_file_store >= 2.1 x queue.max_bytes)",
                        extra={"reserved_bytes": reserved_bytes(self.cfg)},
                    )
                raise
            self._ready = True
            LOG.info("edge queue ready", extra={"stream": self.cfg.stream})

    async def ensure_consumer(self, far_ae_title: str) -> None:
        """Create (or keep) the delivery consumer of one far AE title. Not part of setup():
        a problem with one far AE title's consumer must not stop queuing for the others."""
        js = self.js()
        name = consumer_name(far_ae_title)
        consumer = api.ConsumerConfig(
            durable_name=name,
            description=f"dimse-relay queued-mode delivery to {far_ae_title}",
            filter_subject=queue_subject(self.prefix, far_ae_title),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.cfg.ack_wait_s,
            # Attempts are counted by the deliverer, which dead-letters; the server never
            # stops redelivering on its own (that would strand the item in the stream).
            max_deliver=-1,
            max_ack_pending=max(64, self.cfg.concurrency * 16),
        )
        try:
            await js.add_consumer(self.cfg.stream, consumer)
        except APIError as exc:
            try:
                # It exists with another configuration (an older agent's): keep it.
                await js.consumer_info(self.cfg.stream, name)
            except NotFoundError:
                # E.g. another consumer of the work queue overlaps its filter: one made by
                # hand, or the single unfiltered "deliver" of earlier development versions.
                LOG.error(
                    "edge queue: cannot create a delivery consumer; remove overlapping "
                    "consumers of the queue stream",
                    extra={"error": exc.description or str(exc.err_code)},
                )
                LOG.debug("edge queue: the consumer that failed", extra={"consumer": name})
                raise exc from None

    async def setup_objects(self) -> None:
        """Bind the existing bucket (for the CLI, which never creates anything)."""
        if self._objects is None:
            self._objects = await self.js().object_store(self.cfg.object_bucket)

    def objects(self) -> ObjectStore:
        if self._objects is None:
            raise QueueUnavailable("edge queue not set up")
        return self._objects

    # -- enqueue (listener side) -------------------------------------------------------------
    def has_room(self, length: int) -> bool:
        """From the last stats poll: is there room for ``length`` more bytes and one item?"""
        used = self.stats.bytes + self.stats.object_bytes
        return used + length <= self.cfg.max_bytes and self.stats.depth < self.cfg.max_items

    def inline_limit(self) -> int:
        """Largest dataset sent inline in its queue message (larger ones go to the bucket)."""
        return min(self.cfg.inline_max_bytes, self._payload_room())

    async def enqueue(
        self,
        header: QueuedHeader,
        command: bytes,
        path: Path | bytes,
        offset: int,
    ) -> Enqueued:
        """Durably queue one instance; returns once JetStream confirmed the queue message.

        A caller that gives up (its time budget) does not cut the write short: it runs to its
        own end, so no half-written object is left behind by a cancellation."""
        self.last_write = time.monotonic()
        task = asyncio.ensure_future(self._enqueue(header, command, path, offset))
        task.add_done_callback(_consume_result)
        return await asyncio.shield(task)

    async def _enqueue(
        self,
        header: QueuedHeader,
        command: bytes,
        path: Path | bytes,
        offset: int,
    ) -> Enqueued:
        if not self.transport.connected:
            # nats-py would buffer the write until it reconnects; the modality hears at once.
            raise QueueUnavailable("NATS not connected")
        if not self._ready:
            try:
                await self.setup()
            except Exception as exc:
                raise QueueUnavailable(type(exc).__name__) from None
        if not self.has_room(header.dataset_length):
            raise QueueFull("edge queue limit reached")
        js = self.js()
        body: bytes | bytearray = command
        dedupe = dedupe_id(header.called_ae_title, header.sop_instance_uid, header.digest)
        reused = False
        if header.dataset_length <= self.inline_limit():
            if isinstance(path, bytes):  # the direct listener's dataset, held in memory
                body = command + path[offset : offset + header.dataset_length]
            else:
                with path.open("rb") as fh:
                    fh.seek(offset)
                    body = command + fh.read(header.dataset_length)
        elif isinstance(path, bytes):
            raise QueueUnavailable("a dataset for the bucket must come from a file")
        else:
            name, reused = await self._put_object(header, dedupe, path, offset)
            header = header.model_copy(update={"object_name": name})
        headers = {"Nats-Msg-Id": dedupe}
        try:
            ack = await js.publish(
                queue_subject(self.prefix, header.called_ae_title),
                envelope.encode(header, bytes(body)),
                timeout=self.cfg.write_timeout_s,
                stream=self.cfg.stream,
                headers=headers,
            )
        except APIError as exc:
            # JetStream refused the message: nothing new names the object.
            if header.object_name and not reused:
                await self.delete_object(header.object_name)
            if _is_full(exc):
                raise QueueFull(str(exc)[:120]) from None
            self.invalidate()  # the streams may have gone
            raise QueueUnavailable(type(exc).__name__) from None
        except Exception as exc:
            # No answer (timeout, connection lost): the message may be stored and name the
            # object, which therefore stays; a resend of the instance reuses it.
            self.invalidate()
            raise QueueUnavailable(type(exc).__name__) from None
        if ack.duplicate:
            # An object found in the bucket belongs to the first copy (queued, or a dead
            # letter): it stays. One written now stays only if the first copy names it.
            if (
                header.object_name
                and not reused
                and not await self._queued_names(ack.seq, header.object_name)
            ):
                await self.delete_object(header.object_name)
            metrics.QUEUE_DUPLICATES.inc()
            LOG.info(
                "same instance already taken within the duplicate window: acknowledged, "
                "not queued again (queue.duplicate_window_s)",
                extra={
                    "still_queued": await self.still_queued(ack.seq),
                    "sop_instance_uid": header.sop_instance_uid,
                },
            )
            return Enqueued(header.item_id, duplicate=True)
        self.stats.depth += 1
        self.stats.bytes += len(body)
        if header.object_name:
            self.stats.object_bytes += header.dataset_length
        metrics.QUEUE_ENQUEUED.inc()
        return Enqueued(header.item_id, duplicate=False)

    async def still_queued(self, seq: int) -> bool:
        """Is queue message ``seq`` still in the queue stream (unknown counts as yes)?"""
        try:
            await self.js().get_msg(self.cfg.stream, seq=seq)
        except NotFoundError:
            return False
        except Exception:
            return True
        return True

    async def _queued_names(self, seq: int, name: str) -> bool:
        """Does queue message ``seq`` (the original of a duplicate) still wait, naming object
        ``name``? If it is delivered (gone), the object just written is nobody's."""
        try:
            msg = await self.js().get_msg(self.cfg.stream, seq=seq)
            header, _ = envelope.decode(msg.data or b"")
        except NotFoundError:
            return False
        except Exception:
            return True  # unknown: keep the object rather than risk the original's data
        return isinstance(header, QueuedHeader) and header.object_name == name

    def _payload_room(self) -> int:
        """Largest dataset part one message may carry on this server (max_payload)."""
        max_payload = int(self.transport.client().max_payload or 1024 * 1024)
        return max(4096, max_payload - 64 * 1024)

    async def _put_object(
        self, header: QueuedHeader, dedupe: str, path: Path, offset: int
    ) -> tuple[str, bool]:
        """Write the dataset to the bucket; returns the object's name and whether an object
        already there was reused."""
        store = self.objects()
        name = object_name(dedupe)
        running = self._writes.get(name)
        if running is not None:
            # The same instance is being written (a resend while the first write runs):
            # wait for it rather than write a second set of chunks under the same name.
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
        with contextlib.suppress(Exception):
            # The same instance is in the bucket (a resend): an object's meta is written after
            # all its chunks, so it is complete, and writing it again would purge chunks a
            # delivery may be reading. Only within the duplicate window: a message stored
            # later is not a duplicate and must not share the object of one that may be
            # delivered (and its object deleted) first.
            existing = await store.get_info(name)
            age = _age_s(existing.mtime)
            if (
                not existing.deleted
                and existing.size == header.dataset_length
                and age is not None
                and age < self.cfg.duplicate_window_s - 60
            ):
                return name, True
            if not existing.deleted:
                name = object_name(dedupe, header.item_id)
        meta = api.ObjectMeta(
            name=name,
            options=api.ObjectMetaOptions(
                max_chunk_size=min(self.cfg.object_chunk_bytes, self._payload_room())
            ),
        )
        task = asyncio.ensure_future(self._write_object(store, meta, path, offset))
        self._writes[name] = task
        try:
            info = await task
        finally:
            if self._writes.get(name) is task:
                del self._writes[name]
        if info.size != header.dataset_length:
            await self.delete_object(name)
            raise QueueUnavailable("object size mismatch")
        return name, False

    async def _write_object(
        self, store: ObjectStore, meta: api.ObjectMeta, path: Path, offset: int
    ) -> api.ObjectInfo:
        assert meta.name is not None
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                # nats-py reads the file chunk by chunk and publishes each with an ack; on a
                # failure it purges the chunks written so far.
                return await store.put(meta.name, fh, meta=meta)
        except Exception as exc:
            if _is_full(exc):
                raise QueueFull(str(exc)[:120]) from None
            raise QueueUnavailable(type(exc).__name__) from None

    async def delete_object(self, name: str) -> None:
        """Delete an object and its delete marker (which would otherwise stay in the bucket
        and count against max_bytes, one per delivered large instance)."""
        with contextlib.suppress(Exception):
            await self.objects().delete(name)
            meta = base64.urlsafe_b64encode(name.encode()).decode()
            await self.js().purge_stream(
                f"OBJ_{self.cfg.object_bucket}",
                subject=f"$O.{self.cfg.object_bucket}.M.{meta}",
            )

    # -- statistics ------------------------------------------------------------------------
    async def refresh_stats(self) -> QueueStats:
        js = self.js()
        info = await js.stream_info(self.cfg.stream)
        dead = await js.stream_info(self.cfg.dead_letter_stream)
        objects = await js.stream_info(f"OBJ_{self.cfg.object_bucket}")
        stats = QueueStats(
            depth=int(info.state.messages),
            bytes=int(info.state.bytes),
            dead_letters=int(dead.state.messages),
            object_bytes=int(objects.state.bytes),
        )
        if stats.depth:
            with contextlib.suppress(Exception):
                first = await js.get_msg(
                    self.cfg.stream, seq=int(info.state.first_seq), subject=">", next=True
                )
                queued, _ = envelope.decode(first.data or b"")
                if isinstance(queued, QueuedHeader):
                    stats.oldest_age_s = max(0.0, time.time() - queued.queued_at)
        self.stats = stats
        metrics.QUEUE_DEPTH.set(stats.depth)
        metrics.QUEUE_BYTES.set(stats.bytes + stats.object_bytes)
        metrics.QUEUE_OLDEST_AGE.set(stats.oldest_age_s)
        metrics.QUEUE_DEAD_LETTERS.set(stats.dead_letters)
        return stats

    # -- dead letters (deliverer and CLI) -----------------------------------------------------
    async def dead_letter(
        self,
        header: QueuedHeader,
        body: bytes,
        reason: str,
        status: int | None,
        attempts: int,
        queue_seq: int,
    ) -> None:
        headers = {
            H_REASON: reason[:200],
            H_ATTEMPTS: str(attempts),
            H_DEAD_AT: f"{time.time():.3f}",
            # Once per queue message, even if the deliverer dies before its ack.
            "Nats-Msg-Id": f"dead:{header.item_id}:{queue_seq}",
        }
        if status is not None:
            headers[H_STATUS] = f"0x{status:04X}"
        await self.js().publish(
            dead_subject(self.prefix, header.called_ae_title),
            envelope.encode(header, body),
            stream=self.cfg.dead_letter_stream,
            headers=headers,
        )
        metrics.QUEUE_DEAD_LETTERED.inc()

    async def list_dead(self, limit: int = 1000) -> list[dict[str, Any]]:
        js = self.js()
        info = await js.stream_info(self.cfg.dead_letter_stream)
        out: list[dict[str, Any]] = []
        seq = int(info.state.first_seq)
        while len(out) < limit and info.state.messages:
            try:
                msg = await js.get_msg(self.cfg.dead_letter_stream, seq=seq, subject=">", next=True)
            except NotFoundError:
                break
            header, _ = envelope.decode(msg.data or b"")
            hdrs = msg.headers or {}
            if isinstance(header, QueuedHeader):
                out.append(
                    {
                        "seq": msg.seq,
                        "item_id": header.item_id,
                        "called_ae_title": header.called_ae_title,
                        "calling_ae_title": header.calling_ae_title,
                        "sop_instance_uid": header.sop_instance_uid,
                        "bytes": header.dataset_length,
                        "reason": hdrs.get(H_REASON, ""),
                        "status": hdrs.get(H_STATUS),
                        "attempts": int(hdrs.get(H_ATTEMPTS, "0") or 0),
                        "dead_at": float(hdrs.get(H_DEAD_AT, "0") or 0),
                    }
                )
            seq = int(msg.seq or seq) + 1
        return out

    async def retry_dead(self, seq: int) -> str:
        """Put dead letter ``seq`` back on the queue (fresh attempts) and remove it."""
        js = self.js()
        msg = await js.get_msg(self.cfg.dead_letter_stream, seq=seq)
        header, body = envelope.decode(msg.data or b"")
        if not isinstance(header, QueuedHeader):
            raise ValueError(f"dead letter {seq} is not a queued instance")
        await js.publish(
            queue_subject(self.prefix, header.called_ae_title),
            msg.data or b"",
            stream=self.cfg.stream,
            # A new id: the original one may still be inside the duplicate window.
            headers={"Nats-Msg-Id": f"retry:{header.item_id}:{uuid.uuid4().hex}"},
        )
        await js.delete_msg(self.cfg.dead_letter_stream, seq)
        del body
        return header.item_id

    async def purge_dead(self, seq: int) -> str:
        """Delete dead letter ``seq`` and its object."""
        js = self.js()
        msg = await js.get_msg(self.cfg.dead_letter_stream, seq=seq)
        header, _ = envelope.decode(msg.data or b"")
        if isinstance(header, QueuedHeader) and header.object_name:
            await self.setup_objects()
            await self.delete_object(header.object_name)
        await js.delete_msg(self.cfg.dead_letter_stream, seq)
        return header.item_id if isinstance(header, QueuedHeader) else str(seq)


def dead_letter_max_bytes(cfg: QueueConfig) -> int:
    return max(1024 * 1024, cfg.max_bytes // 10)


def reserved_bytes(cfg: QueueConfig) -> int:
    """File storage the three assets reserve on the server: the queue stream and the bucket
    up to max_bytes each, the dead letters a tenth. The leaf's max_file_store must cover it."""
    return 2 * cfg.max_bytes + dead_letter_max_bytes(cfg)


def _consume_result(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a shielded write whose caller left (no 'never retrieved')."""
    if not task.cancelled():
        task.exception()


def new_item_id() -> str:
    return uuid.uuid4().hex


# The stream settings the agent owns; others (set by the server or an operator) are left.
_STREAM_FIELDS = (
    "subjects",
    "retention",
    "storage",
    "discard",
    "max_bytes",
    "max_msgs",
    "duplicate_window",
    "num_replicas",
)


def _differs(current: api.StreamConfig, wanted: api.StreamConfig) -> bool:
    for name in _STREAM_FIELDS:
        want = getattr(wanted, name)
        have = getattr(current, name)
        if want is None:
            continue
        if name == "subjects":
            want, have = sorted(want), sorted(have or [])
        if name == "duplicate_window":
            want, have = float(want), float(have or 0)
        if want != have:
            return True
    return False


async def _ensure_stream(js: JetStreamContext, stream: api.StreamConfig) -> None:
    """Create the stream, or update it when its settings differ. An existing stream is looked
    up first: nats-server answers a repeated create with "insufficient storage" (10047) when
    its store could not hold the stream a second time, although nothing new is reserved."""
    assert stream.name is not None
    try:
        info = await js.stream_info(stream.name)
    except NotFoundError:
        await js.add_stream(stream)
        return
    if _differs(info.config, stream):
        await js.update_stream(stream)


async def _ensure_bucket(js: JetStreamContext, cfg: QueueConfig) -> ObjectStore:
    name = f"OBJ_{cfg.object_bucket}"
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        bucket = api.ObjectStoreConfig(
            bucket=cfg.object_bucket,
            description="dimse-relay: large instances of queued C-STOREs",
            storage=api.StorageType.FILE,
            max_bytes=cfg.max_bytes,
            replicas=cfg.replicas,
        )
        return await js.create_object_store(cfg.object_bucket, config=bucket)
    if info.config.max_bytes != cfg.max_bytes:
        await js.update_stream(info.config.evolve(max_bytes=cfg.max_bytes))
    return await js.object_store(cfg.object_bucket)
