"""Signals to a whole process tree: torchrun starts its workers in their own process groups, so a
process-group kill misses them. Linux only (reads /proc), like the SageMaker containers it emulates."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def signal_tree(pid: int, signum: int = signal.SIGKILL) -> None:
    """Send `signum` to `pid` and all its descendants (collected first, so none escapes by reparenting)."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signum)
        except ProcessLookupError:
            pass
