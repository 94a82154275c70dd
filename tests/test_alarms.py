"""Alarms: failed/stopped executions to SNS, an ExecutionFailed alarm, and a real signal for overlong runs."""

from __future__ import annotations

import datetime
import json

import botocore.session
import pytest
from botocore.stub import Stubber

from tests.conftest import ROOT, synth


def _one(synthesized, resource_type, fragment=""):
    (item,) = [v for k, v in synthesized.resources("pipeline", resource_type).items() if fragment in k]
    return item["Properties"]


def test_topic_is_kms_encrypted_and_refuses_plain_http(default_app):
    topic = _one(default_app, "AWS::SNS::Topic")
    assert "KmsMasterKeyId" in topic
    policy = _one(default_app, "AWS::SNS::TopicPolicy")["PolicyDocument"]["Statement"]
    assert any(s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in policy)


def test_failed_or_stopped_executions_of_this_pipeline_reach_the_topic(default_app):
    rules = [r["Properties"] for r in default_app.resources("pipeline", "AWS::Events::Rule").values()
             if "EventPattern" in r["Properties"]]
    (rule,) = rules
    pattern = rule["EventPattern"]
    assert pattern["source"] == ["aws.sagemaker"]
    assert pattern["detail-type"] == ["SageMaker Model Building Pipeline Execution Status Change"]
    assert pattern["detail"]["currentPipelineExecutionStatus"] == ["Failed", "Stopped"]
    assert ":pipeline/distributed-training" in json.dumps(pattern["detail"]["pipelineArn"])
    assert "Ref" in rule["Targets"][0]["Arn"]


def test_execution_failed_metric_alarms_to_the_topic(default_app):
    alarm = _one(default_app, "AWS::CloudWatch::Alarm", "ExecutionFailed")
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/Sagemaker/ModelBuildingPipeline", "ExecutionFailed")
    assert alarm["Dimensions"] == [{"Name": "PipelineName", "Value": "distributed-training"}]
    assert alarm["Threshold"] == 1 and len(alarm["AlarmActions"]) == 1


def test_overlong_execution_alarm_watches_the_published_age_metric(default_app):
    alarm = _one(default_app, "AWS::CloudWatch::Alarm", "RunningTooLong")
    assert (alarm["Namespace"], alarm["MetricName"]) == ("SpotTraining", "OldestRunningExecutionAgeSeconds")
    assert alarm["Threshold"] == 12 * 3600 and alarm["ComparisonOperator"] == "GreaterThanThreshold"
    schedule = [r["Properties"] for r in default_app.resources("pipeline", "AWS::Events::Rule").values()
                if "ScheduleExpression" in r["Properties"]]
    assert schedule[0]["ScheduleExpression"] == "rate(5 minutes)"


def test_monitor_runs_in_the_isolated_vpc_with_a_dead_letter_queue_and_no_reserved_concurrency(default_app):
    # A reservation fails deployment in an account at the default concurrency quota of 10.
    function = _one(default_app, "AWS::Lambda::Function", "AlarmsMonitor")
    assert len(function["VpcConfig"]["SubnetIds"]) == 2
    assert "ReservedConcurrentExecutions" not in function
    assert "DeadLetterConfig" in function
    assert function["Environment"]["Variables"]["PIPELINE_NAME"] == "distributed-training"
    egress = _one(default_app, "AWS::EC2::SecurityGroupEgress", "Monitor")
    assert (egress["FromPort"], egress["ToPort"]) == (443, 443) and "EndpointSecurityGroup" in json.dumps(egress)


def test_email_subscription_follows_config(tmp_path_factory):
    with_mail = synth(tmp_path_factory.getbasetemp(), alarm_email="oncall@example.com")
    subscription = _one(with_mail, "AWS::SNS::Subscription")
    assert (subscription["Protocol"], subscription["Endpoint"]) == ("email", "oncall@example.com")


def test_alarm_topic_is_an_output(default_app):
    assert "AlarmTopicArn" in default_app.templates["pipeline"]["Outputs"]


@pytest.fixture
def monitor(monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "constructs" / "spot_training" / "cdk" / "monitor"))
    monkeypatch.setenv("PIPELINE_NAME", "distributed-training")
    monkeypatch.setenv("METRIC_NAMESPACE", "SpotTraining")
    import execution_age

    return execution_age


def test_monitor_publishes_the_oldest_running_execution_age(monitor):
    session = botocore.session.get_session()
    sagemaker = session.create_client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                                      aws_secret_access_key="x")
    cloudwatch = session.create_client("cloudwatch", region_name="us-east-1", aws_access_key_id="x",
                                       aws_secret_access_key="x")
    now = datetime.datetime.now(datetime.timezone.utc)
    with Stubber(sagemaker) as sm, Stubber(cloudwatch) as cw:
        sm.add_response("list_pipeline_executions", {"PipelineExecutionSummaries": [
            {"PipelineExecutionArn": "arn:aws:sagemaker:us-east-1:1:pipeline/p/execution/a",
             "StartTime": now - datetime.timedelta(hours=13), "PipelineExecutionStatus": "Executing"},
            {"PipelineExecutionArn": "arn:aws:sagemaker:us-east-1:1:pipeline/p/execution/b",
             "StartTime": now - datetime.timedelta(hours=30), "PipelineExecutionStatus": "Succeeded"},
            {"PipelineExecutionArn": "arn:aws:sagemaker:us-east-1:1:pipeline/p/execution/c",
             "StartTime": now - datetime.timedelta(hours=1), "PipelineExecutionStatus": "Executing"}]},
            {"PipelineName": "distributed-training", "SortBy": "CreationTime", "SortOrder": "Descending"})
        cw.add_response("put_metric_data", {}, {"Namespace": "SpotTraining", "MetricData": [{
            "MetricName": "OldestRunningExecutionAgeSeconds",
            "Dimensions": [{"Name": "PipelineName", "Value": "distributed-training"}],
            "Value": pytest.approx(13 * 3600, abs=5), "Unit": "Seconds"}]})
        result = monitor.handler({}, None, sagemaker=sagemaker, cloudwatch=cloudwatch)
    assert result["oldest_running_age_seconds"] == pytest.approx(13 * 3600, abs=5)


def test_an_imported_alarm_topic_gets_a_warning_naming_what_its_policy_needs():
    """CDK cannot add to the policy of a topic outside the app, so synth says what the alarms need from it."""
    import aws_cdk as cdk
    from aws_cdk import aws_ec2 as ec2
    from aws_cdk import aws_sns as sns
    from aws_cdk.assertions import Annotations, Match

    from spot_training.config.settings import TrainingConfig
    from spot_training.cdk.pipeline import TrainingPipeline

    app = cdk.App()
    stack = cdk.Stack(app, "Imported", env=cdk.Environment(region="us-east-1", account="111122223333"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    topic = sns.Topic.from_topic_arn(stack, "Theirs", "arn:aws:sns:us-east-1:111122223333:oncall")
    TrainingPipeline(stack, "Training", config=TrainingConfig(), vpc=vpc, alarm_topic=topic)
    warnings = Annotations.from_stack(stack).find_warning("*", Match.string_like_regexp(
        "alarm_topic is imported: its topic policy must allow sns:Publish to cloudwatch.amazonaws.com"))
    assert len(warnings) == 1
