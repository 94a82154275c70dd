"""Alarms for failed and overlong pipeline executions, delivered to a KMS-encrypted SNS topic."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from spot_training.cdk.functions import vpc_function
from spot_training.cdk.network import let_logs_use

# EventBridge and CloudWatch names for SageMaker Pipelines (SageMaker developer guide, "Monitor pipelines").
EXECUTION_STATUS_EVENT = "SageMaker Model Building Pipeline Execution Status Change"
PIPELINE_METRICS_NAMESPACE = "AWS/Sagemaker/ModelBuildingPipeline"
AGE_METRICS_NAMESPACE = "SpotTraining"
MONITOR_CODE = Path(__file__).resolve().parent / "monitor"


class PipelineAlarms(Construct):
    """An SNS topic (KMS, SSL-only, optional e-mail) fed by: an EventBridge rule on executions that end
    Failed or Stopped; a CloudWatch alarm on ExecutionFailed; and an alarm on the age of the oldest
    running execution, a metric a scheduled function publishes every 5 minutes."""

    def __init__(self, scope: Construct, id: str, *, pipeline_name: str, pipeline_arn: str, vpc: ec2.IVpc,
                 subnets: Sequence[ec2.ISubnet], alarm_after_hours: float, email: str | None = None,
                 endpoint_security_group: ec2.ISecurityGroup | None = None,
                 monitor_reserved_concurrency: int | None = None, key: kms.IKey | None = None,
                 topic: sns.ITopic | None = None, other_pipeline_arns: Sequence[str] = ()) -> None:
        """
        :param key: the KMS key for the topic, the monitor's logs, dead letters and environment; it must let
            events.amazonaws.com, cloudwatch.amazonaws.com and logs.<region>.amazonaws.com encrypt and decrypt
            (@default - a new key with those grants).
        :param topic: where alarms and Failed/Stopped events go; its policy must let EventBridge and
            CloudWatch publish, and its key (if any) must let them use it (@default - a new topic encrypted
            with `key`).
        :param alarm_after_hours: alarm when an execution is still running after this long.
        :param monitor_reserved_concurrency: reserve this many concurrent executions for the monitor
            (@default - none: an account at the default concurrency quota of 10 rejects any reservation, since
            the unreserved pool must stay at 10 or more, and the stack would roll back).
        :param email: subscribe this address to the topic (@default - no subscription).
        :param other_pipeline_arns: more pipelines whose Failed or Stopped executions reach the topic (the capacity
            ladder's on-demand pipeline) (@default - none).
        :param endpoint_security_group: the VPC interface endpoints' group; the monitor function reaches
            SageMaker and CloudWatch through it (@default - HTTPS to the VPC's CIDR block).
        """
        super().__init__(scope, id)
        if key is None:
            key = kms.Key(self, "Key", enable_key_rotation=True, description="Encrypts training alarm messages")
            for service in ("events.amazonaws.com", "cloudwatch.amazonaws.com"):
                key.grant_encrypt_decrypt(iam.ServicePrincipal(service))
            let_logs_use(key)  # the monitor's log group
        self.key = key
        self.topic = topic or sns.Topic(self, "Topic", master_key=self.key, enforce_ssl=True,
                                        display_name=f"Training alarms: {pipeline_name}")
        if email:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))
        self.status_rule = events.Rule(
            self, "FailedOrStopped", description=f"{pipeline_name} executions that end Failed or Stopped",
            event_pattern=events.EventPattern(source=["aws.sagemaker"], detail_type=[EXECUTION_STATUS_EVENT],
                                              detail={"pipelineArn": [pipeline_arn, *other_pipeline_arns],
                                                      "currentPipelineExecutionStatus": ["Failed", "Stopped"]}),
            targets=[targets.SnsTopic(self.topic, message=events.RuleTargetInput.from_text(
                f"Pipeline {pipeline_name}: execution {events.EventField.from_path('$.detail.pipelineExecutionArn')} "
                f"is {events.EventField.from_path('$.detail.currentPipelineExecutionStatus')}. Find the reason "
                f"with: spot-training watch {events.EventField.from_path('$.detail.pipelineExecutionArn')}"))])
        action = cloudwatch_actions.SnsAction(self.topic)
        self.failed_alarm = cloudwatch.Alarm(
            self, "ExecutionFailed", alarm_description=f"A {pipeline_name} execution failed",
            metric=cloudwatch.Metric(namespace=PIPELINE_METRICS_NAMESPACE, metric_name="ExecutionFailed",
                                     dimensions_map={"PipelineName": pipeline_name}, statistic="Sum",
                                     period=cdk.Duration.minutes(5)),
            threshold=1, evaluation_periods=1, treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD)
        self.failed_alarm.add_alarm_action(action)
        self.monitor = self._monitor_function(pipeline_name, pipeline_arn, vpc, subnets, endpoint_security_group,
                                              monitor_reserved_concurrency)
        self.age_alarm = cloudwatch.Alarm(
            self, "ExecutionRunningTooLong",
            alarm_description=f"A {pipeline_name} execution has run for more than {alarm_after_hours:g} h",
            metric=cloudwatch.Metric(namespace=AGE_METRICS_NAMESPACE, metric_name="OldestRunningExecutionAgeSeconds",
                                     dimensions_map={"PipelineName": pipeline_name}, statistic="Maximum",
                                     period=cdk.Duration.minutes(5)),
            threshold=alarm_after_hours * 3600, evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.MISSING,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD)
        self.age_alarm.add_alarm_action(action)
        self.monitor_errors_alarm = cloudwatch.Alarm(
            self, "MonitorErrors", alarm_description="The execution-age monitor itself is failing",
            metric=self.monitor.metric_errors(period=cdk.Duration.minutes(15)), threshold=1, evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD)
        self.monitor_errors_alarm.add_alarm_action(action)
        self._let_alarms_publish([self.failed_alarm, self.age_alarm, self.monitor_errors_alarm])

    def _let_alarms_publish(self, alarms: Sequence[cloudwatch.Alarm]) -> None:
        """A topic policy replaces SNS's default one (`enforce_ssl` writes one), and then each service that
        publishes needs its own Allow there: the EventBridge target adds events.amazonaws.com; CloudWatch alarm
        actions need cloudwatch.amazonaws.com (aws-solutions/automated-security-response-on-aws#43), bound to
        these alarms and this account against the confused deputy (CloudWatch user guide, "Confused deputy
        prevention": aws:SourceArn and aws:SourceAccount). A topic passed in that is not part of this app keeps
        its own policy: CDK cannot add to it, so synth warns and the README says what it needs."""
        stack = cdk.Stack.of(self)
        added = self.topic.add_to_resource_policy(iam.PolicyStatement(
            sid="CloudWatchAlarmsPublish", principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
            actions=["sns:Publish"], resources=[self.topic.topic_arn],
            conditions={"StringEquals": {"aws:SourceAccount": stack.account},
                        "ArnEquals": {"aws:SourceArn": [alarm.alarm_arn for alarm in alarms]}}))
        if not added.statement_added:
            cdk.Annotations.of(self).add_warning_v2(
                "spot-training:alarm-topic-policy",
                "alarm_topic is imported: its topic policy must allow sns:Publish to cloudwatch.amazonaws.com "
                "(alarm actions) and events.amazonaws.com (the Failed/Stopped rule), and its KMS key, if any, "
                "kms:GenerateDataKey* and kms:Decrypt to both, or the alarms reach nobody (README, Alarms)")

    def _monitor_function(self, pipeline_name: str, pipeline_arn: str, vpc: ec2.IVpc,
                          subnets: Sequence[ec2.ISubnet], endpoint_security_group: ec2.ISecurityGroup | None,
                          monitor_reserved_concurrency: int | None) -> lambda_.Function:
        function, dead_letters = vpc_function(
            self, "Monitor", handler="execution_age.handler",
            code=lambda_.Code.from_asset(str(MONITOR_CODE), exclude=["__pycache__", "capacity_ladder.py"]),
            vpc=vpc, subnets=subnets, endpoint_security_group=endpoint_security_group, key=self.key,
            purpose="Execution-age monitor", reserved_concurrency=monitor_reserved_concurrency,
            environment={"PIPELINE_NAME": pipeline_name, "METRIC_NAMESPACE": AGE_METRICS_NAMESPACE},
            description=f"Publishes the age of the oldest running {pipeline_name} execution",
            statements=[
                iam.PolicyStatement(sid="ListThisPipelinesExecutions", actions=["sagemaker:ListPipelineExecutions"],
                                    resources=[pipeline_arn]),
                iam.PolicyStatement(sid="PublishAgeMetric", actions=["cloudwatch:PutMetricData"], resources=["*"],
                                    conditions={"StringEquals": {"cloudwatch:namespace": AGE_METRICS_NAMESPACE}})])
        events.Rule(self, "EveryFiveMinutes", schedule=events.Schedule.rate(cdk.Duration.minutes(5)),
                    targets=[targets.LambdaFunction(function, retry_attempts=2, dead_letter_queue=dead_letters)])
        return function
