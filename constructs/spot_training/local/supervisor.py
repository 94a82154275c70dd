"""One emulated instance of `local-run`: a container runtime for one command, taking every process the
command starts down with it.

`python -m spot_training.local.supervisor -- COMMAND...` makes itself a child subreaper, so the processes the
command starts (the toolkit, torchrun, its workers) stay its descendants even when their parents die, and
asks the kernel for SIGTERM when local-run, its parent, dies (a SIGKILL of local-run included). On SIGTERM it
does what stopping a container does (`docker stop`, and SageMaker's StopTrainingJob): SIGTERM to the container's
first process only (COMMAND), `GRACE_SECONDS` for everything to end, then SIGKILL to whatever is left. What
reaches the trainer is what the first process passes on: the platform's entry point (container_entry.py)
forwards it, the image's own command does not. Linux only (prctl), like the SageMaker containers it stands in
for.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from spot_training.definition.container_entry import descendants, reap, signal_all

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
GRACE_SECONDS = 2.0


def _prctl(option: int, value: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def stop_container(first: int, grace_seconds: float) -> None:
    """SIGTERM the container's first process, wait up to `grace_seconds` for every descendant to end, then
    SIGKILL the rest."""
    me = os.getpid()
    signal_all([first], signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while descendants(me) and time.monotonic() < deadline:
        reap()
        time.sleep(0.05)
    kill_descendants()


def kill_descendants() -> None:
    me = os.getpid()
    signal_all(descendants(me), signal.SIGKILL)
    while descendants(me):
        reap()
        time.sleep(0.01)


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m spot_training.local.supervisor -- COMMAND [ARG...]", file=sys.stderr)
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
        stop_container(child.pid, GRACE_SECONDS)
        child.wait()
        return 143
    kill_descendants()  # anything the command left behind
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
