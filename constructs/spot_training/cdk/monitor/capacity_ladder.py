"""The run identity and the capacity ladder's controller, as Lambda handlers (bundled with
`spot_training.config.capacity` by `spot_training.cdk.ladder`).

`resolve_run_handler`: the pipeline's first step (a Lambda step). Event {"run_id", "execution_id"}; returns
{"RunId": <run id or execution id>}. A bad RunId raises, so the step and the execution fail with its message.

`on_execution_end`: EventBridge's "SageMaker Model Building Pipeline Execution Status Change" for executions of
the construct's pipelines that end Failed or Stopped. It reads why the training step ended (the training job's
SecondaryStatus and FailureReason, and the step's), the run the execution belongs to and when that run started,
counts the run's executions still running, and acts on `decide`: starts the next rung's execution with the same
run id (the checkpoints carry over), or says why not. Every decision on a capacity failure goes to the alarm
topic. StartPipelineExecution's ClientRequestToken is derived from the ended execution, so an event delivered
twice starts one execution.
Environment: LADDER (config.capacity.Plan as JSON), TRAINING_STEP (the training step's name), TOPIC_ARN (may be
empty).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any

from spot_training.config.capacity import (RUN_ID_PARAMETER, RUN_STARTED_AT_PARAMETER, Decision, Plan,
                                           climb_parameters, decide, is_capacity_failure, resolve_run)

RUNNING = ("Executing", "Stopping")


def resolve_run_handler(event: dict[str, Any], context: Any = None) -> dict[str, str]:
    return {"RunId": resolve_run(event.get("run_id"), event["execution_id"])}


def execution_id(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def pipeline_of(arn: str) -> str:
    """`arn:...:pipeline/<name, lower case>/execution/<id>` -> the name as the ARN has it."""
    return arn.split(":pipeline/", 1)[1].split("/", 1)[0]


def parameters_of(sagemaker, arn: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for page in sagemaker.get_paginator("list_pipeline_parameters_for_execution").paginate(PipelineExecutionArn=arn):
        found.update({p["Name"]: p["Value"] for p in page["PipelineParameters"]})
    return found


def training_failure(sagemaker, arn: str, step_name: str) -> str:
    """Why the execution's training step ended: the job's SecondaryStatus and FailureReason, then the step's."""
    for page in sagemaker.get_paginator("list_pipeline_execution_steps").paginate(PipelineExecutionArn=arn):
        for step in page["PipelineExecutionSteps"]:  # newest first: the last attempt of a retried step
            if step["StepName"] != step_name:
                continue
            reasons = []
            job = step.get("Metadata", {}).get("TrainingJob", {}).get("Arn")
            if job:
                described = sagemaker.describe_training_job(TrainingJobName=job.rsplit("/", 1)[-1])
                reasons += [described.get("SecondaryStatus", ""), described.get("FailureReason", "")]
            reasons.append(step.get("FailureReason", ""))
            return ": ".join(r for r in reasons if r)
    return ""


def running_executions_of_run(sagemaker, plan: Plan, run_id: str, since: datetime.datetime, ended_arn: str) -> int:
    """Executions of `run_id` running in either pipeline (only executions created since the run began can be)."""
    count = 0
    for pipeline in sorted(set(plan.pipelines.values())):
        pages = sagemaker.get_paginator("list_pipeline_executions").paginate(
            PipelineName=pipeline, CreatedAfter=since - datetime.timedelta(minutes=5), SortBy="CreationTime",
            SortOrder="Descending")
        for page in pages:
            for summary in page["PipelineExecutionSummaries"]:
                arn = summary["PipelineExecutionArn"]
                if summary["PipelineExecutionStatus"] not in RUNNING or arn == ended_arn:
                    continue
                if resolve_run(parameters_of(sagemaker, arn).get(RUN_ID_PARAMETER), execution_id(arn)) == run_id:
                    count += 1
    return count


def on_execution_end(event: dict[str, Any], context: Any = None, *, sagemaker=None, sns=None,
                     now: datetime.datetime | None = None) -> dict[str, Any]:
    import boto3  # in the Lambda runtime; tests pass stubbed clients

    plan, topic = Plan.from_json(os.environ["LADDER"]), os.environ.get("TOPIC_ARN", "")
    sagemaker = sagemaker or boto3.client("sagemaker")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    arn = event["detail"]["pipelineExecutionArn"]
    pipeline = next((name for name in plan.pipelines.values() if name.lower() == pipeline_of(arn).lower()), None)
    if pipeline is None:
        return _done({"execution": arn, "action": "ignore", "reason": "not an execution of this ladder's pipelines"})
    parameters = parameters_of(sagemaker, arn)
    run_id = resolve_run(parameters.get(RUN_ID_PARAMETER), execution_id(arn))
    started_text = parameters.get(RUN_STARTED_AT_PARAMETER) or \
        sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)["CreationTime"].isoformat()
    started = datetime.datetime.fromisoformat(started_text)
    failure = training_failure(sagemaker, arn, os.environ["TRAINING_STEP"]) or \
        f"{event['detail'].get('currentPipelineExecutionStatus', 'ended')} before training ended"
    current = plan.rung_of(pipeline, parameters.get("InstanceType", ""))
    running = running_executions_of_run(sagemaker, plan, run_id, started, arn) if is_capacity_failure(failure) else 0
    decision = decide(plan.rungs, current, failure, hours_since_start=(now - started).total_seconds() / 3600,
                      slo_hours=plan.slo_hours, running_executions_of_run=running)
    result: dict[str, Any] = {"run": run_id, "execution": arn, "rung": current, "failure": failure[:500],
                              "action": decision.action, "reason": decision.reason}
    if decision.action == "climb":
        result["started"] = _climb(sagemaker, plan, decision, parameters, run_id, started_text, arn)
    if decision.action != "ignore" and topic:
        (sns or boto3.client("sns")).publish(TopicArn=topic, Subject=_subject(decision, run_id),
                                             Message=_message(result))
    return _done(result)


def _climb(sagemaker, plan: Plan, decision: Decision, parameters: dict[str, str], run_id: str, started: str,
           ended_arn: str) -> str:
    rung = decision.rung
    assert rung is not None
    number = [r.name for r in plan.rungs].index(rung.name) + 1
    response = sagemaker.start_pipeline_execution(
        PipelineName=plan.pipelines[rung.capacity],
        PipelineExecutionDisplayName=f"{run_id}-rung-{number}"[:82],
        PipelineExecutionDescription=decision.reason[:3072],
        PipelineParameters=[{"Name": k, "Value": v} for k, v in sorted(climb_parameters(
            parameters, run_id=run_id, run_started_at=started, rung=rung).items())],
        # One ended execution starts at most one next execution, however often its event arrives.
        ClientRequestToken=hashlib.sha256(ended_arn.encode()).hexdigest())
    return response["PipelineExecutionArn"]


def _subject(decision: Decision, run_id: str) -> str:
    verb = {"climb": f"climbed to {decision.rung.name}" if decision.rung else "climbed", "stop": "stopped"}
    return f"Capacity ladder: run {run_id} {verb.get(decision.action, decision.action)}"[:100]


def _message(result: dict[str, Any]) -> str:
    lines = [f"Run {result['run']}: execution {result['execution']} on {result['rung']} ended ({result['failure']}).",
             f"Decision: {result['action']}: {result['reason']}."]
    if "started" in result:
        lines.append(f"Started {result['started']}; follow it with: spot-training watch {result['started']}")
    return "\n".join(lines)


def _done(result: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(result))  # the function's log: one line per decision
    return result
