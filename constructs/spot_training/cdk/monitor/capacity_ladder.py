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

from spot_training.config.capacity import (CAPACITIES, RUN_STARTED_AT_PARAMETER, RUNNING, Decision, Plan,
                                           RunIdError, climb_parameters, decide, execution_parameters,
                                           executions_of_run, is_capacity_failure, resolve_run, run_of, run_started_at)


def resolve_run_handler(event: dict[str, Any], context: Any = None) -> dict[str, str]:
    run_started_at(event.get("run_started_at"))  # a malformed deadline fails the step here, before any job
    return {"RunId": resolve_run(event.get("run_id"), event["execution_id"])}


def execution_id(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def pipeline_of(arn: str) -> str:
    """`arn:...:pipeline/<name, lower case>/execution/<id>` -> the name as the ARN has it."""
    return arn.split(":pipeline/", 1)[1].split("/", 1)[0]


def training_failure(sagemaker, arn: str, step_name: str) -> str:
    """Why the execution's training step ended: the job's SecondaryStatus and FailureReason, then the step's."""
    pages = sagemaker.get_paginator("list_pipeline_execution_steps").paginate(PipelineExecutionArn=arn,
                                                                              SortOrder="Descending")
    for page in pages:
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
    parameters = execution_parameters(sagemaker, arn)
    run_id = run_of(parameters, execution_id(arn))
    if run_id is None:  # its ResolveRun step refused the RunId: no job ran, no run to climb
        return _done({"execution": arn, "action": "ignore", "reason": "its RunId is malformed; it belongs to no run"})
    try:
        started = run_started_at(parameters.get(RUN_STARTED_AT_PARAMETER))
    except RunIdError:  # refused by ResolveRun too; this execution ran no job
        return _done({"execution": arn, "action": "ignore", "reason": "its RunStartedAt is malformed"})
    started = started or sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)["CreationTime"]
    failure = training_failure(sagemaker, arn, os.environ["TRAINING_STEP"]) or \
        f"{event['detail'].get('currentPipelineExecutionStatus', 'ended')} before training ended"
    current = plan.rung_of(pipeline, parameters.get("InstanceType") or plan.rungs[0].instance_type)
    running = []
    if is_capacity_failure(failure):  # only executions created since the run began can be running it
        running = [e for e in executions_of_run(sagemaker, {c: plan.pipelines[c] for c in CAPACITIES if c in plan.pipelines},
                                                run_id, created_after=started - datetime.timedelta(minutes=5),
                                                statuses=RUNNING) if e["arn"] != arn]
    if any(arn in e["description"] for e in running):  # a repeated event: this controller climbed already
        return _done({"run": run_id, "execution": arn, "action": "ignore",
                      "reason": "already climbed: " + ", ".join(e["arn"] for e in running if arn in e["description"])})
    decision = decide(plan.rungs, current, failure, hours_since_start=(now - started).total_seconds() / 3600,
                      slo_hours=plan.slo_hours, running_executions_of_run=len(running))
    result: dict[str, Any] = {"run": run_id, "execution": arn, "rung": current, "failure": failure[:500],
                              "action": decision.action, "reason": decision.reason}
    if decision.action == "climb":
        result["started"] = _climb(sagemaker, plan, decision, parameters, run_id, started.isoformat(), arn,
                                   event.get("id", ""))
    if decision.action != "ignore" and topic:
        (sns or boto3.client("sns")).publish(TopicArn=topic, Subject=_subject(decision, run_id),
                                             Message=_message(result))
    return _done(result)


def _climb(sagemaker, plan: Plan, decision: Decision, parameters: dict[str, str], run_id: str, started: str,
           ended_arn: str, event_id: str) -> str:
    rung = decision.rung
    assert rung is not None
    number = [r.name for r in plan.rungs].index(rung.name) + 1
    response = sagemaker.start_pipeline_execution(
        PipelineName=plan.pipelines[rung.capacity],
        PipelineExecutionDisplayName=f"{run_id}-rung-{number}"[:82],
        # The ended execution's ARN in the description marks the climb, so a repeated event finds it.
        PipelineExecutionDescription=f"Capacity ladder, after {ended_arn}: {decision.reason}"[:3072],
        PipelineParameters=[{"Name": k, "Value": v} for k, v in sorted(climb_parameters(
            parameters, run_id=run_id, run_started_at=started, rung=rung).items())],
        # One event starts at most one execution, however often it is delivered (a retried execution that ends
        # again is another event).
        ClientRequestToken=hashlib.sha256(f"{ended_arn}:{event_id}".encode()).hexdigest())
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
