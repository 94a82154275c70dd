"""The capacity ladder's functions against stubbed SageMaker and SNS APIs (botocore Stubber checks every request
against the service model): the run identity, and the controller's decision after an execution ends."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys

import botocore.session
import pytest
from botocore.stub import ANY, Stubber

from spot_training.cdk.monitor import capacity_ladder
from spot_training.config import capacity, ladder
from spot_training.config.settings import TrainingConfig

TYPES = ("ml.p4d.24xlarge", "ml.p5.48xlarge")
CONFIG = TrainingConfig(region="us-east-1", instance_type=TYPES[0], allowed_instance_types=TYPES, capacity_ladder=True)
PLAN = ladder.plan_for(CONFIG)
SPOT_PIPELINE, ON_DEMAND_PIPELINE = PLAN.pipelines["spot"], PLAN.pipelines["on-demand"]
TOPIC = "arn:aws:sns:us-east-1:111122223333:alarms"
NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.timezone.utc)


def execution_arn(pipeline: str, execution: str) -> str:
    return f"arn:aws:sagemaker:us-east-1:111122223333:pipeline/{pipeline}/execution/{execution}"


def event(arn: str, status: str = "Failed") -> dict:
    return {"id": "7bf73129-1428-4cd3-a780-95db273d1602", "detail-type": "SageMaker Model Building Pipeline Execution Status Change", "source": "aws.sagemaker",
            "detail": {"pipelineExecutionArn": arn, "currentPipelineExecutionStatus": status}}


def client(service: str):
    return botocore.session.get_session().create_client(service, region_name="us-east-1", aws_access_key_id="x",
                                                        aws_secret_access_key="x")


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("LADDER", PLAN.to_json())
    monkeypatch.setenv("TRAINING_STEP", "Train")
    monkeypatch.setenv("TOPIC_ARN", TOPIC)


def parameters(arn: str, values: dict[str, str], stub: Stubber) -> None:
    stub.add_response("list_pipeline_parameters_for_execution", {"PipelineParameters": [
        {"Name": k, "Value": v} for k, v in values.items()]}, {"PipelineExecutionArn": arn})


def training_ended(arn: str, stub: Stubber, secondary: str, reason: str) -> None:
    job = "pipelines-abc-train-1a2b3c"
    stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
        {"StepName": "Evaluate", "StepStatus": "NotStarted"},
        {"StepName": "Train", "StepStatus": "Failed", "FailureReason": "ClientError: training job ended",
         "Metadata": {"TrainingJob": {"Arn": f"arn:aws:sagemaker:us-east-1:111122223333:training-job/{job}"}}}]},
        {"PipelineExecutionArn": arn, "SortOrder": "Descending"})
    stub.add_response("describe_training_job", {
        "TrainingJobName": job, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:111122223333:training-job/{job}",
        "ModelArtifacts": {"S3ModelArtifacts": "s3://b/o"}, "TrainingJobStatus": "Stopped",
        "SecondaryStatus": secondary, "FailureReason": reason,
        "AlgorithmSpecification": {"TrainingInputMode": "File"}, "ResourceConfig": {
            "InstanceType": TYPES[0], "InstanceCount": 2, "VolumeSizeInGB": 500},
        "StoppingCondition": {"MaxRuntimeInSeconds": 100}, "CreationTime": NOW}, {"TrainingJobName": job})


def running(stub: Stubber, summaries: dict[str, list[dict]]) -> None:
    for pipeline in sorted(summaries):
        stub.add_response("list_pipeline_executions", {"PipelineExecutionSummaries": [
            {"StartTime": NOW, **summary} for summary in summaries[pipeline]]},
            {"PipelineName": pipeline, "CreatedAfter": ANY, "SortBy": "CreationTime", "SortOrder": "Ascending"})


def test_a_run_whose_spot_rung_ran_out_of_wait_climbs_to_the_next_rung_with_its_run_id(env):
    sagemaker, sns = client("sagemaker"), client("sns")
    ended = execution_arn(SPOT_PIPELINE, "abc123def456")
    carried = {"InstanceType": TYPES[0], "InstanceCount": "2", "MaxSteps": "1000", "DataFingerprint": "sha256:9f",
               "RunId": "", "RunStartedAt": ""}
    with Stubber(sagemaker) as sm, Stubber(sns) as notify:
        parameters(ended, carried, sm)
        sm.add_response("describe_pipeline_execution", {"CreationTime": NOW - datetime.timedelta(hours=8)},
                        {"PipelineExecutionArn": ended})
        training_ended(ended, sm, "MaxWaitTimeExceeded", "Training job exceeded MaxWaitTimeInSeconds")
        running(sm, {SPOT_PIPELINE: [{"PipelineExecutionArn": ended, "PipelineExecutionStatus": "Failed"}],
                     ON_DEMAND_PIPELINE: []})
        started_at = (NOW - datetime.timedelta(hours=8)).isoformat()
        sm.add_response("start_pipeline_execution", {"PipelineExecutionArn": execution_arn(SPOT_PIPELINE, "next")}, {
            "PipelineName": SPOT_PIPELINE, "PipelineExecutionDisplayName": "abc123def456-rung-2",
            "PipelineExecutionDescription": ANY, "ClientRequestToken": hashlib.sha256(f"{ended}:{event(ended)['id']}".encode()).hexdigest(),
            "PipelineParameters": sorted([{"Name": k, "Value": v} for k, v in {
                **carried, "RunId": "abc123def456", "RunStartedAt": started_at, "InstanceType": TYPES[1]}.items()],
                key=lambda p: p["Name"])})
        notify.add_response("publish", {"MessageId": "m1"}, {
            "TopicArn": TOPIC, "Subject": "Capacity ladder: run abc123def456 climbed to spot:ml.p5.48xlarge",
            "Message": ANY})
        result = capacity_ladder.on_execution_end(event(ended, "Stopped"), sagemaker=sagemaker, sns=sns, now=NOW)
    assert (result["action"], result["rung"], result["run"]) == ("climb", "spot:ml.p4d.24xlarge", "abc123def456")
    # The next spot rung may run to its MaxWait and on demand must still fit after it: 8.8 h + 6.5 h of the 16 h.
    assert result["reason"] == ("MaxWaitTimeExceeded on spot:ml.p4d.24xlarge after 8.0 h; spot:ml.p5.48xlarge needs up "
                                "to 15.2 h of the 16.0 h left before the 24 h deadline")
    assert result["started"].endswith("/execution/next")


def test_an_event_delivered_twice_starts_one_execution_through_the_same_request_token(env):
    """EventBridge delivers at least once: both deliveries send the token derived from the ended execution, which
    StartPipelineExecution answers with the same execution."""
    ended = execution_arn(SPOT_PIPELINE, "abc123def456")
    tokens = []
    for _ in range(2):
        sagemaker = client("sagemaker")
        with Stubber(sagemaker) as sm:
            parameters(ended, {"InstanceType": TYPES[1], "RunId": "nightly-7",
                               "RunStartedAt": (NOW - datetime.timedelta(hours=12)).isoformat()}, sm)
            training_ended(ended, sm, "Starting", "CapacityError: Unable to provision requested ML compute capacity")
            running(sm, {SPOT_PIPELINE: [], ON_DEMAND_PIPELINE: []})
            sm.add_response("start_pipeline_execution", {"PipelineExecutionArn": execution_arn(ON_DEMAND_PIPELINE, "x")},
                            {"PipelineName": ON_DEMAND_PIPELINE, "PipelineExecutionDisplayName": "nightly-7-rung-3",
                             "PipelineExecutionDescription": ANY, "ClientRequestToken": ANY, "PipelineParameters": ANY})
            sagemaker.meta.events.register("provide-client-params.sagemaker.StartPipelineExecution",
                                           lambda params, **_: tokens.append(params["ClientRequestToken"]))
            result = capacity_ladder.on_execution_end(event(ended), sagemaker=sagemaker, sns=_quiet_sns(), now=NOW)
        assert result["action"] == "climb" and result["rung"] == "spot:ml.p5.48xlarge"
    assert tokens[0] == tokens[1] and len(tokens[0]) == 64


def _quiet_sns():
    sns = client("sns")
    stub = Stubber(sns)
    stub.add_response("publish", {"MessageId": "m"}, {"TopicArn": TOPIC, "Subject": ANY, "Message": ANY})
    stub.activate()
    return sns


def test_it_never_starts_a_second_execution_of_a_run_that_has_one_running(env):
    sagemaker, sns = client("sagemaker"), client("sns")
    ended = execution_arn(SPOT_PIPELINE, "abc123def456")
    other = execution_arn(ON_DEMAND_PIPELINE, "zzz999")
    with Stubber(sagemaker) as sm, Stubber(sns) as notify:
        parameters(ended, {"InstanceType": TYPES[0], "RunId": "nightly-7",
                           "RunStartedAt": (NOW - datetime.timedelta(hours=2)).isoformat()}, sm)
        training_ended(ended, sm, "Starting", "CapacityError: none")
        running(sm, {SPOT_PIPELINE: [], ON_DEMAND_PIPELINE: [{"PipelineExecutionArn": other,
                                                             "PipelineExecutionStatus": "Executing"}]})
        parameters(other, {"RunId": "nightly-7"}, sm)  # started by hand (spot-training start --resume-run)
        notify.add_response("publish", {"MessageId": "m1"}, {"TopicArn": TOPIC, "Subject": ANY, "Message": ANY})
        result = capacity_ladder.on_execution_end(event(ended), sagemaker=sagemaker, sns=sns, now=NOW)
    assert (result["action"], result["reason"]) == ("stop", "1 execution(s) of this run are still running: no "
                                                            "second one")


def test_a_failure_that_is_not_capacity_is_left_to_the_alarms(env):
    sagemaker, sns = client("sagemaker"), client("sns")
    ended = execution_arn(SPOT_PIPELINE, "abc123def456")
    with Stubber(sagemaker) as sm, Stubber(sns):
        parameters(ended, {"InstanceType": TYPES[0]}, sm)
        sm.add_response("describe_pipeline_execution", {"CreationTime": NOW}, {"PipelineExecutionArn": ended})
        training_ended(ended, sm, "Failed", "AlgorithmError: CUDA out of memory")
        result = capacity_ladder.on_execution_end(event(ended), sagemaker=sagemaker, sns=sns, now=NOW)
    assert result["action"] == "ignore"  # no listing, no start, no message (the Failed/Stopped rule alarms)


@pytest.mark.parametrize("case", ["top rung", "deadline"])
def test_it_stops_at_the_top_rung_and_when_the_deadline_leaves_no_rung_and_says_so(env, case):
    sagemaker, sns = client("sagemaker"), client("sns")
    pipeline = ON_DEMAND_PIPELINE if case == "top rung" else SPOT_PIPELINE
    ended = execution_arn(pipeline, "abc123def456")
    hours = 1 if case == "top rung" else 20
    messages = []
    with Stubber(sagemaker) as sm, Stubber(sns) as notify:
        parameters(ended, {"InstanceType": TYPES[0], "RunId": "nightly-7",
                           "RunStartedAt": (NOW - datetime.timedelta(hours=hours)).isoformat()}, sm)
        training_ended(ended, sm, "Starting", "ResourceLimitExceeded: account quota for ml.p4d.24xlarge")
        running(sm, {SPOT_PIPELINE: [], ON_DEMAND_PIPELINE: []})
        notify.add_response("publish", {"MessageId": "m1"}, {"TopicArn": TOPIC, "Subject": ANY, "Message": ANY})
        sns.meta.events.register("provide-client-params.sns.Publish", lambda params, **_: messages.append(params))
        result = capacity_ladder.on_execution_end(event(ended), sagemaker=sagemaker, sns=sns, now=NOW)
    assert result["action"] == "stop" and "started" not in result
    expected = ("ResourceLimitExceeded on on-demand:ml.p4d.24xlarge, the ladder's top rung: nothing to climb to"
                if case == "top rung" else "ResourceLimitExceeded on spot:ml.p4d.24xlarge: 4.0 h left before the 24 h "
                "deadline, too little for any rung above; the run stops here")
    assert result["reason"] == expected
    assert messages[0]["Subject"] == "Capacity ladder: run nightly-7 stopped"
    assert f"Decision: stop: {expected}." in messages[0]["Message"]


def test_the_run_is_the_given_run_id_or_else_the_execution_and_a_bad_one_fails_the_step_in_one_line():
    assert capacity_ladder.resolve_run_handler({"run_id": "", "execution_id": "abc123"}) == {"RunId": "abc123"}
    assert capacity_ladder.resolve_run_handler({"run_id": "nightly-7", "execution_id": "x"}) == {"RunId": "nightly-7"}
    with pytest.raises(capacity.RunIdError, match=r"^RunId='a/b': must be 1 to 64 letters, digits and hyphens"):
        capacity_ladder.resolve_run_handler({"run_id": "a/b", "execution_id": "x"})


def test_the_bundled_functions_run_on_the_standard_library_alone(tmp_path):
    """The asset holds the handlers and config.capacity only: they import in an interpreter without site-packages
    (as much as the Lambda runtime gives: boto3 comes from the runtime and is imported only by the controller)."""
    from spot_training.cdk.ladder import ladder_code

    folder = ladder_code().path
    script = ("import json, capacity_ladder; print(json.dumps(capacity_ladder.resolve_run_handler("
              "{'run_id': '', 'execution_id': 'e1'})))")
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"RunId": "e1"}


# ---- by hand: spot-training start --resume-run RUN --capacity ... ------------------------------------------------
def _executions(stub: Stubber, pipeline: str, summaries: list[tuple[str, str, datetime.datetime, dict]] | Exception):
    if isinstance(summaries, Exception):
        stub.add_client_error("list_pipeline_executions", "ResourceNotFound", "Pipeline not found")
        return
    stub.add_response("list_pipeline_executions", {"PipelineExecutionSummaries": [
        {"PipelineExecutionArn": execution_arn(pipeline, e), "PipelineExecutionStatus": status, "StartTime": at}
        for e, status, at, _ in summaries]}, {"PipelineName": pipeline, "CreatedAfter": ANY, "SortBy": "CreationTime",
                                              "SortOrder": "Ascending"})
    for e, _, _, values in summaries:
        parameters(execution_arn(pipeline, e), values, stub)


def test_a_run_resumed_by_hand_on_demand_keeps_its_run_id_deadline_and_parameters():
    from spot_training.operations.runs import resume_run

    sagemaker = client("sagemaker")
    first = NOW - datetime.timedelta(hours=9)
    with Stubber(sagemaker) as sm:
        _executions(sm, SPOT_PIPELINE, [
            ("abc123def456", "Stopped", first, {"InstanceType": TYPES[0], "MaxSteps": "500", "RunId": ""}),
            ("other0000000", "Succeeded", first, {"RunId": ""}),  # another run
            ("def456abc123", "Failed", first + datetime.timedelta(hours=7), {
                "InstanceType": TYPES[1], "MaxSteps": "500", "RunId": "abc123def456", "RunStartedAt": first.isoformat()})])
        _executions(sm, ON_DEMAND_PIPELINE, [])
        sm.add_response("start_pipeline_execution", {"PipelineExecutionArn": execution_arn(ON_DEMAND_PIPELINE, "n")}, {
            "PipelineName": ON_DEMAND_PIPELINE, "ClientRequestToken": ANY,
            "PipelineExecutionDisplayName": "abc123def456-on-demand", "PipelineExecutionDescription": ANY,
            "PipelineParameters": [{"Name": "InstanceType", "Value": TYPES[0]}, {"Name": "MaxSteps", "Value": "500"},
                                   {"Name": "RunId", "Value": "abc123def456"},
                                   {"Name": "RunStartedAt", "Value": first.isoformat()}]})
        arn = resume_run(sagemaker, SPOT_PIPELINE, "abc123def456", capacity="on-demand",
                         parameters={"InstanceType": TYPES[0]}, now=NOW)
    assert arn == execution_arn(ON_DEMAND_PIPELINE, "n")


def test_a_run_is_not_resumed_while_one_of_its_executions_runs_or_when_it_is_unknown():
    from spot_training.operations.runs import OperationError, resume_run

    sagemaker = client("sagemaker")
    with Stubber(sagemaker) as sm:
        _executions(sm, SPOT_PIPELINE, [("abc123def456", "Failed", NOW, {"RunId": ""})])
        _executions(sm, ON_DEMAND_PIPELINE, [("zzz", "Executing", NOW, {"RunId": "abc123def456"})])
        with pytest.raises(OperationError, match=r"^--resume-run abc123def456: execution .*/execution/zzz of this run "
                                                 r"is Executing; a run has one execution at a time$"):
            resume_run(sagemaker, SPOT_PIPELINE, "abc123def456", capacity="on-demand", parameters={}, now=NOW)
    sagemaker = client("sagemaker")
    with Stubber(sagemaker) as sm:  # deployed without the ladder: no on-demand pipeline
        _executions(sm, SPOT_PIPELINE, [])
        _executions(sm, ON_DEMAND_PIPELINE, RuntimeError())
        with pytest.raises(OperationError, match=r"^--resume-run nightly-7: no execution of this run in "):
            resume_run(sagemaker, SPOT_PIPELINE, "nightly-7", capacity="spot", parameters={}, now=NOW)
    with pytest.raises(OperationError, match=r"^--resume-run: RunId='a b': must be"):
        resume_run(client("sagemaker"), SPOT_PIPELINE, "a b", capacity="spot", parameters={}, now=NOW)


def test_capacity_without_resume_run_is_refused_in_one_line(capsys):
    from spot_training import cli

    assert cli.main(["start", "--pipeline-name", "p", "--region", "us-east-1", "--capacity", "on-demand"]) == 2
    assert capsys.readouterr().err == ("error: --capacity on-demand: goes with --resume-run RUN (a new run starts on "
                                       "spot; the capacity ladder climbs it)\n")


def test_the_run_report_shows_each_execution_its_rung_capacity_wait_billable_time_and_the_realized_savings():
    from spot_training.operations.runs import run_report, run_report_text

    first = NOW - datetime.timedelta(hours=12)
    sagemaker = client("sagemaker")

    def job(name: str, spot: bool, status: str, secondary: str, starting_hours: float, training: int, billable: int):
        start = first if spot else first + datetime.timedelta(hours=8)
        return {
            "TrainingJobName": name, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:111122223333:training-job/{name}",
            "ModelArtifacts": {"S3ModelArtifacts": "s3://b/o"}, "TrainingJobStatus": status, "SecondaryStatus": secondary,
            "AlgorithmSpecification": {"TrainingInputMode": "File"}, "EnableManagedSpotTraining": spot,
            "ResourceConfig": {"InstanceType": TYPES[0], "InstanceCount": 2, "VolumeSizeInGB": 500},
            "StoppingCondition": {"MaxRuntimeInSeconds": 43200}, "CreationTime": start,
            "TrainingTimeInSeconds": training, "BillableTimeInSeconds": billable,
            "SecondaryStatusTransitions": [
                {"Status": "Starting", "StartTime": start, "EndTime": start + datetime.timedelta(hours=starting_hours)},
                {"Status": "Training", "StartTime": start + datetime.timedelta(hours=starting_hours)}]}

    with Stubber(sagemaker) as sm:
        _executions(sm, SPOT_PIPELINE, [("abc123def456", "Stopped", first, {"RunId": ""})])
        _executions(sm, ON_DEMAND_PIPELINE, [("ondemand0001", "Succeeded", first + datetime.timedelta(hours=8),
                                              {"RunId": "abc123def456"})])
        for pipeline, execution, spot, status, secondary, wait, training, billable in (
                (SPOT_PIPELINE, "abc123def456", True, "Stopped", "MaxWaitTimeExceeded", 6.0, 7200, 2880),
                (ON_DEMAND_PIPELINE, "ondemand0001", False, "Completed", "Completed", 0.25, 18000, 18000)):
            arn = execution_arn(pipeline, execution)
            sm.add_response("describe_pipeline_execution", {"PipelineExecutionArn": arn, "PipelineExecutionStatus": {
                "Stopped": "Failed", "Completed": "Succeeded"}[status]}, {"PipelineExecutionArn": arn})
            name = f"pipelines-{execution}-train-1"
            sm.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
                {"StepName": "Train", "StepStatus": "Failed" if status == "Stopped" else "Succeeded",
                 "Metadata": {"TrainingJob": {"Arn": f"arn:aws:sagemaker:us-east-1:111122223333:training-job/{name}"}}}]},
                {"PipelineExecutionArn": arn, "SortOrder": "Ascending"})
            sm.add_response("describe_training_job", job(name, spot, status, secondary, wait, training, billable),
                            {"TrainingJobName": name})
        result = run_report(sagemaker, SPOT_PIPELINE, "abc123def456", price_per_hour=10.0, now=NOW)
    spot, on_demand = result["executions"]
    assert (spot["rung"], spot["ended_because"], spot["capacity_wait_seconds"]) == (
        "spot:ml.p4d.24xlarge", "MaxWaitTimeExceeded", 6 * 3600)
    assert (on_demand["rung"], on_demand["status"], on_demand["capacity_wait_seconds"]) == (
        "on-demand:ml.p4d.24xlarge", "Succeeded", 900)
    # (1 - (2880 + 18000) / (7200 + 18000)) x 100 = 17.1%; cost = 10 USD x 2 instances x billable hours.
    assert (result["savings_percent"], result["cost"], result["on_demand_cost"]) == (17.1, 116.0, 140.0)
    text = run_report_text(result)
    assert text.splitlines()[0] == "run abc123def456: 2 execution(s), Succeeded"
    assert "  1. spot:ml.p4d.24xlarge (2 instances): Failed, ended MaxWaitTimeExceeded; waited 6h00m00s for capacity" in text
    assert text.splitlines()[-1].startswith("  total: waited 6h15m00s for capacity")
    assert text.splitlines()[-1].endswith("realized savings 17.1% against on-demand; $116.00 against $140.00 on demand")


def test_a_repeated_event_after_the_climb_and_a_malformed_run_elsewhere_start_nothing(env):
    """The execution the controller started names the ended one in its description, so a repeated event finds it;
    an execution whose RunId its ResolveRun step refused belongs to no run and is skipped, not an error."""
    sagemaker, sns = client("sagemaker"), client("sns")
    ended = execution_arn(SPOT_PIPELINE, "abc123def456")
    climbed = execution_arn(SPOT_PIPELINE, "next00000001")
    with Stubber(sagemaker) as sm, Stubber(sns):
        parameters(ended, {"InstanceType": TYPES[0], "RunId": "",
                           "RunStartedAt": (NOW - datetime.timedelta(hours=8)).isoformat()}, sm)
        training_ended(ended, sm, "MaxWaitTimeExceeded", "Training job exceeded MaxWaitTimeInSeconds")
        running(sm, {SPOT_PIPELINE: [
            {"PipelineExecutionArn": execution_arn(SPOT_PIPELINE, "bad"), "PipelineExecutionStatus": "Executing"},
            {"PipelineExecutionArn": climbed, "PipelineExecutionStatus": "Executing",
             "PipelineExecutionDescription": f"Capacity ladder, after {ended}: MaxWaitTimeExceeded on ..."}]})
        parameters(execution_arn(SPOT_PIPELINE, "bad"), {"RunId": "not a run id"}, sm)
        parameters(climbed, {"RunId": "abc123def456"}, sm)
        running(sm, {ON_DEMAND_PIPELINE: []})
        result = capacity_ladder.on_execution_end(event(ended), sagemaker=sagemaker, sns=sns, now=NOW)
    assert (result["action"], result["reason"]) == ("ignore", f"already climbed: {climbed}")


def test_a_malformed_run_start_fails_the_resolve_run_step_in_one_line():
    with pytest.raises(capacity.RunIdError, match=r"^RunStartedAt='yesterday': must be an ISO 8601 time with its offset"):
        capacity_ladder.resolve_run_handler({"run_id": "", "execution_id": "e", "run_started_at": "yesterday"})
    with pytest.raises(capacity.RunIdError, match="with its offset"):  # no timezone: ambiguous
        capacity_ladder.resolve_run_handler({"run_id": "", "execution_id": "e", "run_started_at": "2026-12-07T08:00:00"})


def test_a_finished_run_is_not_resumed_and_a_start_into_a_running_run_is_refused():
    from spot_training.operations.runs import OperationError, resume_run, start

    sagemaker = client("sagemaker")
    with Stubber(sagemaker) as sm:
        _executions(sm, SPOT_PIPELINE, [("abc123def456", "Succeeded", NOW, {"RunId": ""})])
        _executions(sm, ON_DEMAND_PIPELINE, [])
        with pytest.raises(OperationError, match=r"^--resume-run abc123def456: the run finished \(execution .* "
                                                 r"Succeeded, its model evaluated and registered\); start a new run$"):
            resume_run(sagemaker, SPOT_PIPELINE, "abc123def456", capacity="spot", parameters={}, now=NOW)
    sagemaker = client("sagemaker")
    with Stubber(sagemaker) as sm:  # start --parameter RunId=... goes through the same one-at-a-time check
        _executions(sm, SPOT_PIPELINE, [("abc123def456", "Executing", NOW, {"RunId": ""})])
        _executions(sm, ON_DEMAND_PIPELINE, [])
        with pytest.raises(OperationError, match=r"^--parameter RunId=abc123def456: execution .* is Executing"):
            start(sagemaker, SPOT_PIPELINE, parameters={"RunId": "abc123def456"})
    with pytest.raises(OperationError, match=r"^--parameter RunStartedAt='soon': must be an ISO 8601 time"):
        start(client("sagemaker"), SPOT_PIPELINE, parameters={"RunStartedAt": "soon"})
