"""One emulated instance of `local-run`: runs a command and takes every process it starts down with it.

`python -m spot_training.supervisor -- COMMAND...` makes itself a child subreaper, so the processes the
command starts (the toolkit, torchrun, its workers) stay its descendants even when their parents die, and
asks the kernel for SIGTERM when local-run, its parent, dies (a SIGKILL of local-run included). On SIGTERM
it passes SIGTERM to all of them, waits `GRACE_SECONDS`, SIGKILLs what is left and exits, like a container
that is stopped. Linux only (prctl), like the SageMaker containers it stands in for.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from spot_training.processes import descendants

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
GRACE_SECONDS = 2.0


def _prctl(option: int, value: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def stop_descendants(grace_seconds: float) -> None:
    """SIGTERM every descendant, wait up to `grace_seconds` for them to end, then SIGKILL the rest."""
    me = os.getpid()
    for pid in descendants(me):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while descendants(me) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
    for pid in descendants(me):
        _signal(pid, signal.SIGKILL)
    while descendants(me):
        _reap()
        time.sleep(0.01)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reap() -> None:
    """Collect exited children, the orphans this subreaper adopted included."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m spot_training.supervisor -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # local-run died before the request took effect
        return 143
    stopping = False

    def on_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    child = subprocess.Popen(argv[1:])
    while child.poll() is None and not stopping:
        time.sleep(0.05)
    if stopping:
        stop_descendants(GRACE_SECONDS)
        child.wait()
        return 143
    stop_descendants(0.0)  # anything the command left behind
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
