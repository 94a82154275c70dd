"""Hyperparameters, checkpoint bookkeeping and start-up checks, without launching a job."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.trainer.harness import ROOT, TRAIN

sys.path.insert(0, str(ROOT / "trainer"))

from checkpointing import keep_after_pruning  # noqa: E402
from settings import SettingsError, parse_settings  # noqa: E402


@pytest.mark.parametrize(("argv", "message"), [
    (["--learning_rate", "-1"], "learning_rate=-1.0: must be > 0.0"),
    (["--learning_rate", "0"], "learning_rate=0.0: must be > 0.0"),
    (["--keep_checkpoints", "1"], "keep_checkpoints=1: must be >= 2"),
    (["--strategy", "zero3"], "strategy=zero3: must be one of auto, ddp, fsdp"),
    (["--warmup_ratio", "0.9"], "warmup_ratio=0.9: must be <= 0.5"),
    (["--min_learning_rate_ratio", "2"], "min_learning_rate_ratio=2.0: must be <= 1.0"),
    (["--learning_rate", "nan"], "learning_rate=nan: must be a finite number"),
    (["--max_grad_norm", "inf"], "max_grad_norm=inf: must be a finite number"),
    (["--checkpoint_interval_minutes=-inf"], "checkpoint_interval_minutes=-inf: must be a finite number"),
])
def test_bad_hyperparameters_are_refused_naming_the_field(argv, message):
    with pytest.raises(SettingsError) as caught:
        parse_settings(["--train_dir", "/data", *argv])
    assert str(caught.value) == message


def test_sagemaker_style_arguments_parse_into_typed_settings():
    settings = parse_settings(["--train_dir", "/d", "--max_steps", "5", "--async_checkpoint", "False",
                               "--learning_rate", "3e-4", "--checkpoint_interval_minutes", "7.5"])
    assert (settings.max_steps, settings.async_checkpoint, settings.learning_rate) == (5, False, 3e-4)
    assert settings.checkpoint_interval_minutes == 7.5


def test_entry_point_exits_2_with_one_line_on_a_bad_value():
    done = subprocess.run([sys.executable, str(TRAIN), "--train_dir", "/d", "--learning_rate", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: learning_rate=-1.0: must be > 0.0"


def test_entry_point_refuses_unknown_hyperparameters():
    done = subprocess.run([sys.executable, str(TRAIN), "--train_dir", "/d", "--learning_rat", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unrecognized arguments: --learning_rat 1" in done.stderr


def test_missing_image_dependency_fails_with_one_clear_line(capsys, monkeypatch):
    import train

    monkeypatch.setattr(train, "REQUIRED_MODULES", ("torch", "surely_not_installed_module"))
    with pytest.raises(SystemExit) as exited:
        train.check_imports()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: the training image lacks surely_not_installed_module; it must "
                                               "provide torch, surely_not_installed_module (see requirements-image.txt)")


@pytest.mark.parametrize(("complete", "present", "keep", "kept"), [
    ([3, 6, 9, 12], [3, 6, 9, 12], 3, {6, 9, 12}),
    ([3, 6], [3, 6, 9], 2, {3, 6, 9}),          # step-9 may be mid-write: newer than the newest complete
    ([3, 6, 9], [2, 3, 6, 9], 2, {6, 9}),       # an incomplete folder older than a complete one goes
    ([], [4, 8], 2, {4, 8}),                    # nothing complete yet: delete nothing
    ([12], [3, 12], 2, {12}),                   # never the newest complete
])
def test_pruning_keeps_the_newest_complete_and_anything_newer(complete, present, keep, kept):
    assert keep_after_pruning(complete, present, keep) == kept


@pytest.mark.parametrize(("nccl", "gloo", "bound"), [
    ("eth0", None, "eth0"),  # the toolkit's NCCL_SOCKET_IFNAME: gloo follows it
    ("^docker,lo", None, None),  # an NCCL exclusion list is no interface name: gloo keeps its own choice
    ("eth0", "ens5", "ens5"),  # set by the user: kept
    (None, None, None)])
def test_gloo_binds_the_interface_the_toolkit_names_for_nccl(monkeypatch, nccl, gloo, bound):
    from environment import bind_gloo_to_the_instance_network

    for name, value in (("NCCL_SOCKET_IFNAME", nccl), ("GLOO_SOCKET_IFNAME", gloo)):
        monkeypatch.setenv(name, value or "")  # recorded, so what the function sets is undone afterwards
        if value is None:
            monkeypatch.delenv(name)
    assert bind_gloo_to_the_instance_network() == bound
