"""Signals to a whole process tree: torchrun starts its workers in their own process groups, so a
process-group kill misses them. Linux only (reads /proc), like the SageMaker containers it emulates."""

from __future__ import annotations

import signal
import socket

from spot_training.definition.container_entry import descendants, signal_all


def signal_tree(pid: int, signum: int = signal.SIGKILL) -> None:
    """Send `signum` to `pid` and all its descendants (collected first, so none escapes by reparenting)."""
    signal_all([pid, *descendants(pid)], signum)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous of processes started next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
