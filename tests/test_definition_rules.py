"""The definition rules catch what cfn-lint and checkov cannot see inside a pipeline body."""

from __future__ import annotations

import copy

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2

from spot_training.definition import build as sdk
from spot_training.config.settings import TrainingConfig
from spot_training.definition.rules import Expectations, check
from spot_training.cdk.pipeline import TrainingPipeline, load_metric_definitions
from spot_training.cdk.validation import DefinitionValidationPlugin
from tests.conftest import ROOT

EXPECT = Expectations(use_spot=True, network_isolation=True, inter_container_encryption=True,
                      volume_encryption=False)


@pytest.fixture(scope="module")
def generated():
    return sdk.generate(TrainingConfig(region="us-east-1"), metric_definitions=load_metric_definitions(ROOT / "trainer"),
                        placeholders=sdk.Placeholders.for_counts(2, 1))


def args(definition):
    return sdk.training_step(definition)["Arguments"]


def test_generated_definition_passes(generated):
    assert check(generated, EXPECT) == []


def test_generation_is_deterministic_and_makes_no_network_calls(generated, monkeypatch):
    import socket

    def refuse(*_args, **_kwargs):
        raise AssertionError("network call during generation")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    again = sdk.generate(TrainingConfig(region="us-east-1"), metric_definitions=load_metric_definitions(ROOT / "trainer"),
                         placeholders=sdk.Placeholders.for_counts(2, 1))
    assert again == generated


def _break_instance_type(d):
    next(p for p in d["Parameters"] if p["Name"] == "InstanceType")["DefaultValue"] = "ml.p9.huge"


BREAKAGES = {
    "bogus instance type": (_break_instance_type, "Steps[Train].Arguments.ResourceConfig.InstanceType: 'ml.p9.huge' "
                            "is not one of the"),
    "max wait below max runtime": (lambda d: args(d)["StoppingCondition"].update(MaxWaitTimeInSeconds=60),
                                   "Steps[Train].Arguments.StoppingCondition.MaxWaitTimeInSeconds: 60 is below "
                                   "MaxRuntimeInSeconds (43200)"),
    "runtime above 28 days": (lambda d: args(d)["StoppingCondition"].update(MaxRuntimeInSeconds=10**9),
                              "Steps[Train].Arguments.StoppingCondition.MaxRuntimeInSeconds: 1000000000 is above SageMaker's 28-day limit"),
    "spot without checkpoints": (lambda d: args(d).pop("CheckpointConfig"),
                                 "Steps[Train].Arguments.CheckpointConfig.S3Uri: managed spot needs a checkpoint"),
    "checkpoint uri without trailing slash": (
        lambda d: args(d)["CheckpointConfig"]["S3Uri"]["Std:Join"]["Values"].pop(),
        "must be keyed on the run (ResolveRun's RunId, the execution id unless RunId is given) and end with '/'"),
    "checkpoint uri not keyed on the run": (
        lambda d: args(d)["CheckpointConfig"]["S3Uri"]["Std:Join"]["Values"].__setitem__(1, "shared"),
        "must be keyed on the run"),
    "no vpc config": (lambda d: args(d).pop("VpcConfig"), "Steps[Train].Arguments.VpcConfig: subnets and security"),
    "isolation off": (lambda d: args(d).update(EnableNetworkIsolation=False),
                      "Steps[Train].Arguments.EnableNetworkIsolation: is False, configured True"),
    "encryption off": (lambda d: args(d).update(EnableInterContainerTrafficEncryption=False),
                       "Steps[Train].Arguments.EnableInterContainerTrafficEncryption: is False, configured True"),
    "no output key": (lambda d: args(d)["OutputDataConfig"].pop("KmsKeyId"),
                      "Steps[Train].Arguments.OutputDataConfig.KmsKeyId: is required"),
    "volume key on local nvme": (lambda d: args(d)["ResourceConfig"].update(VolumeKmsKeyId="k"),
                                 "Steps[Train].Arguments.ResourceConfig.VolumeKmsKeyId: is rejected"),
    "unknown argument": (lambda d: args(d).update(Bogus=1),
                         "Steps[Train].Arguments.Bogus: unknown field of CreateTrainingJobRequest"),
    "wrong type": (lambda d: args(d)["ResourceConfig"].update(VolumeSizeInGB="big"),
                   "Steps[Train].Arguments.ResourceConfig.VolumeSizeInGB: must be an integer"),
    "too many subnets": (lambda d: args(d)["VpcConfig"].update(Subnets=[f"subnet-{i}" for i in range(17)]),
                         "Steps[Train].Arguments.VpcConfig.Subnets: 17 items, at most 16 allowed"),
    "bad role arn": (lambda d: args(d).update(RoleArn="not-an-arn-but-long-enough"),
                     "Steps[Train].Arguments.RoleArn: 'not-an-arn-but-long-enough' does not match"),
    "no capacity retry": (lambda d: sdk.training_step(d).update(RetryPolicies=[]),
                          "Steps[Train].RetryPolicies: must retry SageMaker.CAPACITY_ERROR"),
    "max wait without spot": (lambda d: args(d).update(EnableManagedSpotTraining=False),
                              "Steps[Train].Arguments.EnableManagedSpotTraining: is False, configured True"),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_each_broken_definition_is_caught_naming_the_field(generated, name):
    breaker, expected = BREAKAGES[name]
    broken = copy.deepcopy(generated)
    breaker(broken)
    messages = [str(v) for v in check(broken, EXPECT)]
    assert any(expected in m for m in messages), messages


def test_oversized_definition_is_caught(generated):
    broken = copy.deepcopy(generated)
    args(broken)["Environment"] = {f"K{i}": "x" * 200 for i in range(6000)}
    assert any(m.startswith("PipelineDefinition: ") for m in map(str, check(broken, EXPECT)))


def test_violations_fail_synth_through_the_validation_plugin(tmp_path):
    """The rules run as a CDK validation plugin: a broken body stops app.synth() beside nag's report."""
    app = cdk.App(outdir=str(tmp_path))
    stack = cdk.Stack(app, "Broken", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    pipeline = TrainingPipeline(stack, "Training", config=TrainingConfig(), vpc=vpc)
    args(pipeline.definition)["StoppingCondition"]["MaxWaitTimeInSeconds"] = 60
    cdk.Validations.of(app).add_plugins(DefinitionValidationPlugin())
    with pytest.raises(Exception) as caught:
        app.synth()
    report = (tmp_path / "validation-report.json").read_text() if (tmp_path / "validation-report.json").exists() else ""
    assert "MaxWaitTimeInSeconds: 60 is below MaxRuntimeInSeconds (43200)" in str(caught.value) + report
