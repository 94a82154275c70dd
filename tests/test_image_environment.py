"""The suite runs on the training image's packages: `requirements-image.txt` names them, it agrees with the
image the config selects, and the test environment holds exactly those versions."""

from __future__ import annotations

import importlib.metadata
import re
import sys

import pytest

from spot_training.config.settings import TrainingConfig
from tests.conftest import ROOT, cdk_json_context

IMAGE_REQUIREMENTS = ROOT / "requirements-image.txt"


def image_pins() -> dict[str, str]:
    pins = {}
    for line in IMAGE_REQUIREMENTS.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def image_python() -> str:
    (version,) = re.findall(r"^# image-python: (3\.\d+)$", IMAGE_REQUIREMENTS.read_text(), re.MULTILINE)
    return version


@pytest.fixture(scope="module")
def config() -> TrainingConfig:
    return TrainingConfig.from_context(cdk_json_context())


def test_the_image_file_pins_every_package_the_trainer_and_the_launcher_use():
    assert set(image_pins()) >= {"torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy",
                                 "sagemaker-training", "sagemaker-pytorch-training"}


def test_the_pins_are_the_versions_of_the_image_the_config_selects(config):
    from spot_training.definition.build import default_image_uri

    pins = image_pins()
    assert pins["torch"] == config.framework_version
    assert pins["transformers"] == config.transformers_version
    assert f"py{image_python().replace('.', '')}" == config.py_version
    tag = default_image_uri(config).rsplit(":", 1)[1]
    assert tag.startswith(f"{pins['torch']}-transformers{pins['transformers']}-gpu-{config.py_version}-"), tag


def test_python_defaults_select_the_same_image_as_cdk_json(config):
    assert (TrainingConfig().framework_version, TrainingConfig().transformers_version) == (
        config.framework_version, config.transformers_version)


@pytest.mark.parametrize("package", sorted(image_pins()))
def test_the_suite_runs_on_the_image_version_of(package):
    assert importlib.metadata.version(package) == image_pins()[package], (
        f"{package}: installed {importlib.metadata.version(package)}, the image has {image_pins()[package]}; "
        "run `make test`, which installs requirements-image.txt")


def test_the_suite_runs_on_the_image_python_when_this_machine_has_it():
    wanted = tuple(int(part) for part in image_python().split("."))
    if sys.version_info[:2] != wanted:
        pytest.skip(f"no Python {image_python()} on this machine; the Makefile then falls back to python3")
    assert sys.version_info[:2] == wanted


def test_the_trainer_ships_no_file_that_makes_the_toolkit_install_anything():
    trainer = ROOT / "trainer"
    assert not (trainer / "requirements.txt").exists()
    assert not (trainer / "setup.py").exists()
