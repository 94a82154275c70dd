"""Scheduled Lambda: publishes the age of the pipeline's oldest running execution as a CloudWatch metric.

SageMaker's own ExecutionDuration metric exists only once a run has ended, so an execution that is still
running too long needs this signal. Publishes 0 when nothing runs, so the alarm sees data every period.
Environment: PIPELINE_NAME, METRIC_NAMESPACE.
"""

from __future__ import annotations

import datetime
import os

import boto3

METRIC_NAME = "OldestRunningExecutionAgeSeconds"


def oldest_running_age_seconds(sagemaker, pipeline_name: str, now: datetime.datetime) -> float:
    oldest = 0.0
    paginator = sagemaker.get_paginator("list_pipeline_executions")
    for page in paginator.paginate(PipelineName=pipeline_name, SortBy="CreationTime", SortOrder="Descending"):
        for execution in page["PipelineExecutionSummaries"]:
            if execution["PipelineExecutionStatus"] in ("Executing", "Stopping"):
                oldest = max(oldest, (now - execution["StartTime"]).total_seconds())
    return oldest


def handler(event, context, sagemaker=None, cloudwatch=None) -> dict:
    pipeline_name, namespace = os.environ["PIPELINE_NAME"], os.environ["METRIC_NAMESPACE"]
    sagemaker = sagemaker or boto3.client("sagemaker")
    cloudwatch = cloudwatch or boto3.client("cloudwatch")
    age = oldest_running_age_seconds(sagemaker, pipeline_name, datetime.datetime.now(datetime.timezone.utc))
    cloudwatch.put_metric_data(Namespace=namespace, MetricData=[{
        "MetricName": METRIC_NAME, "Dimensions": [{"Name": "PipelineName", "Value": pipeline_name}],
        "Value": age, "Unit": "Seconds"}])
    return {"pipeline": pipeline_name, "oldest_running_age_seconds": age}
