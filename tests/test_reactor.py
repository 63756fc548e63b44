"""pynetdicom with the agent's reactor patches (reactor.py), in a separate interpreter so the
patches stay out of this test process: associations released, aborted and dropped by the peer
all end, leave no thread and no file descriptor behind, and carry every message."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, socket, threading, time
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification
    from dimse_relay.dicom import SOCKET_HANDLERS, configure_pynetdicom

    configure_pynetdicom(False)

    def fds():
        return len(os.listdir("/proc/self/fd"))

    scp_ae = AE(ae_title="SCP")
    scp_ae.add_supported_context(Verification)
    server = scp_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=SOCKET_HANDLERS)
    port = server.server_address[1]
    scu_ae = AE(ae_title="SCU")
    scu_ae.add_requested_context(Verification)
    scu_ae.acse_timeout = scu_ae.dimse_timeout = scu_ae.network_timeout = 10

    def one(end):
        assoc = scu_ae.associate("127.0.0.1", port, ae_title="SCP", evt_handlers=SOCKET_HANDLERS)
        assert assoc.is_established
        for _ in range(20):
            rsp = assoc.send_c_echo()
            assert rsp.Status == 0, rsp
        if end == "release":
            assoc.release()
            assert assoc.is_released
        elif end == "abort":
            assoc.abort()
            assert assoc.is_aborted
        else:  # the SCU's socket closes under it: both sides must notice
            assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + 10
            while assoc.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not assoc.is_alive()
            assoc.dul.socket.socket.close()  # the peer's own socket: not what is tested

    one("release")  # warm-up: lazily created pynetdicom state
    time.sleep(0.5)
    before_fds, before_threads = fds(), threading.active_count()
    for end in ["release", "abort", "drop"] * 5:
        one(end)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        fds() > before_fds or threading.active_count() > before_threads
    ):
        time.sleep(0.05)
    print("fds", before_fds, fds(), "threads", before_threads, threading.active_count())
    assert fds() <= before_fds and threading.active_count() <= before_threads
    server.shutdown()
    print("ok")
    """
)


def test_patched_reactors_end_every_association_and_leak_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        proc.stdout[-2000:] + proc.stderr[-4000:]
    )
