"""The custom trainer contract: a trainer of your own receives exactly the hyperparameters you give, as the
image's toolkit turns them into arguments, plus the environment you add."""

from __future__ import annotations

import json
import subprocess
import sys

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2

from spot_training.config.settings import TrainingConfig
from spot_training.definition.rules import resolve
from spot_training.cdk.pipeline import TrainingPipeline

STRICT_TRAINER = """import argparse, os
parser = argparse.ArgumentParser(allow_abbrev=False)
parser.add_argument("--epochs", type=int, required=True)
parser.add_argument("--label", required=True)
args = parser.parse_args()  # exits 2 on any argument it does not know
print(f"[custom] label={args.label} flag={os.environ.get('MY_FLAG')} loss={1.0 / args.epochs}")
"""
METRICS = [{"Name": "custom:loss", "Regex": r"loss=(\S+)"}]


def pipeline_with(tmp_path, **kwargs) -> TrainingPipeline:
    (tmp_path / "train.py").write_text(STRICT_TRAINER)
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    return TrainingPipeline(stack, "T", config=TrainingConfig(), vpc=vpc, trainer_source_dir=tmp_path,
                            metric_definitions=METRICS, alarms=False, **kwargs)


def launch(pipeline: TrainingPipeline, trainer_dir, extra_env=None) -> subprocess.CompletedProcess:
    """Start the trainer with the arguments the image's toolkit builds from the step's hyperparameters
    (sagemaker-training: JSON-decode each value, leave sagemaker_* out, `mapping.to_cmd_args`)."""
    from sagemaker_training import mapping

    step = next(s for s in resolve(pipeline.definition)["Steps"] if s["Type"] == "Training")
    decoded = {k: _decoded(v) for k, v in step["Arguments"]["HyperParameters"].items() if not k.startswith("sagemaker_")}
    environment = {**step["Arguments"]["Environment"], **(extra_env or {})}
    return subprocess.run([sys.executable, str(trainer_dir / "train.py"), *mapping.to_cmd_args(decoded)],
                          env=environment, capture_output=True, text=True, timeout=60)


def _decoded(value):
    """As the toolkit reads hyperparameters.json (sagemaker-training environment.read_hyperparameters): JSON when it
    parses, else the string itself (a string pipeline parameter arrives unquoted)."""
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def test_a_strict_custom_trainer_gets_exactly_its_hyperparameters_and_environment(tmp_path):
    pipeline = pipeline_with(tmp_path, hyperparameters={"epochs": 2, "label": "run-a"}, environment={"MY_FLAG": "on"})
    done = launch(pipeline, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[custom] label=run-a flag=on loss=0.5"
    step = next(s for s in pipeline.definition["Steps"] if s["Type"] == "Training")
    assert step["Arguments"]["Environment"]["HF_HUB_OFFLINE"] == "1"  # the offline variables stay


def test_without_hyperparameters_a_custom_trainer_receives_the_built_in_ones(tmp_path):
    done = launch(pipeline_with(tmp_path), tmp_path)
    assert done.returncode == 2 and "--max_steps" in done.args and "train.py: error: " in done.stderr


@pytest.mark.parametrize(("hyperparameters", "message"), [
    ({"sagemaker_program": "x.py"}, "hyperparameters: 'sagemaker_program' must be letters, digits"),
    ({"label": "two words"}, "hyperparameters: label='two words' must be a number, a boolean or a string without "
                             "whitespace or shell syntax"),
    ({"label": "$(reboot)"}, "hyperparameters: label='$(reboot)' must be"),
])
def test_hyperparameters_the_toolkit_would_mangle_are_refused_in_one_line(tmp_path, hyperparameters, message):
    with pytest.raises(ValueError) as caught:
        pipeline_with(tmp_path, hyperparameters=hyperparameters)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
