"""The data preparation step of the deployed pipeline: a processing job in the training subnets and security
group, isolated, KMS for volume and output, on a CPU instance, running trainer/prepare.py from the same code
archive in the same image; the training step reads its output; the pipeline role may create it only inside
the same guardrails."""

from __future__ import annotations

import json

import pytest

from spot_training.definition import build as sdk
from spot_training.config.settings import TrainingConfig
from spot_training.definition.rules import Expectations, all_steps, check
from spot_training.cdk.pipeline import load_metric_definitions
from tests.conftest import ROOT, pipeline_body, synth, training_step


@pytest.fixture(scope="module")
def steps(default_app):
    return {s["Name"]: s for s in pipeline_body(default_app)["Steps"]}


def test_the_pipeline_prepares_the_data_before_training(steps):
    assert list(steps) == ["ResolveRun", "PrepareData", "Train", "Evaluate", "CheckEvaluation"]
    prepare = steps["PrepareData"]
    assert prepare["Type"] == "Processing"
    assert prepare["CacheConfig"] == {"Enabled": True, "ExpireAfter": "P30D"}
    retried = {e for p in prepare["RetryPolicies"] for e in p["ExceptionType"]}
    assert {"SageMaker.CAPACITY_ERROR", "SageMaker.JOB_INTERNAL_ERROR"} <= retried


def test_the_preparation_runs_isolated_in_the_training_subnets_with_kms(steps):
    args, train = steps["PrepareData"]["Arguments"], steps["Train"]["Arguments"]
    network = args["NetworkConfig"]
    assert network["EnableNetworkIsolation"] is True and network["EnableInterContainerTrafficEncryption"] is True
    assert network["VpcConfig"] == {"SecurityGroupIds": train["VpcConfig"]["SecurityGroupIds"],
                                    "Subnets": train["VpcConfig"]["Subnets"]}
    cluster = args["ProcessingResources"]["ClusterConfig"]
    assert cluster["InstanceType"] == "ml.m5.2xlarge" and cluster["InstanceCount"] == 1
    assert cluster["VolumeKmsKeyId"] == args["ProcessingOutputConfig"]["KmsKeyId"] == train["OutputDataConfig"]["KmsKeyId"]
    assert args["StoppingCondition"] == {"MaxRuntimeInSeconds": 21600}
    assert args["RoleArn"] == train["RoleArn"]
    assert args["AppSpecification"]["ImageUri"] == train["AlgorithmSpecification"]["TrainingImage"]
    assert args["Environment"]["HF_HUB_OFFLINE"] == "1"


def test_the_preparation_runs_prepare_py_from_the_trainer_archive_on_the_runs_inputs(steps):
    args = steps["PrepareData"]["Arguments"]
    inputs = {i["InputName"]: i["S3Input"] for i in args["ProcessingInputs"]}
    assert inputs["train"]["S3Uri"] == {"Get": "Parameters.TrainingDataUri"}
    assert inputs["model"]["S3Uri"] == {"Get": "Parameters.BaseModelUri"}
    code = [c for c in steps["Train"]["Arguments"]["InputDataConfig"] if c["ChannelName"] == "code"][0]
    assert inputs["code"]["S3Uri"] == code["DataSource"]["S3DataSource"]["S3Uri"]  # the same CDK asset
    entry = args["AppSpecification"]["ContainerEntrypoint"]
    assert entry[:2] == ["/bin/bash", "-c"] and "python3 /tmp/prepare-code/prepare.py" in entry[2]
    assert args["AppSpecification"]["ContainerArguments"] == [
        "--model_dir", "/opt/ml/processing/input/model", "--train_dir", "/opt/ml/processing/input/train",
        "--output_dir", "/opt/ml/processing/output/prepared", "--data_fingerprint", {"Get": "Parameters.DataFingerprint"},
        # instruction examples are packed into the run's sequences, under the data contract's thresholds
        "--data_format", "auto", "--sequence_length", {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.SequenceLength"}]}},
        "--max_truncated_fraction", "0.05", "--max_untrained_fraction", "0.0", "--max_unterminated_fraction", "0.0"]
    (output,) = args["ProcessingOutputConfig"]["Outputs"]
    assert output["OutputName"] == "prepared" and output["S3Output"]["LocalPath"] == "/opt/ml/processing/output/prepared"
    destination = output["S3Output"]["S3Uri"]["Std:Join"]
    assert destination["Values"][0].endswith("/prepared") and destination["Values"][1] == {
        "Get": "Execution.PipelineExecutionId"}


def test_the_pipeline_role_creates_preparation_jobs_only_inside_the_guardrails(default_app):
    policies = default_app.resources("security", "AWS::IAM::ManagedPolicy")
    statements = [s for p in policies.values() for s in p["Properties"]["PolicyDocument"]["Statement"]]
    (create,) = [s for s in statements if s.get("Sid") == "CreatePreparationJobsInsideGuardrails"]
    assert create["Action"] == "sagemaker:CreateProcessingJob"
    conditions = create["Condition"]
    assert conditions["ForAllValues:StringEquals"]["sagemaker:InstanceTypes"] == ["ml.m5.2xlarge"]
    assert conditions["Bool"] == {"sagemaker:NetworkIsolation": "true",
                                  "sagemaker:InterContainerTrafficEncryption": "true"}
    assert conditions["NumericLessThanEquals"] == {"sagemaker:MaxRuntimeInSeconds": 21600}
    assert set(conditions["ArnEquals"]) == {"sagemaker:OutputKmsKeyArn", "sagemaker:VolumeKmsKeyArn"}
    assert "processing-job/pipelines-*" in json.dumps(create["Resource"])
    (write,) = [s for s in statements if s.get("Sid") == "WriteOutputs"]
    assert any("/prepared/*" in json.dumps(r) for r in write["Resource"])


def test_without_preparation_the_training_reads_the_channel_as_given(tmp_path_factory):
    app = synth(tmp_path_factory.getbasetemp(), prepare_data="false")
    body = pipeline_body(app)
    assert [s["Name"] for s in body["Steps"]] == ["ResolveRun", "Train", "Evaluate", "CheckEvaluation"]
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in training_step(app)["Arguments"]["InputDataConfig"]}
    assert channels["train"] == {"Get": "Parameters.TrainingDataUri"}
    evaluation = {i["InputName"]: i["S3Input"]["S3Uri"] for i in body["Steps"][2]["Arguments"]["ProcessingInputs"]}
    assert evaluation["data"] == {"Get": "Parameters.TrainingDataUri"}  # evaluated as the trainer read it
    statements = [s for p in app.resources("security", "AWS::IAM::ManagedPolicy").values()
                  for s in p["Properties"]["PolicyDocument"]["Statement"]]
    creating = [s.get("Sid") for s in statements if "CreateProcessingJob" in json.dumps(s)]
    assert creating == ["CreateEvaluationJobsInsideGuardrails"]  # no preparation job may be created


@pytest.mark.parametrize("prepare_data", [True, False])
def test_a_validation_channel_is_prepared_like_train_and_read_as_validation_dir(prepare_data):
    """validation_data adds the ValidationDataUri parameter; with preparation it is a processing input whose
    shards the training step's `validation` channel reads (the toolkit's SM_CHANNEL_VALIDATION is the trainer's
    validation_dir), without it the channel reads the parameter as given. The definition rules still pass."""
    config = TrainingConfig(region="us-east-1", validation_data=True, prepare_data=prepare_data)
    definition = sdk.generate(config, metric_definitions=load_metric_definitions(ROOT / "trainer"),
                              placeholders=sdk.Placeholders.for_counts(2, 1))
    parameters = {p["Name"]: p.get("DefaultValue") for p in definition["Parameters"]}
    assert parameters["ValidationDataUri"].endswith("/data/validation/")
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in sdk.training_step(definition)["Arguments"]["InputDataConfig"]}
    steps = {s["Name"]: s for s in all_steps(definition)}
    if prepare_data:
        args = steps["PrepareData"]["Arguments"]
        inputs = {i["InputName"]: i["S3Input"] for i in args["ProcessingInputs"]}
        assert inputs["validation"]["S3Uri"] == {"Get": "Parameters.ValidationDataUri"}
        assert inputs["validation"]["LocalPath"] == "/opt/ml/processing/input/validation"
        arguments = args["AppSpecification"]["ContainerArguments"]
        assert arguments[arguments.index("--validation_dir") + 1] == "/opt/ml/processing/input/validation"
        output = "Steps.PrepareData.ProcessingOutputConfig.Outputs['prepared'].S3Output.S3Uri"
        assert channels["validation"] == {"Std:Join": {"On": "/", "Values": [{"Get": output}, "validation", ""]}}
        assert channels["train"] == {"Std:Join": {"On": "/", "Values": [{"Get": output}, "train", ""]}}
    else:
        assert "PrepareData" not in steps
        assert channels["validation"] == {"Get": "Parameters.ValidationDataUri"}
    expect = Expectations(use_spot=True, network_isolation=True, inter_container_encryption=True,
                          volume_encryption=False)
    assert check(definition, expect) == []


def test_without_validation_data_there_is_no_validation_channel(steps):
    channels = {c["ChannelName"] for c in steps["Train"]["Arguments"]["InputDataConfig"]}
    assert "validation" not in channels
    assert "--validation_dir" not in steps["PrepareData"]["Arguments"]["AppSpecification"]["ContainerArguments"]
