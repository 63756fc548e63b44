"""``dimse-relay queue``: look at and repair an edge queue with the agent's own configuration
(its NATS connection and certificate): status, dead-letters, retry, purge."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from dimse_relay.config import AgentConfig
from dimse_relay.queue import EdgeQueue
from dimse_relay.transport import build_tls_context


class _Connection:
    """What EdgeQueue needs of a transport: the connected client."""

    def __init__(self, nc: NatsClient):
        self.nc = nc

    def client(self) -> NatsClient:
        return self.nc


async def _connect(cfg: AgentConfig) -> NatsClient:
    options: dict[str, Any] = {
        "servers": cfg.nats.servers,
        "name": f"dimse-relay-queue-cli/{cfg.name}",
        "connect_timeout": cfg.nats.connect_timeout_s,
        "allow_reconnect": False,
        "max_reconnect_attempts": 0,
        "inbox_prefix": cfg.nats.inbox_prefix,
    }
    tls = build_tls_context(cfg.nats)
    if tls is not None:
        options["tls"] = tls
        if cfg.nats.tls is not None and cfg.nats.tls.server_hostname:
            options["tls_hostname"] = cfg.nats.tls.server_hostname
    if cfg.nats.user:
        options["user"] = cfg.nats.user
        options["password"] = cfg.nats.password
    if cfg.nats.creds_file:
        options["user_credentials"] = str(cfg.nats.creds_file)
    return await nats.connect(**options)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _run(cfg: AgentConfig, args: argparse.Namespace) -> int:
    nc = await _connect(cfg)
    try:
        queue = EdgeQueue(cfg.queue, _Connection(nc), cfg.nats.subject_prefix)  # type: ignore[arg-type]
        if args.action == "status":
            stats = await queue.refresh_stats()
            data = {
                "depth": stats.depth,
                "bytes": stats.bytes + stats.object_bytes,
                "oldest_age_s": round(stats.oldest_age_s, 1),
                "dead_letters": stats.dead_letters,
                "max_bytes": cfg.queue.max_bytes,
                "max_items": cfg.queue.max_items,
            }
            if args.json:
                print(json.dumps(data))
            else:
                for key, value in data.items():
                    print(f"{key}: {value}")
            return 0
        if args.action == "dead-letters":
            items = await queue.list_dead()
            if args.json:
                print(json.dumps(items))
            else:
                for it in items:
                    print(
                        f"{it['seq']:>8}  {_when(it['dead_at'])}  {it['called_ae_title']:<16} "
                        f"attempts={it['attempts']} status={it['status'] or '-'}  {it['reason']}  "
                        f"sop_instance_uid={it['sop_instance_uid']}"
                    )
                print(f"{len(items)} dead letter(s)")
            return 0
        seqs = [int(s) for s in args.seq]
        if args.all:
            seqs = [int(it["seq"]) for it in await queue.list_dead(limit=10**9)]
        if not seqs and not args.all:
            print("dimse-relay queue: name dead letters by sequence or use --all", file=sys.stderr)
            return 2
        done = 0
        for seq in seqs:
            try:
                if args.action == "retry":
                    await queue.retry_dead(seq)
                else:
                    await queue.purge_dead(seq)
                done += 1
            except Exception as exc:
                print(f"dead letter {seq}: {type(exc).__name__}: {exc}", file=sys.stderr)
        verb = "requeued" if args.action == "retry" else "purged"
        print(f"{done} dead letter(s) {verb}")
        return 0 if done == len(seqs) else 1
    finally:
        await nc.close()


def cmd_queue(cfg: AgentConfig, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(cfg, args))
    except Exception as exc:
        print(f"dimse-relay queue: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def add_parser(sub: Any) -> None:
    p_queue = sub.add_parser("queue", help="inspect and repair the edge queue (queued mode)")
    p_queue.add_argument("--config", "-c", required=True)
    p_queue.add_argument("--json", action="store_true")
    actions = p_queue.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="depth, bytes, age of the oldest item, dead letters")
    actions.add_parser("dead-letters", help="list dead letters with their reasons")
    for name, text in (
        ("retry", "put dead letters back on the queue"),
        ("purge", "delete dead letters"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("seq", nargs="*", help="dead-letter sequence numbers")
        p.add_argument("--all", action="store_true")
