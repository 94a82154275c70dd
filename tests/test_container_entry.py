"""The training container's first process (spot_training/definition/container_entry.py) and SageMaker's stop signal.

SageMaker signals only the container's first process (StopTrainingJob, MaxRuntime). A process tree shaped like
the image's, with stand-ins that record the signals they receive: a shell (the toolkit starts torchrun through
`asyncio.create_subprocess_shell`), a `torchrun` that starts a worker and, like the real one, forwards nothing
until it is signalled itself, and the worker (the trainer). The real chain, through the image's toolkit and
torchrun, is in test_local_run.py (the interruptions' logs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spot_training.definition.trainer_code import CONTAINER_ENTRY_SOURCE

RECORDER = """import signal, sys, time, subprocess
name, log = sys.argv[1], sys.argv[2]
def note(signum, frame):
    open(log, "a").write(f"{name} got {signal.Signals(signum).name}\\n")
    if name == "worker":
        sys.exit(0)  # the trainer: finishes its step, then ends
signal.signal(signal.SIGTERM, note)
if name == "torchrun":  # the launcher: starts the worker and waits for it
    worker = subprocess.Popen([sys.executable, sys.argv[3], "worker", log])
    sys.exit(worker.wait())
open(log, "a").write(f"{name} started\\n")
time.sleep(60)
"""


@pytest.fixture
def tree(tmp_path):
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    launcher = tmp_path / "torchrun"  # found by its name, as the real console script is
    launcher.write_text(f"#!{sys.executable}\nexec(open({str(recorder)!r}).read())\n")
    launcher.chmod(0o755)
    log = tmp_path / "signals.log"
    return [f"{launcher} torchrun {log} {recorder}"], log


def _started(log: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not (log.exists() and "worker started" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_to_the_entry_point_reaches_the_trainer_and_not_the_launcher(tree):
    shell_command, log = tree
    process = subprocess.Popen([sys.executable, str(CONTAINER_ENTRY_SOURCE), "/bin/sh", "-c", *shell_command],
                               stderr=subprocess.PIPE, text=True)
    _started(log, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert log.read_text().splitlines() == ["worker started", "worker got SIGTERM"]
    assert process.returncode == 0  # the worker stopped cleanly, torchrun and the shell after it
    assert "[container] SIGTERM: passed to the trainer processes" in stderr


def test_without_the_entry_point_the_trainer_receives_nothing(tree):
    """The image's own first process, a shell over the launcher: the trainer never sees the stop (on SageMaker
    it is killed 120 s later)."""
    shell_command, log = tree
    # `; exit` keeps bash from exec'ing the launcher, as the image's script does (it is bash -m over a script).
    process = subprocess.Popen(["/bin/bash", "-c", f"{shell_command[0]}; exit $?"], start_new_session=True)
    _started(log, process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    time.sleep(0.5)
    assert log.read_text().splitlines() == ["worker started"]
    _kill_processes_naming(log)


def _kill_processes_naming(path: Path) -> None:
    """The stand-ins the shell left behind (what SageMaker's SIGKILL ends 120 s later)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def test_a_stop_before_the_trainer_runs_ends_the_whole_tree_at_once(tmp_path):
    process = subprocess.Popen([sys.executable, str(CONTAINER_ENTRY_SOURCE), "/bin/sh", "-c", "sleep 60; true"],
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert process.returncode != 0
    assert "no trainer running yet; stopping every process" in stderr


def test_the_entry_point_needs_only_the_standard_library():
    """It runs in the image before anything of ours is installed there."""
    done = subprocess.run([sys.executable, "-I", "-S", str(CONTAINER_ENTRY_SOURCE)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("usage:")
