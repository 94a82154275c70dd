"""The construct package builds cleanly and carries what the pipeline ships."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_building_the_package_prints_no_warning_and_ships_the_trainer_and_the_monitor(tmp_path):
    # pip -v shows the build backend's output, where setuptools prints its warnings; this machine's pip
    # settings (local wheel folders) and byte-compile switches are left out, as on a user's machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PIP_CONFIG_FILE"] = os.devnull
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path),
                           str(ROOT / "constructs")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert [line for line in output.splitlines() if "warn" in line.lower()] == []
    (wheel,) = tmp_path.glob("spot_training-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"spot_training/trainer/train.py", "spot_training/trainer/checkpointing.py",
            "spot_training/cdk/monitor/execution_age.py", "spot_training/config/prices.json"} <= names
    assert not any(name.endswith("requirements.txt") for name in names)
