"""start / watch / report / size against moto (pipelines, S3) and botocore stubs (steps, training jobs)."""

from __future__ import annotations

import datetime
import io
import json

import boto3
import botocore.session
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from spot_training import cli
from spot_training.config import sizing
from spot_training.operations.runs import OperationError, report, report_text, start, timeline_chart, watch

REGION = "us-east-1"
PIPELINE_ARN = "arn:aws:sagemaker:us-east-1:123456789012:pipeline/distributed-training"
EXECUTION = f"{PIPELINE_ARN}/execution/abc123"
JOB = "pipelines-abc123-Train-XYZ"
T0 = datetime.datetime(2026, 11, 20, 8, 0, tzinfo=datetime.timezone.utc)


def hours(h: float) -> datetime.datetime:
    return T0 + datetime.timedelta(hours=h)


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield


@pytest.fixture
def pipeline(aws):
    """A pipeline in moto with the parameters of the real definition."""
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    definition = {"Version": "2020-12-01", "Parameters": [{"Name": "InstanceCount", "Type": "Integer", "DefaultValue": 2},
                                                          {"Name": "MaxSteps", "Type": "Integer", "DefaultValue": 1000}],
                  "Steps": []}
    sagemaker.create_pipeline(PipelineName="distributed-training", PipelineDefinition=json.dumps(definition),
                              RoleArn="arn:aws:iam::123456789012:role/pipeline-role")
    return sagemaker


def stubbed_sagemaker():
    return botocore.session.get_session().create_client("sagemaker", region_name=REGION, aws_access_key_id="x",
                                                        aws_secret_access_key="x")


def execution(status: str, **extra) -> dict:
    return {"PipelineExecutionArn": EXECUTION, "PipelineExecutionStatus": status, "CreationTime": T0, **extra}


def steps(status: str, failure: str | None = None, attempts: int = 1) -> dict:
    step = {"StepName": "Train", "StepStatus": status, "AttemptCount": attempts,
            "Metadata": {"TrainingJob": {"Arn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{JOB}"}}}
    if failure:
        step["FailureReason"] = failure
    return {"PipelineExecutionSteps": [step]}


TRANSITIONS = [
    {"Status": "Starting", "StartTime": hours(0), "EndTime": hours(0.1), "StatusMessage": "Preparing the instances"},
    {"Status": "Downloading", "StartTime": hours(0.1), "EndTime": hours(0.2), "StatusMessage": "Downloading input data"},
    {"Status": "Training", "StartTime": hours(0.2), "EndTime": hours(2.0), "StatusMessage": "Training image download completed"},
    {"Status": "Interrupted", "StartTime": hours(2.0), "EndTime": hours(2.5), "StatusMessage": "Spot capacity reclaimed"},
    {"Status": "Training", "StartTime": hours(2.5), "EndTime": hours(6.5), "StatusMessage": "Resumed from checkpoint"},
]


def training_job(status: str, transitions: list, failure: str | None = None) -> dict:
    job = {"TrainingJobName": JOB, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{JOB}",
           "TrainingJobStatus": status, "SecondaryStatus": transitions[-1]["Status"],
           "SecondaryStatusTransitions": transitions, "AlgorithmSpecification": {"TrainingInputMode": "File"},
           "ResourceConfig": {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 2, "VolumeSizeInGB": 500},
           "StoppingCondition": {"MaxRuntimeInSeconds": 43200, "MaxWaitTimeInSeconds": 86400},
           "CreationTime": T0, "ModelArtifacts": {"S3ModelArtifacts": "s3://b/outputs/job/output/model/"},
           "EnableManagedSpotTraining": True, "TrainingTimeInSeconds": 6 * 3600, "BillableTimeInSeconds": 2 * 3600,
           "CheckpointConfig": {"S3Uri": "s3://artifacts/checkpoints/abc123/", "LocalPath": "/opt/ml/checkpoints"}}
    if failure:
        job["FailureReason"] = failure
    return job


def queue_snapshot(stub: Stubber, ex: dict, st: dict, job: dict) -> None:
    stub.add_response("describe_pipeline_execution", ex, {"PipelineExecutionArn": EXECUTION})
    stub.add_response("list_pipeline_execution_steps", st, {"PipelineExecutionArn": EXECUTION, "SortOrder": "Ascending"})
    stub.add_response("describe_training_job", job, {"TrainingJobName": JOB})


# ---- start ------------------------------------------------------------------------------------------
def test_start_runs_the_pipeline_with_parameter_overrides_and_returns_the_arn(pipeline):
    arn = start(pipeline, "distributed-training", parameters={"InstanceCount": "4"})
    assert arn.startswith(PIPELINE_ARN + "/execution/")
    (summary,) = pipeline.list_pipeline_executions(PipelineName="distributed-training")["PipelineExecutionSummaries"]
    assert summary["PipelineExecutionArn"] == arn


def test_start_refuses_an_unknown_parameter_naming_the_allowed_ones(pipeline):
    with pytest.raises(OperationError, match="--parameter InstanceCnt: not a parameter of distributed-training; "
                                             "allowed: InstanceCount, MaxSteps"):
        start(pipeline, "distributed-training", parameters={"InstanceCnt": "4"})


def test_start_reads_the_pipeline_name_from_the_outputs_file(pipeline, tmp_path, monkeypatch, capsys):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"DistributedTrainingPipeline": {"PipelineName": "distributed-training"},
                                   "DistributedTrainingSecurity": {"ArtifactBucketName": "b"}}))
    monkeypatch.setattr(cli, "aws_client", lambda service, region: pipeline)
    assert cli.main(["start", "--outputs", str(outputs), "--region", REGION, "--parameter", "MaxSteps=10"]) == 0
    assert capsys.readouterr().out.strip().startswith(PIPELINE_ARN + "/execution/")


@pytest.fixture
def prepared_pipeline(aws):
    """A pipeline with the preparation step's parameters (TrainingDataUri, DataFingerprint) and data in S3."""
    sagemaker, s3 = boto3.client("sagemaker", region_name=REGION), boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="artifacts")
    for part in ("part-000", "part-001"):
        s3.put_object(Bucket="artifacts", Key=f"data/train/{part}.jsonl", Body=b'{"text": "a"}\n')
    definition = {"Version": "2020-12-01", "Steps": [], "Parameters": [
        {"Name": "TrainingDataUri", "Type": "String", "DefaultValue": "s3://artifacts/data/train/"},
        {"Name": "DataFingerprint", "Type": "String", "DefaultValue": "unlisted"}]}
    sagemaker.create_pipeline(PipelineName="distributed-training", PipelineDefinition=json.dumps(definition),
                              RoleArn="arn:aws:iam::123456789012:role/pipeline-role")
    started = []
    original = sagemaker.start_pipeline_execution
    sagemaker.start_pipeline_execution = lambda **request: started.append(request) or original(**request)
    return sagemaker, s3, started


def _fingerprint_of(request):
    return {p["Name"]: p["Value"] for p in request.get("PipelineParameters", [])}.get("DataFingerprint")


def test_start_passes_a_fingerprint_of_the_data_that_changes_when_an_object_does(prepared_pipeline):
    """The preparation step's cache keys on its arguments, DataFingerprint among them: the same objects give the
    same fingerprint (the cached shards are reused), a rewritten object under the same prefix a new one."""
    sagemaker, s3, started = prepared_pipeline
    for _ in range(2):
        start(sagemaker, "distributed-training", parameters={}, s3=s3)
    s3.put_object(Bucket="artifacts", Key="data/train/part-001.jsonl", Body=b'{"text": "b"}\n')
    start(sagemaker, "distributed-training", parameters={}, s3=s3)
    first, again, changed = (_fingerprint_of(r) for r in started)
    assert first == again and len(first) == 32 and changed != first
    start(sagemaker, "distributed-training", parameters={"TrainingDataUri": "s3://artifacts/data/train/part-000"},
          s3=s3)
    assert _fingerprint_of(started[-1]) not in (first, changed)  # the overridden URI is the one listed
    start(sagemaker, "distributed-training", parameters={"DataFingerprint": "v7"}, s3=s3)
    assert _fingerprint_of(started[-1]) == "v7"  # the caller's own data version wins


def test_start_refuses_a_data_prefix_without_objects_before_any_job_starts(prepared_pipeline):
    sagemaker, s3, started = prepared_pipeline
    with pytest.raises(OperationError, match=r"^TrainingDataUri=s3://artifacts/data/other/: no objects there; upload "
                                             r"the data first"):
        start(sagemaker, "distributed-training", parameters={"TrainingDataUri": "s3://artifacts/data/other/"}, s3=s3)
    assert started == []


def test_start_without_list_rights_warns_and_starts_on_the_uri_alone(prepared_pipeline):
    sagemaker, _, started = prepared_pipeline
    denied = boto3.client("s3", region_name=REGION)
    warnings = []
    with Stubber(denied) as stub:
        stub.add_client_error("list_objects_v2", "AccessDenied", "Access Denied",
                              expected_params={"Bucket": "artifacts", "Prefix": "data/train/"})
        start(sagemaker, "distributed-training", parameters={}, s3=denied, warn=warnings.append)
    (warning,) = warnings
    assert warning.startswith("warning: TrainingDataUri=s3://artifacts/data/train/: cannot list it (AccessDenied); ")
    assert "--parameter DataFingerprint=" in warning
    assert _fingerprint_of(started[0]) is None  # the definition's default ("unlisted") applies


def test_start_without_outputs_file_says_how_to_get_one(capsys, tmp_path):
    assert cli.main(["start", "--outputs", str(tmp_path / "missing.json"), "--region", REGION]) == 2
    assert "no such file; deploy with `make deploy` or pass --pipeline-name" in capsys.readouterr().err


def test_resume_from_retries_the_failed_execution_so_it_keeps_its_checkpoint_prefix():
    sagemaker = stubbed_sagemaker()
    with Stubber(sagemaker) as stub:
        stub.add_response("describe_pipeline_execution", execution("Failed"), {"PipelineExecutionArn": EXECUTION})
        stub.add_response("retry_pipeline_execution", {"PipelineExecutionArn": EXECUTION},
                          {"PipelineExecutionArn": EXECUTION, "ClientRequestToken": ANY})
        assert start(sagemaker, "distributed-training", parameters={}, resume_from=EXECUTION) == EXECUTION


def test_resume_from_a_running_execution_is_refused():
    sagemaker = stubbed_sagemaker()
    with Stubber(sagemaker) as stub:
        stub.add_response("describe_pipeline_execution", execution("Executing"), {"PipelineExecutionArn": EXECUTION})
        with pytest.raises(OperationError, match="execution is Executing; only Failed or Stopped"):
            start(sagemaker, "distributed-training", parameters={}, resume_from=EXECUTION)


# ---- watch ------------------------------------------------------------------------------------------
def test_watch_follows_transitions_and_exits_1_with_the_real_reason():
    sagemaker = stubbed_sagemaker()
    out = io.StringIO()
    with Stubber(sagemaker) as stub:
        queue_snapshot(stub, execution("Executing"), steps("Executing"), training_job("InProgress", TRANSITIONS[:3]))
        queue_snapshot(stub, execution("Executing"), steps("Executing"), training_job("InProgress", TRANSITIONS[:4]))
        queue_snapshot(stub, execution("Failed", FailureReason="Step failure: One or multiple steps failed."),
                       steps("Failed", "ClientError: ResourceLimitExceeded for ml.p4d.24xlarge spot", attempts=3),
                       training_job("Failed", TRANSITIONS[:4], "ResourceLimitExceeded: account quota is 0 instances"))
        code = watch(sagemaker, EXECUTION, out=out, interval=0, sleep=lambda s: None, now=lambda: hours(2.6))
    text = out.getvalue()
    assert code == 1
    assert "training job Downloading: Downloading input data" in text
    assert "training job Interrupted: Spot capacity reclaimed <- spot interruption" in text
    assert "step Train: Failed (attempt 3)" in text
    assert "FAILED: step Train: ClientError: ResourceLimitExceeded for ml.p4d.24xlarge spot" in text
    assert "FAILED: training job pipelines-abc123-Train-XYZ: ResourceLimitExceeded: account quota is 0 instances" in text
    assert "One or multiple steps failed" not in text, "the execution's generic reason is not the real one"
    assert "elapsed 2h36m00s" in text and "billable 2h00m00s" in text


def test_watch_shows_why_the_preparation_step_stopped_the_run():
    """Bad data stops the preparation step: its one line (prepare.py writes it to /opt/ml/output/message, which
    DescribeProcessingJob returns as ExitMessage) is what watch prints; no training job ever started."""
    sagemaker = stubbed_sagemaker()
    out = io.StringIO()
    name = "pipelines-abc123-PrepareData-XYZ"
    failed = {"PipelineExecutionSteps": [{
        "StepName": "PrepareData", "StepStatus": "Failed", "AttemptCount": 1,
        "FailureReason": "ClientError: AlgorithmError: See job logs for more information",
        "Metadata": {"ProcessingJob": {"Arn": f"arn:aws:sagemaker:us-east-1:123456789012:processing-job/{name}"}}}]}
    processing = {"ProcessingJobName": name, "ProcessingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:"
                  f"processing-job/{name}", "ProcessingJobStatus": "Failed", "CreationTime": T0,
                  "ExitMessage": "error: train/part-000.jsonl:2: invalid UTF-8 at byte column 14",
                  "FailureReason": "AlgorithmError: See job logs for more information",
                  "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.2xlarge",
                                                            "VolumeSizeInGB": 500}},
                  "AppSpecification": {"ImageUri": "image"}, "RoleArn": "arn:aws:iam::123456789012:role/r"}
    with Stubber(sagemaker) as stub:
        stub.add_response("describe_pipeline_execution", execution("Failed"), {"PipelineExecutionArn": EXECUTION})
        stub.add_response("list_pipeline_execution_steps", failed,
                          {"PipelineExecutionArn": EXECUTION, "SortOrder": "Ascending"})
        stub.add_response("describe_processing_job", processing, {"ProcessingJobName": name})
        code = watch(sagemaker, EXECUTION, out=out, interval=0, sleep=lambda s: None, now=lambda: hours(0.2))
    text = out.getvalue()
    assert code == 1
    assert f"FAILED: processing job {name}: error: train/part-000.jsonl:2: invalid UTF-8 at byte column 14" in text


def test_watch_exits_0_when_the_run_succeeds():
    sagemaker = stubbed_sagemaker()
    out = io.StringIO()
    with Stubber(sagemaker) as stub:
        queue_snapshot(stub, execution("Succeeded"), steps("Succeeded"), training_job("Completed", TRANSITIONS))
        assert watch(sagemaker, EXECUTION, out=out, interval=0, sleep=lambda s: None, now=lambda: hours(7)) == 0
    assert "succeeded" in out.getvalue()


def test_watch_says_when_the_preparation_step_reused_an_earlier_executions_shards():
    sagemaker = stubbed_sagemaker()
    out = io.StringIO()
    cached = {"StepName": "PrepareData", "StepStatus": "Succeeded", "AttemptCount": 1,
              "CacheHitResult": {"SourcePipelineExecutionArn": f"{PIPELINE_ARN}/execution/earlier42"}}
    with Stubber(sagemaker) as stub:
        run = steps("Succeeded")
        queue_snapshot(stub, execution("Succeeded"), {"PipelineExecutionSteps": [cached, *run["PipelineExecutionSteps"]]},
                       training_job("Completed", TRANSITIONS))
        assert watch(sagemaker, EXECUTION, out=out, interval=0, sleep=lambda s: None, now=lambda: hours(7)) == 0
    text = out.getvalue()
    assert "step PrepareData: Succeeded (step cache: reuses the output of execution earlier42)" in text
    assert "step Train: Succeeded\n" in text


# ---- report -----------------------------------------------------------------------------------------
@pytest.fixture
def finished_run(aws):
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="artifacts")
    for step, complete in ((100, True), (200, True), (300, False)):
        s3.put_object(Bucket="artifacts", Key=f"checkpoints/abc123/step-{step}/__0_0.distcp", Body=b"x")
        if complete:
            s3.put_object(Bucket="artifacts", Key=f"checkpoints/abc123/step-{step}/COMPLETE.json", Body=b"{}")
    sagemaker = stubbed_sagemaker()
    stub = Stubber(sagemaker)
    queue_snapshot(stub, execution("Succeeded"), steps("Succeeded"), training_job("Completed", TRANSITIONS))
    stub.activate()
    return sagemaker, s3


def test_report_gives_times_savings_interruptions_checkpoints_and_cost(finished_run):
    sagemaker, s3 = finished_run
    result = report(sagemaker, s3, EXECUTION, prices={"ml.p4d.24xlarge": 37.688})
    assert (result["training_seconds"], result["billable_seconds"]) == (21600, 7200)
    assert result["spot_savings_percent"] == pytest.approx(66.7)
    assert result["interruptions"] == 1
    assert result["checkpoints"] == ["step-100", "step-200"]
    assert result["estimated_cost"] == pytest.approx(2 * 2 * 37.688, abs=0.01)
    assert result["on_demand_equivalent_cost"] == pytest.approx(2 * 6 * 37.688, abs=0.01)
    text = report_text(result)
    assert "spot savings 66.7%" in text and "interruptions: 1" in text and "$150.75" in text


def test_report_draws_a_timeline_chart(finished_run, tmp_path):
    sagemaker, s3 = finished_run
    chart = tmp_path / "timeline.png"
    timeline_chart(report(sagemaker, s3, EXECUTION, price_per_hour=10.0), chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000


# ---- size -------------------------------------------------------------------------------------------
def test_size_reproduces_the_seeds_worked_example(capsys):
    assert cli.main(["size", "--instance-count", "2", "--run-hours", "6", "--runs-per-month", "4",
                     "--slo-hours", "24", "--price-per-hour", "10"]) == 0
    text = capsys.readouterr().out
    assert "instance-hours per run:   12" in text
    assert "instance-hours per month: 48" in text
    assert "retries before an SLO breach (24 h SLO): 3" in text
    assert "cost per run:   on-demand $120.00, spot-effective $42.00 (35% of on-demand)" in text


def test_young_daly_interval_and_the_lost_work_cap():
    w = sizing.Workload(instance_count=2, interruptions_per_instance_hour=0.05, checkpoint_save_seconds=30)
    # MTBF = 1 / (2 x 0.05) h = 600 min; sqrt(2 x 0.5 min x 600 min) = 24.49 min, capped at 10.
    assert sizing.young_daly_interval_minutes(w) == pytest.approx(24.4949, abs=1e-3)
    assert sizing.recommended_interval_minutes(w) == 10
    frequent = sizing.Workload(instance_count=8, interruptions_per_instance_hour=0.5, checkpoint_save_seconds=6)
    assert sizing.recommended_interval_minutes(frequent) == pytest.approx((2 * 0.1 * 15) ** 0.5)


def test_monte_carlo_completion_grows_with_interruptions_and_is_deterministic():
    calm = sizing.simulate(sizing.Workload(interruptions_per_instance_hour=0.0))
    stormy = sizing.simulate(sizing.Workload(interruptions_per_instance_hour=0.5))
    assert calm.p50_hours == pytest.approx(6 + 36 * 30 / 3600)  # 36 saves of 30 s, no interruption
    assert calm.probability_within_slo == 1.0 and calm.mean_interruptions == 0
    assert stormy.p90_hours > calm.p90_hours and stormy.mean_interruptions > 3
    assert sizing.simulate(sizing.Workload(interruptions_per_instance_hour=0.5)) == stormy


def test_size_refuses_a_bad_value_naming_its_flag(capsys):
    assert cli.main(["size", "--run-hours", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --run-hours=0.0: must be above 0"


def test_aws_errors_are_one_line_not_a_traceback(aws, monkeypatch, capsys):
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    monkeypatch.setattr(cli, "aws_client", lambda service, region: sagemaker)
    assert cli.main(["start", "--pipeline-name", "no-such-pipeline", "--region", REGION]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: AWS DescribePipeline: ")


def test_size_prints_the_platforms_fixed_monthly_cost(capsys):
    assert cli.main(["size", "--price-per-hour", "10"]) == 0
    text = capsys.readouterr().out
    assert "platform fixed cost per month (whether or not it trains): $33.80" in text
    assert "  2 interface endpoints x 2 AZs: $29.20" in text and "  4 KMS keys: $4.00" in text
    assert "plus VPC flow log ingestion at $0.50 per GB" in text


def test_the_fixed_cost_model_counts_what_the_templates_create(default_app):
    from spot_training.config.endpoints import interface_endpoints

    def count(resource_type):
        return sum(len(default_app.resources(stack, resource_type)) for stack in default_app.templates)

    endpoints = [e for e in default_app.resources("networking", "AWS::EC2::VPCEndpoint").values()
                 if e["Properties"].get("VpcEndpointType") == "Interface"]
    assert len(endpoints) == len(interface_endpoints(False))
    assert count("AWS::KMS::Key") == 3 + 1
    assert count("AWS::CloudWatch::Alarm") == sizing.ALARMS_PER_PIPELINE


# ---- evaluation, gate and registry ----------------------------------------------------------------
EVALUATION_JOB = "pipelines-abc123-Evaluate-XYZ"
REPORT = {"metrics": {"base": {"loss": 2.5, "perplexity": 12.18}, "fine_tuned": {"loss": 2.1, "perplexity": 8.17}},
          "improvement": 0.4, "sequences": 512, "tokens": 1048576, "sequence_length": 2048,
          "data": {"source": "the validation channel", "fingerprint": "f00d"}}
PACKAGE = "arn:aws:sagemaker:us-east-1:123456789012:model-package/distributed-training-models/3"


def after_training_steps(outcome: str) -> list[dict]:
    """The steps ListPipelineExecutionSteps returns once the gate decided (newest last, Ascending)."""
    train = steps("Succeeded")["PipelineExecutionSteps"]
    evaluate = {"StepName": "Evaluate", "StepStatus": "Succeeded", "AttemptCount": 1, "Metadata": {"ProcessingJob": {
        "Arn": f"arn:aws:sagemaker:us-east-1:123456789012:processing-job/{EVALUATION_JOB}"}}}
    gate = {"StepName": "CheckEvaluation", "StepStatus": "Succeeded", "AttemptCount": 1,
            "Metadata": {"Condition": {"Outcome": outcome}}}
    if outcome == "True":
        last = {"StepName": "Register-RegisterModel", "StepStatus": "Succeeded", "AttemptCount": 1,
                "Metadata": {"RegisterModel": {"Arn": PACKAGE}}}
    else:
        message = "the fine-tuned model's validation loss 2.7 is not below the base model's 2.5 by more than " \
                  "EvaluationMinImprovement=0.0; nothing was registered"
        last = {"StepName": "RefuseModelNotBetterThanBase", "StepStatus": "Failed", "AttemptCount": 1,
                "FailureReason": message, "Metadata": {"Fail": {"ErrorMessage": message}}}
    return [*train, evaluate, gate, last]


def evaluation_job() -> dict:
    return {"ProcessingJobName": EVALUATION_JOB, "ProcessingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:"
            f"processing-job/{EVALUATION_JOB}", "ProcessingJobStatus": "Completed", "CreationTime": T0,
            "ProcessingOutputConfig": {"Outputs": [{"OutputName": "evaluation", "S3Output": {
                "S3Uri": "s3://artifacts/evaluation/abc123", "LocalPath": "/opt/ml/processing/output/evaluation",
                "S3UploadMode": "EndOfJob"}}]},
            "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.g5.2xlarge",
                                                      "VolumeSizeInGB": 500}},
            "AppSpecification": {"ImageUri": "image"}, "RoleArn": "arn:aws:iam::123456789012:role/r"}


def queue_after_training(stub: Stubber, status: str, outcome: str, *, job: bool = True) -> None:
    stub.add_response("describe_pipeline_execution", execution(status), {"PipelineExecutionArn": EXECUTION})
    stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": after_training_steps(outcome)},
                      {"PipelineExecutionArn": EXECUTION, "SortOrder": "Ascending"})
    stub.add_response("describe_training_job", training_job("Completed", TRANSITIONS), {"TrainingJobName": JOB})
    stub.add_response("describe_processing_job", evaluation_job(), {"ProcessingJobName": EVALUATION_JOB})


def test_watch_shows_the_gate_and_the_registration():
    sagemaker, out = stubbed_sagemaker(), io.StringIO()
    with Stubber(sagemaker) as stub:
        queue_after_training(stub, "Succeeded", "True")
        assert watch(sagemaker, EXECUTION, out=out, interval=0, sleep=lambda s: None, now=lambda: hours(7)) == 0
    text = out.getvalue()
    assert "step CheckEvaluation: Succeeded: outcome True (the model goes on to registration)" in text
    assert f"step Register-RegisterModel: Succeeded: registered {PACKAGE} (PendingManualApproval)" in text


def test_watch_of_a_model_stopped_at_the_gate_exits_1_with_both_losses():
    sagemaker, out = stubbed_sagemaker(), io.StringIO()
    with Stubber(sagemaker) as stub:
        queue_after_training(stub, "Failed", "False")
        assert watch(sagemaker, EXECUTION, out=out, interval=0, sleep=lambda s: None, now=lambda: hours(7)) == 1
    text = out.getvalue()
    assert "step CheckEvaluation: Succeeded: outcome False (the model is not registered)" in text
    assert ("FAILED: step RefuseModelNotBetterThanBase: the fine-tuned model's validation loss 2.7 is not below the "
            "base model's 2.5 by more than EvaluationMinImprovement=0.0; nothing was registered") in text


def test_report_shows_the_evaluation_and_the_gate(aws):
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="artifacts")
    s3.put_object(Bucket="artifacts", Key="evaluation/abc123/evaluation.json", Body=json.dumps(REPORT).encode())
    sagemaker = stubbed_sagemaker()
    with Stubber(sagemaker) as stub:
        queue_after_training(stub, "Succeeded", "True")
        result = report(sagemaker, s3, EXECUTION, price_per_hour=10.0)
    assert result["evaluation"] == REPORT and result["gate"] == "True" and result["model_package"] == PACKAGE
    text = report_text(result)
    assert ("evaluation: fine-tuned loss 2.100000 (perplexity 8.170) vs base 2.500000 (perplexity 12.180), "
            "improvement 0.400000, 1,048,576 tokens (the validation channel)") in text
    assert f"gate: passed; registered {PACKAGE} (PendingManualApproval)" in text


def package(version: int, status: str, *, fingerprint: str = "f00d", job: str = "pipelines-abc-train-1") -> dict:
    return {"ModelPackageName": "distributed-training-models", "ModelPackageGroupName": "distributed-training-models",
            "ModelPackageVersion": version, "ModelPackageArn": PACKAGE.replace("/3", f"/{version}"),
            "CreationTime": hours(version), "ModelPackageStatus": "Completed", "ModelApprovalStatus": status,
            "ModelPackageStatusDetails": {"ValidationStatuses": []},
            "ModelMetrics": {"ModelQuality": {"Statistics": {"ContentType": "application/json",
                                                              "S3Uri": f"s3://artifacts/evaluation/run{version}/evaluation.json"}}},
            "InferenceSpecification": {"Containers": [{"Image": "image", "ModelDataSource": {"S3DataSource": {
                "S3Uri": f"s3://artifacts/outputs/run{version}/output/model/", "S3DataType": "S3Prefix",
                "CompressionType": "None"}}}], "SupportedContentTypes": ["application/json"],
                "SupportedResponseMIMETypes": ["application/json"]},
            "CustomerMetadataProperties": {"method": "full", "base_model": "s3://artifacts/models/base/",
                                           "data_fingerprint": fingerprint, "training_job": job}}


@pytest.fixture
def registry(aws):
    """Two packages of the group, their reports in (moto) S3; a stubbed SageMaker."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="artifacts")
    for version, loss in ((1, 2.3), (2, 2.1)):
        body = {**REPORT, "metrics": {**REPORT["metrics"], "fine_tuned": {"loss": loss, "perplexity": 9.0}},
                "improvement": 2.5 - loss}
        s3.put_object(Bucket="artifacts", Key=f"evaluation/run{version}/evaluation.json", Body=json.dumps(body).encode())
    return stubbed_sagemaker(), s3


def test_models_lists_the_groups_packages_with_their_metrics_and_lineage(registry):
    from spot_training.operations.models import list_models, models_text

    sagemaker, s3 = registry
    summaries = [{"ModelPackageArn": package(v, "PendingManualApproval")["ModelPackageArn"],
                  "ModelPackageStatus": "Completed", "CreationTime": hours(v), "ModelPackageVersion": v,
                  "ModelPackageGroupName": "distributed-training-models"} for v in (2, 1)]
    with Stubber(sagemaker) as stub:
        stub.add_response("list_model_packages", {"ModelPackageSummaryList": summaries}, {
            "ModelPackageGroupName": "distributed-training-models", "SortBy": "CreationTime", "SortOrder": "Descending",
            "MaxResults": 20})
        for version, status in ((2, "PendingManualApproval"), (1, "Approved")):
            stub.add_response("describe_model_package", package(version, status),
                              {"ModelPackageName": package(version, status)["ModelPackageArn"]})
        models = list_models(sagemaker, s3, "distributed-training-models")
    assert [(m["version"], m["status"], m["fine_tuned_loss"]) for m in models] == [
        (2, "PendingManualApproval", 2.1), (1, "Approved", 2.3)]
    assert models[0]["improvement"] == pytest.approx(0.4) and models[0]["lineage"]["method"] == "full"
    text = models_text(models, "distributed-training-models")
    assert text.splitlines()[2].split() == ["2", "PendingManualApproval", "2.1000", "2.5000", "0.4000", "full",
                                            "pipelines-abc-train-1"]


def test_models_reads_every_page_up_to_the_limit(registry):
    from spot_training.operations.models import list_models

    sagemaker, s3 = registry
    summaries = [{"ModelPackageArn": package(v, "Approved")["ModelPackageArn"], "ModelPackageStatus": "Completed",
                  "CreationTime": hours(v), "ModelPackageVersion": v,
                  "ModelPackageGroupName": "distributed-training-models"} for v in range(150, 0, -1)]
    request = {"ModelPackageGroupName": "distributed-training-models", "SortBy": "CreationTime",
               "SortOrder": "Descending"}
    with Stubber(sagemaker) as stub:
        stub.add_response("list_model_packages", {"ModelPackageSummaryList": summaries[:100], "NextToken": "p2"},
                          {**request, "MaxResults": 100})
        stub.add_response("list_model_packages", {"ModelPackageSummaryList": summaries[100:120], "NextToken": "p3"},
                          {**request, "MaxResults": 20, "NextToken": "p2"})
        for v in range(150, 30, -1):
            stub.add_response("describe_model_package", package(v, "Approved"),
                              {"ModelPackageName": package(v, "Approved")["ModelPackageArn"]})
        models = list_models(sagemaker, s3, "distributed-training-models", limit=120)
        stub.assert_no_pending_responses()
    assert [m["version"] for m in models] == list(range(150, 30, -1))


def test_models_compare_marks_what_differs_and_warns_when_the_data_differs(registry):
    from spot_training.operations.models import compare_text, describe

    sagemaker, s3 = registry
    with Stubber(sagemaker) as stub:
        for version, fingerprint in ((1, "f00d"), (2, "beef")):
            stub.add_response("describe_model_package", package(version, "Approved", fingerprint=fingerprint),
                              {"ModelPackageName": package(version, "Approved")["ModelPackageArn"]})
        a, b = (describe(sagemaker, s3, package(v, "Approved")["ModelPackageArn"]) for v in (1, 2))
    text = compare_text(a, b)
    rows = {line[2:].split("  ")[0]: (line[0], line[2:].split("  ", 1)[1].strip()) for line in text.splitlines()[2:-1]}
    assert rows["fine-tuned loss"] == ("*", "2.300000  |  2.100000")
    assert rows["method"] == (" ", "full  |  full")
    assert rows["data_fingerprint"] == ("*", "f00d  |  beef")
    assert text.splitlines()[-1] == ("lower fine-tuned validation loss: B (evaluated on different data: the "
                                     "fingerprints differ, so the losses are not comparable)")


def test_approve_and_reject_set_the_status_with_the_reason_and_refuse_a_repeat(registry, monkeypatch, capsys):
    sagemaker, _ = registry
    monkeypatch.setattr(cli, "aws_client", lambda service, region: sagemaker)
    arn = package(2, "PendingManualApproval")["ModelPackageArn"]
    with Stubber(sagemaker) as stub:
        stub.add_response("describe_model_package", package(2, "PendingManualApproval"), {"ModelPackageName": arn})
        stub.add_response("update_model_package", {"ModelPackageArn": arn}, {
            "ModelPackageArn": arn, "ModelApprovalStatus": "Approved", "ApprovalDescription": "beats v1 on eval"})
        assert cli.main(["approve", arn, "--group", "distributed-training-models", "--reason", "beats v1 on eval",
                         "--region", REGION]) == 0
        stub.add_response("describe_model_package", package(2, "Rejected"), {"ModelPackageName": arn})
        assert cli.main(["reject", arn, "--group", "distributed-training-models", "--reason", "again",
                         "--region", REGION]) == 2
        stub.assert_no_pending_responses()
    out, err = capsys.readouterr()
    assert out.strip() == f"{arn}: Approved"
    assert err.strip() == f"error: {arn}: already Rejected"


def test_a_version_number_needs_the_group_and_a_bad_package_is_refused_in_one_line(capsys, tmp_path, monkeypatch):
    from spot_training.operations.models import resolve_package

    assert resolve_package("Distributed-Training-Models", "7", "us-east-1", "123456789012") == \
        "arn:aws:sagemaker:us-east-1:123456789012:model-package/distributed-training-models/7"
    monkeypatch.chdir(tmp_path)
    assert cli.main(["models", "--region", REGION]) == 2
    assert capsys.readouterr().err.strip() == ("error: --outputs outputs.json: no such file; deploy with `make deploy` "
                                              "or pass --group")
    with pytest.raises(OperationError, match="^latest: must be a model package ARN or a version number of g$"):
        resolve_package("g", "latest", "us-east-1", "123456789012")


def test_start_passes_the_latest_approved_models_loss_when_it_was_evaluated_on_the_same_data(aws):
    """compare_with_approved: start finds the group's newest Approved package, checks that its evaluation report
    names this run's data fingerprint, base model and sequence length, and passes its fine-tuned loss as
    ApprovedModelLoss. The report decides, not the package's lineage properties (a reviewer's UpdateModelPackage
    can rewrite those): a report of other data, or of unfingerprinted data, is not compared, and start says so."""
    from spot_training.operations.runs import data_fingerprint

    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="artifacts")
    s3.put_object(Bucket="artifacts", Key="data/train/part-000.jsonl", Body=b'{"text": "a"}\n')
    fingerprint = data_fingerprint(s3, {"TrainingDataUri": "s3://artifacts/data/train/"}, warn=print)
    definition = {"Version": "2020-12-01", "Parameters": [
        {"Name": "TrainingDataUri", "Type": "String", "DefaultValue": "s3://artifacts/data/train/"},
        {"Name": "DataFingerprint", "Type": "String", "DefaultValue": "unlisted"},
        {"Name": "BaseModelUri", "Type": "String", "DefaultValue": "s3://artifacts/models/base/"},
        {"Name": "SequenceLength", "Type": "Integer", "DefaultValue": 2048},
        {"Name": "ApprovedModelLoss", "Type": "Float", "DefaultValue": 1e9}],
        "Steps": [{"Name": "CheckEvaluation", "Type": "Condition", "Arguments": {"IfSteps": [
            {"Name": "Register-RegisterModel", "Type": "RegisterModel",
             "Arguments": {"ModelPackageGroupName": "distributed-training-models"}}], "ElseSteps": []}}]}
    approved = package(2, "Approved", fingerprint=fingerprint)  # its lineage always claims this run's data
    sagemaker, warnings, sent = stubbed_sagemaker(), [], []
    sagemaker.meta.events.register("provide-client-params.sagemaker.StartPipelineExecution",
                                   lambda params, **kwargs: sent.append(
                                       {p["Name"]: p["Value"] for p in params.get("PipelineParameters", [])}))
    with Stubber(sagemaker) as stub:
        for report_fingerprint in (fingerprint, "other-data", "unlisted"):
            s3.put_object(Bucket="artifacts", Key="evaluation/run2/evaluation.json", Body=json.dumps({
                **REPORT, "metrics": {**REPORT["metrics"], "fine_tuned": {"loss": 2.05, "perplexity": 7.8}},
                "data": {"source": "the validation channel", "fingerprint": report_fingerprint},
                "base_model": "s3://artifacts/models/base/"}).encode())
            stub.add_response("describe_pipeline", {"PipelineDefinition": json.dumps(definition)},
                              {"PipelineName": "distributed-training"})
            stub.add_response("list_model_packages", {"ModelPackageSummaryList": [{
                "ModelPackageArn": approved["ModelPackageArn"], "ModelPackageStatus": "Completed",
                "CreationTime": hours(2), "ModelPackageGroupName": "distributed-training-models"}]}, {
                "ModelPackageGroupName": "distributed-training-models", "ModelApprovalStatus": "Approved",
                "SortBy": "CreationTime", "SortOrder": "Descending", "MaxResults": 1})
            described = json.loads(json.dumps(approved, default=str))
            described["CreationTime"] = hours(2)
            stub.add_response("describe_model_package", described, {"ModelPackageName": approved["ModelPackageArn"]})
            stub.add_response("start_pipeline_execution", {"PipelineExecutionArn": EXECUTION})
            start(sagemaker, "distributed-training", parameters={}, s3=s3, warn=warnings.append)
        # Without preparation there is no DataFingerprint: nothing is shown to be the same data, no registry call.
        unprepared = {**definition, "Parameters": [p for p in definition["Parameters"]
                                                   if p["Name"] != "DataFingerprint"]}
        stub.add_response("describe_pipeline", {"PipelineDefinition": json.dumps(unprepared)},
                          {"PipelineName": "distributed-training"})
        stub.add_response("start_pipeline_execution", {"PipelineExecutionArn": EXECUTION})
        start(sagemaker, "distributed-training", parameters={}, s3=s3, warn=warnings.append)
        stub.assert_no_pending_responses()
    assert sent == [{"DataFingerprint": fingerprint, "ApprovedModelLoss": "2.05"}, {"DataFingerprint": fingerprint},
                    {"DataFingerprint": fingerprint}, {}]
    not_compared = (f"note: the latest Approved model ({approved['ModelPackageArn']}) is not compared: its evaluation "
                    "report's data fingerprint differs from this run's or is missing; the gate compares with the "
                    "base model only")
    assert warnings == [not_compared, not_compared,
                        "note: this run's data has no fingerprint (DataFingerprint is absent: prepare_data is off), "
                        "so no approved model can be shown to be evaluated on the same data; the gate compares with "
                        "the base model only"]
