"""The code archive that synth ships installs offline: the image's own toolkit runs its install step on the
exact file the CDK asset holds, with networking blocked, and reaches for nothing."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from spot_training.local.instances import container_environment
from spot_training.definition.trainer_code import check_trainer_dir
from tests.conftest import ROOT

# What the container does with the code channel before it starts torchrun (sagemaker-training
# entry_point.run: files.download_and_extract, then entry_point.install, which pip-installs a requirements.txt
# or a setup.py package it finds in the code).
INSTALL_STEP = """
import os, sys
from sagemaker_training import entry_point, environment, files
files.download_and_extract(uri=sys.argv[1], path=environment.code_dir)
entry_point.install("train.py", path=environment.code_dir, capture_error=True)
print("code:", " ".join(sorted(os.listdir(environment.code_dir))))
"""


def network_blocker() -> list[str]:
    """A command prefix that runs its command in a network namespace of its own: no route anywhere."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    pytest.skip("unshare -rn (a user and network namespace) is not available on this machine")


def run_install_step(archive: Path, base: Path) -> subprocess.CompletedProcess:
    # The environment local-run gives each emulated instance; pip fails fast instead of retrying.
    env = {**container_environment(base), "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "5"}
    (base / "input" / "config").mkdir(parents=True)
    for name in ("hyperparameters.json", "inputdataconfig.json"):
        (base / "input" / "config" / name).write_text("{}")
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "127.0.0.1", "hosts": ["127.0.0.1"]}))
    return subprocess.run([*network_blocker(), sys.executable, "-c", INSTALL_STEP, str(archive)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shipped_archive(default_app) -> Path:
    """The trainer archive as the cloud assembly stages it for upload (the CDK asset's file)."""
    directory = Path(default_app.assembly.directory)
    archives = set()
    for manifest in directory.glob("*.assets.json"):
        for asset in json.loads(manifest.read_text()).get("files", {}).values():
            source = asset["source"]
            if source.get("packaging") == "file" and source["path"].endswith(".gz"):
                archives.add(directory / source["path"])
    (archive,) = archives
    return archive


def test_the_shipped_archive_installs_offline_without_pip(shipped_archive, tmp_path):
    done = run_install_step(shipped_archive, tmp_path / "opt" / "ml")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "train.py" in done.stdout.split("code:", 1)[1].split()
    log = done.stdout + done.stderr
    assert "Installing dependencies from requirements.txt" not in log and "Installing module" not in log


def test_the_same_step_fails_offline_once_a_requirements_file_is_in_the_archive(shipped_archive, tmp_path):
    """The control: the check above can fail. A requirements.txt pinning a torch the image lacks (as the
    trainer once shipped) makes the toolkit run pip, which cannot reach an index."""
    archive = tmp_path / "with-requirements.tar.gz"
    with tarfile.open(shipped_archive) as source, tarfile.open(archive, "w:gz") as target:
        for member in source.getmembers():
            target.addfile(member, source.extractfile(member))
        data = b"torch==2.13.0\n"
        info = tarfile.TarInfo("requirements.txt")
        info.size = len(data)
        target.addfile(info, io.BytesIO(data))
    done = run_install_step(archive, tmp_path / "opt" / "ml")
    assert done.returncode != 0
    assert "InstallRequirementsError" in done.stdout + done.stderr


@pytest.mark.parametrize("name", ["requirements.txt", "setup.py"])
def test_a_trainer_folder_that_would_make_the_toolkit_run_pip_is_refused_at_synth(tmp_path, name):
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / name).write_text("")
    with pytest.raises(ValueError) as caught:
        check_trainer_dir(tmp_path)
    assert str(caught.value).startswith(f"trainer_source_dir={tmp_path}: holds {name}, which the training image's "
                                        "launcher pip-installs at job start")


def test_a_trainer_folder_without_train_py_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"has no train.py \(the entry point the pipeline runs\)$"):
        check_trainer_dir(tmp_path)


def test_the_repository_trainer_passes_the_check():
    check_trainer_dir(ROOT / "trainer")
