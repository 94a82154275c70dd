"""The training container's first process: runs the image's own command and hands SageMaker's stop to the trainer.

StopTrainingJob and the end of MaxRuntimeInSeconds send SIGTERM to the container's first process and SIGKILL
120 s later (SageMaker API reference, StopTrainingJob). In the default image that process is
`bash -m start_with_right_hostname.sh train` (aws/deep-learning-containers, pytorch/training Dockerfile
ENTRYPOINT, and SageMaker's `train` argument); the sagemaker-training toolkit under it starts torchrun through
`asyncio.create_subprocess_shell` (process.py) and forwards no signal (sagemaker-training-toolkit issues 125 and
173), so without this process the trainer only ever sees the SIGKILL.

Every code archive carries this file (trainer_code.py) and the pipeline makes it the container's entry point
(ContainerEntrypoint, definition.py); it needs only Python's standard library, as the image has it. It runs the
image's command as its child and, on SIGTERM, sends SIGTERM to the trainer processes (torchrun's workers) only:
they finish the step in progress and stop together (loop.py), torchrun sees its workers end and exits, and the
toolkit after it. torchrun itself is not signalled: a signalled torchrun kills its workers 30 s later
(torch/distributed/elastic). A SIGTERM before any worker runs (set-up, data download) stops the whole tree at
once; whatever is still alive `STOP_GRACE_SECONDS` after the signal gets SIGTERM, then SIGKILL, before
SageMaker's own kill. Linux only (/proc, prctl), like the containers it runs in.

    python3 spot_training_container_entry.py COMMAND [ARG...]
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_VARIABLE = "STOP_GRACE_SECONDS"
DEFAULT_GRACE_SECONDS = 100.0  # of SageMaker's 120 s: room for the last SIGTERM/SIGKILL round and the uploads
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def descendants(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """Every live descendant of `pid`, parents before children (`children`: a `_children()` already read)."""
    children = _children() if children is None else children
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_launcher(pid: int) -> bool:
    """torchrun, as the console script or as `python -m torch.distributed.run`."""
    return any(part.endswith("torchrun") or part == "torch.distributed.run" for part in _command_line(pid)[:3])


def trainer_processes(root: int) -> list[int]:
    """The workers: children of every torchrun under `root`."""
    children = _children()
    return [worker for pid in descendants(root, children) if is_launcher(pid) for worker in children.get(pid, [])]


def signal_all(pids: list[int], signum: int) -> None:
    """`signum` to each of `pids`, skipping those already gone."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def reap(child: int | None = None) -> int | None:
    """Reap every exited child, the orphans a subreaper adopted included, without reading /proc; returns
    `child`'s exit code once it has ended."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if pid == 0:
            return code
        if pid == child:
            code = os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python3 spot_training_container_entry.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    grace = float(os.environ.get(GRACE_VARIABLE, DEFAULT_GRACE_SECONDS))
    # Orphans (a shell's children whose shell ended) stay ours, so the stop reaches them.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    stop_at: list[float] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_at.append(time.monotonic()))
    signal.signal(signal.SIGINT, lambda signum, frame: stop_at.append(time.monotonic()))
    process = subprocess.Popen(argv)
    child, me = process.pid, os.getpid()
    forwarded, killed, code = False, False, None
    while code is None:
        if stop_at and not forwarded:
            forwarded = True
            workers = trainer_processes(me)
            print("[container] SIGTERM: " + (f"passed to the trainer processes {workers}" if workers else
                                             "no trainer running yet; stopping every process"),
                  file=sys.stderr, flush=True)
            if workers:
                signal_all(workers, signal.SIGTERM)
            else:
                signal_all(descendants(me), signal.SIGTERM)
                grace = min(grace, 5.0)
        if stop_at and not killed and time.monotonic() - stop_at[0] > grace:
            killed = True
            signal_all(descendants(me), signal.SIGTERM)
            time.sleep(2.0)
            signal_all(descendants(me), signal.SIGKILL)
        code = reap(child)
        if code is None:
            time.sleep(0.1)
    # Nothing the command started outlives the container's first process.
    signal_all(descendants(me), signal.SIGKILL)
    reap(child)
    process.returncode = code  # reaped here, not by Popen
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
