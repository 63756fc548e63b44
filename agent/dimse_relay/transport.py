"""NATS transport: one TLS (mTLS) connection per agent, on an asyncio loop in its own thread.

This module is the single bridge between pynetdicom's threads and asyncio: DIMSE handlers call
:meth:`NatsTransport.call` to run a coroutine on the loop and wait for its result with a
timeout. Everything that touches the NATS client runs on the loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import queue
import ssl
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from dimse_relay import metrics
from dimse_relay.config import NATSConfig

LOG = logging.getLogger("dimse_relay.transport")
T = TypeVar("T")
MessageHandler = Callable[[Msg], Awaitable[None]]


class NotConnected(RuntimeError):
    """NATS is not connected right now."""


class InsecureServer(RuntimeError):
    """The server did not negotiate TLS although the agent is configured for it."""


def _url(parsed: Any) -> str:
    """A server URL as text (nats-py keeps them as urllib ParseResults)."""
    return str(parsed.geturl()) if hasattr(parsed, "geturl") else str(parsed)


def build_tls_context(cfg: NATSConfig) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.tls.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file))
    return ctx


class ReplyRouter:
    """One wildcard inbox subscription; replies are routed to per-operation queues by token."""

    def __init__(self, inbox_root: str):
        self.inbox_root = inbox_root
        self._queues: dict[str, asyncio.Queue[Msg] | queue.Queue[Msg]] = {}
        # Recently released inboxes: replies still in flight to them (after a timeout or a
        # C-CANCEL) are expected and dropped quietly rather than counted as invalid.
        self._released: collections.deque[str] = collections.deque(maxlen=4096)

    def new_inbox(self) -> tuple[str, asyncio.Queue[Msg]]:
        """An inbox whose replies are read on the NATS loop."""
        token = uuid.uuid4().hex
        replies: asyncio.Queue[Msg] = asyncio.Queue()
        self._queues[token] = replies
        return f"{self.inbox_root}.{token}", replies

    def new_thread_inbox(self) -> tuple[str, queue.Queue[Msg]]:
        """An inbox whose replies are read by a pynetdicom thread (streamed responses)."""
        token = uuid.uuid4().hex
        replies: queue.Queue[Msg] = queue.Queue()
        self._queues[token] = replies
        return f"{self.inbox_root}.{token}", replies

    def release(self, inbox: str) -> None:
        token = inbox.rsplit(".", 1)[-1]
        if self._queues.pop(token, None) is not None:
            self._released.append(token)

    async def dispatch(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        replies = self._queues.get(token)
        if replies is None:
            if token not in self._released:
                metrics.WIRE_REJECTED.labels(reason="no_such_inbox").inc()
            return
        replies.put_nowait(msg)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop (libuv): the NATS client and the direct DIMSE path run on it, and
    every relayed message crosses it several times on both agents; measured on the benchmark
    host it cut the loop's share of a relayed C-STORE substantially. The standard loop
    where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept for odd platforms
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class NatsTransport:
    def __init__(self, cfg: NATSConfig, agent_name: str):
        self.cfg = cfg
        self.agent_name = agent_name
        self.loop = new_event_loop()
        self.nc: NatsClient | None = None
        self._thread = threading.Thread(target=self._run_loop, name="nats-loop", daemon=True)
        self._connected = threading.Event()
        self._stopping = False
        self._on_connect: list[Callable[[], Awaitable[None]]] = []
        self.replies = ReplyRouter(f"{cfg.inbox_prefix}.{uuid.uuid4().hex}")
        # Subscriptions the server refused (permissions): the agent is not ready while set.
        self.refused_subjects: set[str] = set()
        self._server_max_payload = 0
        # Times the connection dropped: a chunk stream that crossed a drop may have lost a
        # message (NATS delivers at most once), which is then not a protocol error.
        self.disconnects = 0

    @property
    def chunk_size(self) -> int:
        """nats.chunk_size, capped so a chunk and its envelope fit the server's max_payload."""
        limit = self._server_max_payload - 16 * 1024
        return min(self.cfg.chunk_size, limit) if limit > 0 else self.cfg.chunk_size

    # -- thread bridge -------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the NATS loop from a pynetdicom thread and wait for its result."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("relay operation timed out") from None

    # -- connection ----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def server_url(self) -> str | None:
        nc = self.nc
        return _url(nc.connected_url) if nc is not None and nc.connected_url else None

    def _check_tls(self, nc: NatsClient) -> None:
        """nats-py only starts TLS when the server's INFO asks for it, whatever the client
        has configured; a server (or a man in the middle) that does not would get plaintext.
        With TLS configured, a connection without TLS is refused."""
        if self.cfg.tls is None:
            return
        writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
        ssl_object = writer.get_extra_info("ssl_object") if writer is not None else None
        if ssl_object is None or not nc._server_info.get("tls_required"):
            raise InsecureServer(f"NATS server {self.server_url} did not negotiate TLS")

    def start(self) -> None:
        self._thread.start()
        self.submit(self._connect_forever())

    def on_connect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` on the loop once connected (and now, if already connected)."""
        self._on_connect.append(callback)
        if self.connected:
            self.submit(callback())  # type: ignore[arg-type]

    async def _connect_forever(self) -> None:
        delay = self.cfg.reconnect_wait_s
        while not self._stopping:
            try:
                await self._connect_once()
                return
            except Exception as exc:
                LOG.warning(
                    "NATS connect failed, retrying",
                    extra={"error": type(exc).__name__, "detail": str(exc)[:200], "retry_s": delay},
                )
                metrics.NATS_CONNECTED.set(0)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.max_reconnect_wait_s)

    async def _connect_once(self) -> None:
        async def disconnected() -> None:
            self.disconnects += 1
            metrics.NATS_CONNECTED.set(0)
            LOG.warning("NATS disconnected")

        async def reconnected() -> None:
            if self.nc is not None:
                try:
                    self._check_tls(self.nc)
                except InsecureServer as exc:
                    LOG.error("NATS reconnected without TLS; closing", extra={"detail": str(exc)})
                    metrics.NATS_CONNECTED.set(0)
                    await self.nc.close()
                    self.submit(self._connect_forever())
                    return
            # nats-py subscribes again after a reconnect; a refusal would be reported anew.
            self.refused_subjects.clear()
            metrics.NATS_CONNECTED.set(1)
            metrics.NATS_RECONNECTS.inc()
            LOG.info("NATS reconnected", extra={"server": self.server_url})

        async def error(exc: Exception) -> None:
            detail = str(exc)
            if "permissions violation for subscription" in detail.lower():
                self.refused_subjects.add(detail.rsplit(" ", 1)[-1].strip("\"'"))
                LOG.error("NATS refused a subscription", extra={"detail": detail[:200]})
                return
            LOG.warning("NATS error", extra={"error": type(exc).__name__, "detail": detail[:200]})

        async def closed() -> None:
            metrics.NATS_CONNECTED.set(0)

        options: dict[str, Any] = {
            "servers": self.cfg.servers,
            "name": self.cfg.name or f"dimse-relay/{self.agent_name}",
            "connect_timeout": self.cfg.connect_timeout_s,
            "reconnect_time_wait": self.cfg.reconnect_wait_s,
            "max_reconnect_attempts": -1,
            "allow_reconnect": True,
            "inbox_prefix": self.cfg.inbox_prefix,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
            "closed_cb": closed,
            "pending_size": 64 * 1024 * 1024,
        }
        tls = build_tls_context(self.cfg)
        if tls is not None:
            options["tls"] = tls
            if self.cfg.tls is not None and self.cfg.tls.server_hostname:
                options["tls_hostname"] = self.cfg.tls.server_hostname
        if self.cfg.user:
            options["user"] = self.cfg.user
            options["password"] = self.cfg.password
        if self.cfg.creds_file:
            options["user_credentials"] = str(self.cfg.creds_file)
        nc = await nats.connect(**options)
        self.nc = nc
        self._server_max_payload = int(nc.max_payload or 0)
        try:
            self._check_tls(nc)
            await nc.subscribe(f"{self.replies.inbox_root}.*", cb=self.replies.dispatch)
            self.refused_subjects.clear()  # a new connection: refusals are reported anew
            metrics.NATS_CONNECTED.set(1)
            self._connected.set()
            LOG.info("NATS connected", extra={"server": self.server_url})
            for callback in self._on_connect:
                await callback()
        except BaseException:
            # Never leave a half-set-up connection reconnecting in the background while the
            # next attempt opens another one.
            self.nc = None
            with contextlib.suppress(Exception):
                await nc.close()
            raise

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def client(self) -> NatsClient:
        if self.nc is None or not self.nc.is_connected:
            raise NotConnected("NATS is not connected")
        return self.nc

    async def subscribe(
        self, subject: str, handler: MessageHandler, queue: str = ""
    ) -> Subscription:
        nc = self.nc
        if nc is None:
            raise NotConnected("NATS is not connected")
        return await nc.subscribe(subject, queue=queue, cb=handler, pending_bytes_limit=256 << 20)

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        await self.client().publish(subject, payload, reply=reply)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True

        async def _close() -> None:
            if self.nc is not None and not self.nc.is_closed:
                with contextlib.suppress(Exception):  # best effort at shutdown
                    await self.nc.drain()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):  # best effort at shutdown
                self.submit(_close()).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
