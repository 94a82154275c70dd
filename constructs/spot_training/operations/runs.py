"""Operating runs: start, watch and report on pipeline executions (boto3 clients are passed in).

The real failure reason of a run is in the step and the training job (ListPipelineExecutionSteps,
DescribeTrainingJob), not in the execution's generic FailureReason; spot interruptions show up as the
training job's `Interrupted` secondary status; realized spot savings are
(1 - BillableTimeInSeconds / TrainingTimeInSeconds) x 100 (SageMaker managed spot documentation).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import botocore.exceptions

from spot_training.config.capacity import (CAPACITIES, ON_DEMAND, RUN_ID_PARAMETER, RUN_STARTED_AT_PARAMETER,
                                           RUNNING, SPOT, RunIdError, executions_of_run, resolve_run, run_started_at)
from spot_training.config.ladder import on_demand_pipeline_name
from spot_training.config.layout import DATA_PARAMETERS, NO_FINGERPRINT
from spot_training.operations.errors import OperationError

TERMINAL = {"Succeeded", "Failed", "Stopped"}
# The steps after training (definition.build: EVALUATE_STEP_NAME, GATE_STEP_NAME).
EVALUATE_STEP, GATE_STEP = "Evaluate", "CheckEvaluation"




# ---- pipeline name and parameters -----------------------------------------------------------------------
def pipeline_name_from_outputs(path: Path) -> str:
    """The `PipelineName` output of a `cdk deploy --outputs-file` file."""
    if not path.is_file():
        raise OperationError(f"--outputs {path}: no such file; deploy with `make deploy` or pass --pipeline-name")
    names = [outputs["PipelineName"] for outputs in json.loads(path.read_text()).values() if "PipelineName" in outputs]
    if len(names) != 1:
        raise OperationError(f"--outputs {path}: expected one PipelineName output, found {len(names)}")
    return names[0]


def parse_parameters(items: Sequence[str]) -> dict[str, str]:
    parameters = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise OperationError(f"--parameter {item}: must be Name=Value")
        parameters[name] = value
    return parameters


def execution_arn(sagemaker, pipeline_name: str, execution: str) -> str:
    if execution.startswith("arn:"):
        return execution
    pipeline_arn = sagemaker.describe_pipeline(PipelineName=pipeline_name)["PipelineArn"]
    return f"{pipeline_arn}/execution/{execution}"


# ---- start ------------------------------------------------------------------------------------------
# The preparation step's cache (Pipelines step caching) keys on a processing step's AppSpecification, Environment
# and ProcessingInputs (https://docs.aws.amazon.com/sagemaker/latest/dg/pipelines-default-keys.html), not on the
# objects under an input's S3 URI. DataFingerprint is one of the step's ContainerArguments (AppSpecification), so a
# start that passes a digest of the data objects re-prepares changed data under an unchanged prefix.
FINGERPRINT_PARAMETER = "DataFingerprint"


def data_fingerprint(s3, uris: Mapping[str, str], *, warn: Callable[[str], None]) -> str | None:
    """A digest of every object (key, size, ETag; S3 ListObjectsV2) under each data URI. An empty prefix is
    refused (the run would fail in its preparation step); without list rights, `warn` says what that costs and
    None is returned (the step cache then keys on the URIs alone)."""
    import botocore.exceptions

    digest = hashlib.sha256()
    for name, uri in uris.items():
        if not str(uri).startswith("s3://"):
            raise OperationError(f"{name}={uri}: must be an s3:// URI")
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        count = 0
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    digest.update(f"{name}\t{item['Key']}\t{item['Size']}\t{item['ETag']}\n".encode())
                    count += 1
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "error")
            if code not in ("AccessDenied", "AllAccessDisabled"):
                raise OperationError(f"{name}={uri}: cannot list it ({code})") from None
            warn(f"warning: {name}={uri}: cannot list it ({code}); the preparation step's cache keys on the URI "
                 f"alone, so changed objects under it would reuse old shards (pass --parameter "
                 f"{FINGERPRINT_PARAMETER}=<a data version> or put changed data under a new prefix)")
            return None
        if not count:
            raise OperationError(f"{name}={uri}: no objects there; upload the data first (the run's preparation "
                                 "step would fail on it)")
    return digest.hexdigest()[:32]


def start(sagemaker, pipeline_name: str, *, parameters: Mapping[str, str], resume_from: str | None = None,
          display_name: str | None = None, s3=None, warn: Callable[[str], None] = lambda line: print(
              line, file=sys.stderr)) -> str:
    """Start a run, or resume one: a resumed execution keeps its id, so its training step finds the
    checkpoints it wrote under `checkpoints/<execution id>/` (RetryPipelineExecution). With `s3`, a start of
    a pipeline with a DataFingerprint parameter passes the data's fingerprint (`data_fingerprint`) unless
    the caller gave one."""
    if resume_from:
        if parameters:
            raise OperationError("--resume-from reruns an execution with its own parameters; drop --parameter")
        arn = execution_arn(sagemaker, pipeline_name, resume_from)
        status = sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)["PipelineExecutionStatus"]
        if status not in ("Failed", "Stopped"):
            raise OperationError(f"--resume-from {resume_from}: execution is {status}; only Failed or Stopped "
                                 "executions can be resumed")
        return sagemaker.retry_pipeline_execution(PipelineExecutionArn=arn,
                                                  ClientRequestToken=str(uuid.uuid4()))["PipelineExecutionArn"]
    _check_run_parameters(parameters)
    if parameters.get(RUN_ID_PARAMETER):  # a run has one execution at a time, however it is started
        busy = [e for e in run_executions(sagemaker, pipeline_name, parameters[RUN_ID_PARAMETER])
                if e["status"] in RUNNING]
        if busy:
            raise OperationError(f"--parameter RunId={parameters[RUN_ID_PARAMETER]}: execution {busy[-1]['arn']} of "
                                 f"this run is {busy[-1]['status']}; a run has one execution at a time")
    definition = json.loads(sagemaker.describe_pipeline(PipelineName=pipeline_name)["PipelineDefinition"])
    known = [p["Name"] for p in definition.get("Parameters", [])]
    for name in parameters:
        if name not in known:
            raise OperationError(f"--parameter {name}: not a parameter of {pipeline_name}; allowed: {', '.join(known)}")
    if s3 is not None and FINGERPRINT_PARAMETER in known and FINGERPRINT_PARAMETER not in parameters:
        defaults = {p["Name"]: p.get("DefaultValue") for p in definition["Parameters"]}
        uris = {name: parameters.get(name, defaults[name]) for name in DATA_PARAMETERS.values() if name in defaults}
        fingerprint = data_fingerprint(s3, uris, warn=warn)
        if fingerprint:
            parameters = {**parameters, FINGERPRINT_PARAMETER: fingerprint}
    if s3 is not None and APPROVED_LOSS_PARAMETER in known and APPROVED_LOSS_PARAMETER not in parameters:
        loss = approved_model_loss(sagemaker, s3, definition, parameters, warn=warn)
        if loss is not None:
            parameters = {**parameters, APPROVED_LOSS_PARAMETER: repr(loss)}
    request = {"PipelineName": pipeline_name, "ClientRequestToken": str(uuid.uuid4()),
               "PipelineExecutionDisplayName": display_name or datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S")}
    if parameters:
        request["PipelineParameters"] = [{"Name": k, "Value": v} for k, v in parameters.items()]
    return sagemaker.start_pipeline_execution(**request)["PipelineExecutionArn"]


APPROVED_LOSS_PARAMETER = "ApprovedModelLoss"  # definition.build.APPROVED_LOSS_PARAMETER
def run_executions(sagemaker, pipeline_name: str, run_id: str, *, lookback_days: int = 30,
                   now: datetime.datetime | None = None) -> list[dict[str, Any]]:
    """The executions of run `run_id` in the construct's pipelines (spot, and on-demand where it exists), oldest
    first (`config.capacity.executions_of_run`). Only executions of the last `lookback_days` are read: checkpoints
    expire after 30 days by default (checkpoint_expiration_days), so an older run has nothing to resume from."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return executions_of_run(sagemaker, {SPOT: pipeline_name, ON_DEMAND: on_demand_pipeline_name(pipeline_name)},
                             run_id, created_after=now - datetime.timedelta(days=lookback_days))


def _check_run_parameters(parameters: Mapping[str, str]) -> None:
    try:
        resolve_run(parameters.get(RUN_ID_PARAMETER), "unused")
        run_started_at(parameters.get(RUN_STARTED_AT_PARAMETER))
    except RunIdError as error:
        raise OperationError(f"--parameter {error}") from None


def resume_run(sagemaker, pipeline_name: str, run_id: str, *, capacity: str, parameters: Mapping[str, str],
               now: datetime.datetime | None = None) -> str:
    """Start the next execution of run `run_id` by hand, on `capacity` (`spot`: `pipeline_name`; `on-demand`: its
    `-on-demand` pipeline): with the parameters of the run's latest execution, then `parameters`, the same RunId
    (its checkpoints) and RunStartedAt (its deadline). Refused while an execution of the run is running."""
    try:
        resolve_run(run_id, "")
    except RunIdError as error:
        raise OperationError(f"--resume-run: {error}") from None
    _check_run_parameters(parameters)
    if capacity not in CAPACITIES:
        raise OperationError(f"--capacity {capacity}: must be one of {', '.join(CAPACITIES)}")
    executions = run_executions(sagemaker, pipeline_name, run_id, now=now)
    if not executions:
        raise OperationError(f"--resume-run {run_id}: no execution of this run in {pipeline_name} or "
                             f"{on_demand_pipeline_name(pipeline_name)} in the last 30 days")
    busy = [e for e in executions if e["status"] in RUNNING]
    if busy:
        raise OperationError(f"--resume-run {run_id}: execution {busy[-1]['arn']} of this run is "
                             f"{busy[-1]['status']}; a run has one execution at a time")
    target = on_demand_pipeline_name(pipeline_name) if capacity == ON_DEMAND else pipeline_name
    latest = executions[-1]
    if latest["status"] == "Succeeded":
        raise OperationError(f"--resume-run {run_id}: the run finished (execution {latest['arn']} Succeeded, its model "
                             "evaluated and registered); start a new run")
    run_started = latest["parameters"].get(RUN_STARTED_AT_PARAMETER) or executions[0]["started"].isoformat()
    values = {**latest["parameters"], **parameters, RUN_ID_PARAMETER: run_id, RUN_STARTED_AT_PARAMETER: run_started}
    try:
        return sagemaker.start_pipeline_execution(
            PipelineName=target, ClientRequestToken=str(uuid.uuid4()),
            PipelineExecutionDisplayName=f"{run_id}-{capacity}"[:82],
            PipelineExecutionDescription=f"Run {run_id} resumed by hand on {capacity} after {latest['arn']}",
            PipelineParameters=[{"Name": k, "Value": v} for k, v in sorted(values.items())])["PipelineExecutionArn"]
    except botocore.exceptions.ClientError as error:
        if error.response["Error"]["Code"] == "ResourceNotFound" and capacity == ON_DEMAND:
            raise OperationError(f"--capacity on-demand: no pipeline {target} (deploy with "
                                 "training.capacity_ladder=true)") from None
        raise


def approved_model_loss(sagemaker, s3, definition: Mapping[str, Any], parameters: Mapping[str, str], *,
                        warn: Callable[[str], None]) -> float | None:
    """The fine-tuned validation loss of the registry group's latest Approved model, when it is comparable with
    this run's: its evaluation report says it was evaluated on the same data (the report's data fingerprint is
    this start's DataFingerprint, and neither is missing or "unlisted") from the same base model at the same
    SequenceLength. The report is read, not the package's lineage properties: only the execution role writes
    reports, while UpdateModelPackage can rewrite CustomerMetadataProperties. Otherwise None, and `warn` says
    why (the gate then sets no limit)."""
    from spot_training.operations.models import describe

    groups = [s["Arguments"]["ModelPackageGroupName"] for s in _all_steps(definition["Steps"])
              if s.get("Type") == "RegisterModel"]
    if not groups:
        return None
    defaults = {p["Name"]: str(p.get("DefaultValue")) for p in definition.get("Parameters", [])}
    values = {**defaults, **parameters}
    mine = values.get(FINGERPRINT_PARAMETER)
    if mine in (None, "", NO_FINGERPRINT):
        warn(f"note: this run's data has no fingerprint ({FINGERPRINT_PARAMETER} is "
             f"{'absent: prepare_data is off' if mine is None else repr(mine)}), so no approved model can be shown to "
             "be evaluated on the same data; the gate compares with the base model only")
        return None
    found = sagemaker.list_model_packages(ModelPackageGroupName=groups[0], ModelApprovalStatus="Approved",
                                          SortBy="CreationTime", SortOrder="Descending", MaxResults=1)
    if not found["ModelPackageSummaryList"]:
        warn(f"note: {groups[0]} has no Approved model yet; the gate compares with the base model only")
        return None
    latest = describe(sagemaker, s3, found["ModelPackageSummaryList"][0]["ModelPackageArn"])
    if latest["fine_tuned_loss"] is None:
        warn(f"note: the latest Approved model ({latest['arn']}) is not compared: its evaluation report cannot be "
             f"read{' (' + latest['report_error'] + ')' if latest.get('report_error') else ''}; the gate compares "
             "with the base model only")
        return None
    mismatch = [name for name, theirs, ours in (
        ("data fingerprint", latest["report_data_fingerprint"], mine),
        ("base model", latest["report_base_model"], values.get("BaseModelUri")),
        ("sequence length", None if latest["sequence_length"] is None else str(latest["sequence_length"]),
         values.get("SequenceLength"))) if theirs in (None, "", NO_FINGERPRINT) or theirs != ours]
    if mismatch:
        warn(f"note: the latest Approved model ({latest['arn']}) is not compared: its evaluation report's "
             f"{' and '.join(mismatch)} {'differs' if len(mismatch) == 1 else 'differ'} from this run's or "
             f"{'is' if len(mismatch) == 1 else 'are'} missing; the gate compares with the base model only")
        return None
    return float(latest["fine_tuned_loss"])


def _all_steps(steps: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    out = []
    for step in steps:
        out.append(step)
        for branch in ("IfSteps", "ElseSteps"):
            out += _all_steps(step.get("Arguments", {}).get(branch, []))
    return out


# ---- state of a run ---------------------------------------------------------------------------------
def snapshot(sagemaker, arn: str) -> dict[str, Any]:
    """The execution, its steps, the training job behind its training step and, when the preparation step
    failed, its processing job (whose ExitMessage carries the preparation's one-line reason)."""
    execution = sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
    steps = sagemaker.list_pipeline_execution_steps(PipelineExecutionArn=arn, SortOrder="Ascending")[
        "PipelineExecutionSteps"]
    job = processing = evaluation = None
    for step in steps:
        metadata = step.get("Metadata", {})
        job_arn = metadata.get("TrainingJob", {}).get("Arn")
        if job_arn:
            job = sagemaker.describe_training_job(TrainingJobName=job_arn.rsplit("/", 1)[-1])
        processing_arn = metadata.get("ProcessingJob", {}).get("Arn")
        if processing_arn and step.get("StepStatus") == "Failed":
            processing = sagemaker.describe_processing_job(ProcessingJobName=processing_arn.rsplit("/", 1)[-1])
        elif processing_arn and step["StepName"] == EVALUATE_STEP and step.get("StepStatus") == "Succeeded":
            evaluation = sagemaker.describe_processing_job(ProcessingJobName=processing_arn.rsplit("/", 1)[-1])
    return {"execution": execution, "steps": steps, "job": job, "processing": processing, "evaluation": evaluation}


def step_outcome(step: Mapping[str, Any]) -> str:
    """What a finished gate, registration or fail step decided (ListPipelineExecutionSteps metadata)."""
    metadata = step.get("Metadata", {})
    if "Condition" in metadata and metadata["Condition"].get("Outcome"):
        passed = metadata["Condition"]["Outcome"] == "True"
        return f": outcome {metadata['Condition']['Outcome']}" + (
            " (the model goes on to registration)" if passed and step["StepName"] == GATE_STEP else
            " (the model is not registered)" if step["StepName"] == GATE_STEP else "")
    if metadata.get("RegisterModel", {}).get("Arn"):
        return f": registered {metadata['RegisterModel']['Arn']} (PendingManualApproval)"
    return ""


def evaluation_report(s3, evaluation_job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The Evaluate step's evaluation.json, read from its processing job's output."""
    if not evaluation_job:
        return None
    import botocore.exceptions

    outputs = evaluation_job.get("ProcessingOutputConfig", {}).get("Outputs", [])
    uri = next((o["S3Output"]["S3Uri"] for o in outputs if o["OutputName"] == "evaluation"), None)
    if uri is None:
        return None
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    key = f"{prefix.rstrip('/')}/evaluation.json"
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except botocore.exceptions.ClientError as error:
        return {"error": f"s3://{bucket}/{key}: {error.response.get('Error', {}).get('Code', 'error')}"}


def failure_reasons(state: Mapping[str, Any]) -> list[str]:
    reasons = [f"step {s['StepName']}: {s['FailureReason']}" for s in state["steps"] if s.get("FailureReason")]
    # A FailStep's message is its ErrorMessage (the gate's says both losses).
    reasons += [f"step {s['StepName']}: {s['Metadata']['Fail']['ErrorMessage']}" for s in state["steps"]
                if s.get("Metadata", {}).get("Fail", {}).get("ErrorMessage")
                and s["Metadata"]["Fail"]["ErrorMessage"] != s.get("FailureReason")]
    processing = state.get("processing")
    if processing:  # the container's own words first (/opt/ml/output/message -> ExitMessage), then SageMaker's
        for field in ("ExitMessage", "FailureReason"):
            if processing.get(field):
                reasons.append(f"processing job {processing['ProcessingJobName']}: {processing[field].strip()}")
    job = state["job"]
    if job and job.get("FailureReason"):
        reasons.append(f"training job {job['TrainingJobName']}: {job['FailureReason']}")
    if not reasons and state["execution"].get("FailureReason"):
        reasons.append(f"execution: {state['execution']['FailureReason']}")
    return reasons


def _seconds(value: Any) -> str:
    value = int(value or 0)
    return f"{value // 3600}h{value % 3600 // 60:02d}m{value % 60:02d}s"


def watch(sagemaker, arn: str, *, out: TextIO = sys.stdout, interval: float = 30.0, timeout: float | None = None,
          sleep: Callable[[float], None] = time.sleep, now: Callable[[], datetime.datetime] | None = None) -> int:
    """Follow a run until it ends: returns 0 when it succeeded, 1 when it failed or stopped."""
    now = now or (lambda: datetime.datetime.now(datetime.timezone.utc))
    seen_transitions, seen_steps, last_status = 0, {}, None
    started_watching = time.monotonic()
    live = out.isatty()
    while True:
        state = snapshot(sagemaker, arn)
        execution, job = state["execution"], state["job"]
        status = execution["PipelineExecutionStatus"]
        if status != last_status:
            _line(out, live, f"execution {arn.rsplit('/', 1)[-1]}: {status}")
            last_status = status
        for step in state["steps"]:
            if seen_steps.get(step["StepName"]) != step["StepStatus"]:
                seen_steps[step["StepName"]] = step["StepStatus"]
                attempts = f" (attempt {step['AttemptCount']})" if step.get("AttemptCount", 1) > 1 else ""
                # A step served by Pipelines step caching names the execution whose output it reuses
                # (PipelineExecutionStep.CacheHitResult, SageMaker API reference).
                source = step.get("CacheHitResult", {}).get("SourcePipelineExecutionArn")
                cached = f" (step cache: reuses the output of execution {source.rsplit('/', 1)[-1]})" if source else ""
                _line(out, live, f"step {step['StepName']}: {step['StepStatus']}{attempts}{cached}{step_outcome(step)}")
        if job:
            transitions = job.get("SecondaryStatusTransitions", [])
            for transition in transitions[seen_transitions:]:
                note = " <- spot interruption" if transition["Status"] == "Interrupted" else ""
                _line(out, live, f"training job {transition['Status']}: {transition.get('StatusMessage', '')}{note}")
            seen_transitions = len(transitions)
        elapsed = (now() - execution["CreationTime"]).total_seconds()
        progress = f"elapsed {_seconds(elapsed)}"
        if job:
            progress += (f", job {job['TrainingJobStatus']}/{job.get('SecondaryStatus', '-')}, training "
                         f"{_seconds(job.get('TrainingTimeInSeconds'))}, billable {_seconds(job.get('BillableTimeInSeconds'))}")
        if live:
            out.write(f"\r{progress}\033[K")
            out.flush()
        if status in TERMINAL:
            if live:
                out.write("\n")
            _line(out, False, progress)
            if status == "Succeeded":
                _line(out, False, "succeeded")
                return 0
            for reason in failure_reasons(state) or ["no reason reported"]:
                _line(out, False, f"FAILED: {reason}")
            return 1
        if timeout is not None and time.monotonic() - started_watching > timeout:
            raise OperationError(f"--timeout {timeout:g}: the execution is still {status}")
        sleep(interval)


def _line(out: TextIO, live: bool, text: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    out.write(("\r\033[K" if live else "") + f"[{stamp}] {text}\n")
    out.flush()


# ---- report -----------------------------------------------------------------------------------------
def load_prices(path: Path) -> dict[str, float]:
    prices = json.loads(path.read_text())
    return {k: float(v) for k, v in prices.items() if not k.startswith("_")}


def checkpoints_in_s3(s3, s3_uri: str) -> dict[str, datetime.datetime]:
    """Complete checkpoints (`step-N/COMPLETE.json`) under a checkpoint prefix, with their write times."""
    bucket, _, prefix = s3_uri.removeprefix("s3://").partition("/")
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            parts = item["Key"][len(prefix):].strip("/").split("/")
            if len(parts) == 2 and parts[0].startswith("step-") and parts[1] == "COMPLETE.json":
                found[parts[0]] = item["LastModified"]
    return dict(sorted(found.items(), key=lambda kv: int(kv[0].split("-")[1])))


def report(sagemaker, s3, arn: str, *, price_per_hour: float | None = None,
           prices: Mapping[str, float] | None = None) -> dict[str, Any]:
    state = snapshot(sagemaker, arn)
    execution, job = state["execution"], state["job"]
    if job is None:
        raise OperationError(f"{arn}: no training job yet (execution is {execution['PipelineExecutionStatus']})")
    training, billable = job.get("TrainingTimeInSeconds", 0), job.get("BillableTimeInSeconds", 0)
    spot = job.get("EnableManagedSpotTraining", False)
    resource = job["ResourceConfig"]
    price = price_per_hour if price_per_hour is not None else (prices or {}).get(resource["InstanceType"])
    checkpoint_uri = job.get("CheckpointConfig", {}).get("S3Uri")
    checkpoints = checkpoints_in_s3(s3, checkpoint_uri) if checkpoint_uri else {}
    transitions = job.get("SecondaryStatusTransitions", [])
    result = {
        "execution_arn": arn, "status": execution["PipelineExecutionStatus"],
        "training_job": job["TrainingJobName"], "instance_type": resource["InstanceType"],
        "instance_count": resource["InstanceCount"], "managed_spot": spot,
        "training_seconds": training, "billable_seconds": billable,
        "spot_savings_percent": round((1 - billable / training) * 100, 1) if spot and training else 0.0,
        "interruptions": sum(t["Status"] == "Interrupted" for t in transitions),
        "checkpoints": list(checkpoints),
        "price_per_instance_hour": price,
        "estimated_cost": round(price * resource["InstanceCount"] * billable / 3600, 2) if price is not None else None,
        "on_demand_equivalent_cost": (round(price * resource["InstanceCount"] * training / 3600, 2)
                                      if price is not None else None),
        "failure_reasons": failure_reasons(state) if execution["PipelineExecutionStatus"] != "Succeeded" else [],
        "evaluation": evaluation_report(s3, state.get("evaluation")),
        "gate": next((s["Metadata"]["Condition"].get("Outcome") for s in state["steps"]
                      if s["StepName"] == GATE_STEP and "Condition" in s.get("Metadata", {})), None),
        "model_package": next((s["Metadata"]["RegisterModel"]["Arn"] for s in state["steps"]
                               if s.get("Metadata", {}).get("RegisterModel", {}).get("Arn")), None),
    }
    result["_timeline"] = {"transitions": transitions, "checkpoints": checkpoints}
    return result


def report_text(result: Mapping[str, Any]) -> str:
    cost = (f"${result['estimated_cost']:,.2f} (on-demand would be ${result['on_demand_equivalent_cost']:,.2f}, "
            f"at ${result['price_per_instance_hour']:g}/instance-hour)" if result["estimated_cost"] is not None
            else "unknown: pass --price-per-hour or add the instance type to the price file")
    lines = [
        f"run {result['execution_arn'].rsplit('/', 1)[-1]}: {result['status']}",
        f"  training job {result['training_job']}: {result['instance_count']} x {result['instance_type']}, "
        f"managed spot {'on' if result['managed_spot'] else 'off'}",
        f"  training {_seconds(result['training_seconds'])}, billable {_seconds(result['billable_seconds'])}, "
        f"spot savings {result['spot_savings_percent']:.1f}%",
        f"  interruptions: {result['interruptions']}",
        f"  complete checkpoints in S3: {', '.join(result['checkpoints']) or 'none'}",
        f"  estimated cost: {cost}",
    ]
    evaluation = result.get("evaluation")
    if evaluation and "metrics" in evaluation:
        base, tuned = evaluation["metrics"]["base"], evaluation["metrics"]["fine_tuned"]
        lines.append(f"  evaluation: fine-tuned loss {tuned['loss']:.6f} (perplexity {tuned['perplexity']:.3f}) vs base "
                     f"{base['loss']:.6f} (perplexity {base['perplexity']:.3f}), improvement "
                     f"{evaluation['improvement']:.6f}, {evaluation['tokens']:,} tokens ({evaluation['data']['source']})")
    elif evaluation:
        lines.append(f"  evaluation: report unreadable: {evaluation['error']}")
    if result.get("gate") is not None:
        lines.append(f"  gate: {'passed' if result['gate'] == 'True' else 'refused'}"
                     + (f"; registered {result['model_package']} (PendingManualApproval)" if result.get("model_package")
                        else ""))
    lines += [f"  FAILED: {reason}" for reason in result["failure_reasons"]]
    return "\n".join(lines)


CAPACITY_WAIT_STATUSES = ("Pending", "Starting")  # SecondaryStatus: waiting for compute capacity, then launching it


def capacity_wait_seconds(job: Mapping[str, Any], now: datetime.datetime) -> float:
    """Time the training job spent Pending (waiting for compute capacity, in the SecondaryStatus docs) or Starting
    (instances found and launched; after each interruption too), from its SecondaryStatusTransitions; an interval
    still open ends at the job's end, else `now`. A job that never got capacity spent its whole MaxWait there."""
    total = 0.0
    for transition in job.get("SecondaryStatusTransitions", []):
        if transition["Status"] in CAPACITY_WAIT_STATUSES:
            end = transition.get("EndTime") or job.get("TrainingEndTime") or now
            total += (end - transition["StartTime"]).total_seconds()
    return total


def run_report(sagemaker, pipeline_name: str, run_id: str, *, price_per_hour: float | None = None,
               prices: Mapping[str, float] | None = None, now: datetime.datetime | None = None) -> dict[str, Any]:
    """Each execution of run `run_id` (config.capacity) in the construct's pipelines, oldest first: its rung, status,
    time waiting for capacity, training and billable time and cost; and the run's totals, with the realized savings
    against the same training time on demand, (1 - billable / training) x 100 over every execution."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    executions = run_executions(sagemaker, pipeline_name, run_id, now=now)
    if not executions:
        raise OperationError(f"--run {run_id}: no execution of this run in {pipeline_name} or "
                             f"{on_demand_pipeline_name(pipeline_name)} in the last 30 days")
    rows = []
    for execution in executions:
        state = snapshot(sagemaker, execution["arn"])
        job = state["job"] or {}
        resource = job.get("ResourceConfig", {})
        instance_type = resource.get("InstanceType") or execution["parameters"].get("InstanceType", "?")
        count = resource.get("InstanceCount", 0)
        price = price_per_hour if price_per_hour is not None else (prices or {}).get(instance_type)
        training, billable = job.get("TrainingTimeInSeconds", 0), job.get("BillableTimeInSeconds", 0)
        rows.append({
            "execution_arn": execution["arn"], "status": state["execution"]["PipelineExecutionStatus"],
            "rung": f"{execution['capacity']}:{instance_type}", "training_job": job.get("TrainingJobName"),
            "instance_count": count, "capacity_wait_seconds": round(capacity_wait_seconds(job, now)),
            "training_seconds": training, "billable_seconds": billable,
            "interruptions": sum(t["Status"] == "Interrupted" for t in job.get("SecondaryStatusTransitions", [])),
            "ended_because": job.get("SecondaryStatus") if job.get("TrainingJobStatus") in ("Failed", "Stopped") else None,
            "cost": round(price * count * billable / 3600, 2) if price is not None else None,
            "on_demand_cost": round(price * count * training / 3600, 2) if price is not None else None})
    training = sum(r["training_seconds"] for r in rows)
    billable = sum(r["billable_seconds"] for r in rows)
    priced = all(r["cost"] is not None for r in rows)
    return {"run": run_id, "executions": rows, "status": rows[-1]["status"],
            "capacity_wait_seconds": sum(r["capacity_wait_seconds"] for r in rows),
            "training_seconds": training, "billable_seconds": billable,
            "savings_percent": round((1 - billable / training) * 100, 1) if training else 0.0,
            "cost": round(sum(r["cost"] for r in rows), 2) if priced else None,
            "on_demand_cost": round(sum(r["on_demand_cost"] for r in rows), 2) if priced else None}


def run_report_text(result: Mapping[str, Any]) -> str:
    lines = [f"run {result['run']}: {len(result['executions'])} execution(s), {result['status']}"]
    for number, row in enumerate(result["executions"], start=1):
        cost = f", ${row['cost']:,.2f}" if row["cost"] is not None else ""
        ended = f", ended {row['ended_because']}" if row["ended_because"] else ""
        lines.append(f"  {number}. {row['rung']} ({row['instance_count']} instances): {row['status']}{ended}; waited "
                     f"{_seconds(row['capacity_wait_seconds'])} for capacity, training {_seconds(row['training_seconds'])}, "
                     f"billable {_seconds(row['billable_seconds'])}, interruptions {row['interruptions']}{cost}")
        lines.append(f"     {row['execution_arn']}")
    cost = (f"; ${result['cost']:,.2f} against ${result['on_demand_cost']:,.2f} on demand"
            if result["cost"] is not None else "; cost unknown: pass --price-per-hour or add the types to the price file")
    lines.append(f"  total: waited {_seconds(result['capacity_wait_seconds'])} for capacity, training "
                 f"{_seconds(result['training_seconds'])}, billable {_seconds(result['billable_seconds'])}, realized "
                 f"savings {result['savings_percent']:.1f}% against on-demand{cost}")
    return "\n".join(lines)


def timeline_chart(result: Mapping[str, Any], path: Path) -> None:
    """A PNG timeline: secondary statuses as bars, interruptions and complete checkpoints as marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transitions = result["_timeline"]["transitions"]
    if not transitions:
        raise OperationError("--chart: the training job has no status transitions to draw yet")
    colours = {"Training": "tab:green", "Interrupted": "tab:red", "Downloading": "tab:blue",
               "Uploading": "tab:purple", "Starting": "tab:gray", "Restarting": "tab:orange"}
    figure, axis = plt.subplots(figsize=(11, 3))
    for t in transitions:
        end = t.get("EndTime") or t["StartTime"]
        axis.barh(0, (end - t["StartTime"]).total_seconds() / 3600 or 0.01,
                  left=(t["StartTime"] - transitions[0]["StartTime"]).total_seconds() / 3600,
                  color=colours.get(t["Status"], "tab:olive"), edgecolor="black", label=t["Status"])
    for name, written in result["_timeline"]["checkpoints"].items():
        axis.axvline((written - transitions[0]["StartTime"]).total_seconds() / 3600, color="black", linestyle=":")
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), loc="upper center", ncol=len(unique), bbox_to_anchor=(0.5, -0.35))
    axis.set_yticks([])
    axis.set_xlabel("hours since the job started (dotted: complete checkpoints)")
    axis.set_title(f"{result['training_job']}: {result['interruptions']} interruption(s), "
                   f"spot savings {result['spot_savings_percent']:.1f}%")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
