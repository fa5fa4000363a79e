"""Test helpers for real processes: free loopback ports, and finding every process a test started.

A test sets ``DREAMTEACHER_TEST_MARK=<uuid>`` in the environment of what it starts; every descendant inherits it,
also one that outlives its parent and is re-parented to init, so :func:`marked` finds what a leak would leave.
"""

from __future__ import annotations

import socket
import time

import psutil

MARK = "DREAMTEACHER_TEST_MARK"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def marked(marker: str) -> list[psutil.Process]:
    """Every live process whose environment carries ``MARK=marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == marker:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def running(pid: int, wait_s: float = 10.0) -> bool:
    """Whether ``pid`` still runs after up to ``wait_s`` seconds. A zombie (killed, not yet reaped: in a container
    whose PID 1 does not reap, a killed grandchild stays one) does not run."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)
