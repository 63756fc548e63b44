"""Probe a NATS server's TLS and permissions from a lab host (runs with the agent's venv).

nats_probe.py nocert URL CA            exit 0 if a client without a certificate is refused
nats_probe.py subs URL CA CERT KEY INBOX_PREFIX SUBJECT=allow|deny ...
                                       exit 0 if each subscription is allowed/denied as given
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import nats


def context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


async def nocert(url: str, ca: str) -> int:
    try:
        nc = await nats.connect(
            url, tls=context(ca), allow_reconnect=False, max_reconnect_attempts=0,
            connect_timeout=5,
        )
    except Exception as exc:  # noqa: BLE001 - any refusal is what we want
        print(f"refused without a client certificate: {type(exc).__name__}")
        return 0
    await nc.close()
    print("CONNECTED without a client certificate")
    return 1


async def subs(url: str, ca: str, cert: str, key: str, inbox: str, specs: list[str]) -> int:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(
        url, tls=context(ca, cert, key), allow_reconnect=False, max_reconnect_attempts=0,
        error_cb=on_error, inbox_prefix=inbox, connect_timeout=5,
    )
    rc = 0
    for spec in specs:
        subject, want = spec.rsplit("=", 1)
        errors.clear()
        await nc.subscribe(subject)
        await nc.flush(timeout=5)
        await asyncio.sleep(0.5)
        denied = any("permissions violation" in e and subject.lower() in e for e in errors)
        got = "deny" if denied else "allow"
        print(f"{'ok  ' if got == want else 'FAIL'} subscribe {subject}: {got} (expected {want})")
        rc |= got != want
    await nc.close()
    return rc


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "nocert":
        return asyncio.run(nocert(*args[:2]))
    return asyncio.run(subs(args[0], args[1], args[2], args[3], args[4], args[5:]))


if __name__ == "__main__":
    sys.exit(main())
