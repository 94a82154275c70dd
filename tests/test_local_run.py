"""`spot-training local-run`: the deployed training step, run locally with simulated spot interruptions."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from spot_training.cli import load_config
from spot_training.local_run import CPU_PARAMETERS, build_job
from spot_training.trainer_code import default_trainer_dir
from tests.conftest import ROOT
from tests.trainer.harness import SLOW_IO


def local_run(out, *args, env=None):
    import os

    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "local-run", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), done.stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return local_run(tmp_path_factory.mktemp("reference"), "--steps", "8")


def test_the_job_is_the_deployed_training_step_with_cpu_parameter_overrides():
    job, definition = build_job(load_config(ROOT / "cdk.json"), 8, default_trainer_dir())
    assert job.entry_point == "train.py" and job.instance_count == 2
    assert job.checkpoint_s3_uri == "s3://local-artifact-bucket/checkpoints/local-execution/"
    assert set(job.channels) == {"train", "model", "code"}
    assert job.environment["HF_HUB_OFFLINE"] == "1"
    assert job.hyperparameters["max_steps"] == "8"
    assert job.hyperparameters["sequence_length"] == str(CPU_PARAMETERS["SequenceLength"])
    assert job.hyperparameters["strategy"] == "ddp"
    assert not any(name.startswith("sagemaker_") for name in job.hyperparameters)
    step = next(s for s in definition["Steps"] if s["Type"] == "Training")
    assert job.metric_definitions == step["Arguments"]["AlgorithmSpecification"]["MetricDefinitions"]


def test_uninterrupted_run_reports_its_run(uninterrupted):
    report, stdout = uninterrupted
    assert report["interruptions"] == 0 and report["resumed_from_steps"] == [] and report["lost_steps"] == 0
    assert report["final_step"] == 8 and report["wall_seconds"] > 0
    assert "local run: 2 instances, 0 interruption(s)" in stdout


def test_two_interruptions_one_during_a_save_end_where_the_uninterrupted_run_ends(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    slow = {"PYTHONPATH": str(SLOW_IO), "SLOW_CHECKPOINT_FLAG": str(tmp_path / "writing"),
            "SLOW_CHECKPOINT_SECONDS": "0.2"}
    report, stdout = local_run(tmp_path / "run", "--steps", "8", "--interrupt-at-step", "3",
                               "--interrupt-at-step", "6", env=slow)
    assert report["interruptions"] == 2
    assert any(report["interrupted_during_save"])
    assert len(report["resumed_from_steps"]) == 2 and all(s is not None for s in report["resumed_from_steps"])
    assert report["lost_steps"] >= 0
    assert report["final_step"] == 8
    assert report["final_loss"] == reference["final_loss"]
    assert report["final_parameters_sha256"] == reference["final_parameters_sha256"]
    assert "resumed from steps" in stdout


def test_every_metric_definition_matches_the_trainers_log_lines(uninterrupted):
    report, _ = uninterrupted
    assert report["metric_definitions_ok"] is True
    assert all(count >= 1 for count in report["metric_definitions_matched"].values())
    assert set(report["metric_definitions_matched"]) == {
        "train:step", "train:loss", "train:learning_rate", "train:tokens_per_second", "validation:loss",
        "checkpoint:blocked_seconds"}


def test_interrupt_step_outside_the_run_is_refused_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "local-run", "--steps", "5",
                           "--interrupt-at-step", "9", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --interrupt-at-step 9: must be between 1 and --steps - 1 (4)"


def test_compare_runs_says_identical_for_the_same_report(uninterrupted, tmp_path):
    from pathlib import Path

    folder = Path(uninterrupted[0]["model_s3_path"]).parents[5]
    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "compare-runs", str(folder), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "bit-identical" in done.stdout
    assert re.search(r"final loss: reference [\d.]+ \(0 interruptions\)", done.stdout)
