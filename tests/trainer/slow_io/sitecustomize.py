"""Test-only: when SLOW_CHECKPOINT_FLAG is set, every fsync first drops that flag file and then waits, so
a test can kill the job while a checkpoint is being written. Loaded by adding this folder to PYTHONPATH."""

import os
import time

_flag = os.environ.get("SLOW_CHECKPOINT_FLAG")
if _flag:
    _fsync = os.fsync

    def _slow_fsync(fd):
        open(_flag, "a").close()
        time.sleep(float(os.environ.get("SLOW_CHECKPOINT_SECONDS", "2")))
        _fsync(fd)

    os.fsync = _slow_fsync
