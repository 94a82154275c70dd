"""After training, the definition's Evaluate step, its gate and its registration, as one execution runs them.

The Evaluate step runs like the preparation step (processing.run_processing), reading the model the training
step uploaded. Its `evaluation.json` is the step's property file: the definition is resolved again with it,
the gate's conditions are evaluated as Pipelines evaluates them (`Std:JsonGet`, then the comparison), and
either the registration's CreateModelPackage request (the RegisterModel step's resolved arguments, checked
against botocore's input shape) is written to `registration-request.json`, or the FailStep's message is the
outcome. Nothing is sent to AWS.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spot_training.local.jobs import EXECUTION_ID, LOCAL_BUCKET, LocalRunError, ProcessingJob, with_overrides
from spot_training.local.processing import run_processing
from spot_training.local.storage import LocalS3, write_json

REGISTRATION_FILE = "registration-request.json"
LOCAL_TRAINING_JOB = f"pipelines-{EXECUTION_ID}-train-local"


def has_evaluation(definition: Mapping[str, Any]) -> bool:
    from spot_training.definition.build import EVALUATE_STEP_NAME
    from spot_training.definition.rules import all_steps

    return any(s["Name"] == EVALUATE_STEP_NAME for s in all_steps(definition))


def training_properties(model_uri: str, training_seconds: int) -> dict[str, Any]:
    """What DescribeTrainingJob would say of the local training job (`Steps.Train.*`); without spot billing,
    billable time is training time."""
    from spot_training.definition.build import TRAINING_STEP_NAME

    where = f"Steps.{TRAINING_STEP_NAME}."
    return {where + "ModelArtifacts.S3ModelArtifacts": model_uri, where + "TrainingJobName": LOCAL_TRAINING_JOB,
            where + "TrainingTimeInSeconds": training_seconds, where + "BillableTimeInSeconds": training_seconds}


def evaluate_and_gate(definition: Mapping[str, Any], values: Mapping[str, Any], properties: Mapping[str, Any], *,
                      s3: LocalS3, out: Path, logs: Path, running: Callable[[list[subprocess.Popen]], None],
                      stop: Callable[[], None]) -> dict[str, Any]:
    from spot_training.definition import build as sdk
    from spot_training.definition.rules import PropertyFileError, all_steps, check_shape, operation_shape

    started = time.monotonic()
    job = ProcessingJob.from_definition(with_overrides(definition, values, properties=properties),
                                        sdk.EVALUATE_STEP_NAME)
    run_processing(job, s3=s3, root=out / "evaluation", log_path=logs / "evaluate.log", running=running, stop=stop)
    report_path = s3.path(job.outputs["evaluation"][1]) / sdk.EVALUATION_REPORT
    if not report_path.is_file():
        raise LocalRunError(f"the {job.name} step wrote no {sdk.EVALUATION_REPORT}; log: {logs / 'evaluate.log'}")
    report = json.loads(report_path.read_text())
    try:
        passed, resolved = gate_branch(definition, values, properties, report)
    except PropertyFileError as error:
        raise LocalRunError(f"the {sdk.GATE_STEP_NAME} step failed: {error}") from None
    steps = {s["Name"]: s for s in all_steps(resolved)}
    gate = steps[sdk.GATE_STEP_NAME]
    outcome: dict[str, Any] = {"step": job.name, "seconds": round(time.monotonic() - started, 2),
                               "evaluation": report, "evaluation_s3_uri": job.outputs["evaluation"][1],
                               "gate": {"step": gate["Name"], "passed": passed}}
    registration = out / REGISTRATION_FILE
    registration.unlink(missing_ok=True)
    if passed:
        request = steps[sdk.REGISTRATION_STEP]["Arguments"]
        violations = check_shape(request, operation_shape("CreateModelPackage"))
        if violations:
            raise LocalRunError(f"the {sdk.REGISTRATION_STEP} request does not fit CreateModelPackage: {violations[0]}")
        write_json(registration, request)
        outcome["registration_request"] = str(registration)
        outcome["gate"]["next"] = sdk.REGISTRATION_STEP
    else:
        outcome["gate"]["next"] = sdk.GATE_FAIL_STEP_NAME
        outcome["gate"]["message"] = steps[sdk.GATE_FAIL_STEP_NAME]["Arguments"]["ErrorMessage"]
    return outcome


def gate_branch(definition: Mapping[str, Any], values: Mapping[str, Any], properties: Mapping[str, Any],
                report: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    """The gate as Pipelines runs it on the evaluation report: its conditions first, then only the branch taken
    is resolved (a JsonGet in the branch not taken is never read, so a report it does not fit cannot fail the
    run). Returns whether the gate passed and the definition resolved along that branch."""
    from spot_training.definition import build as sdk
    from spot_training.definition.rules import all_steps, evaluate_conditions

    files = {f"Steps.{sdk.EVALUATE_STEP_NAME}.PropertyFiles.{sdk.EVALUATION_PROPERTY_FILE}": report}
    conditions = next(s for s in all_steps(with_overrides(
        only_branch(definition, sdk.GATE_STEP_NAME, None), values, properties=properties, property_files=files))
        if s["Name"] == sdk.GATE_STEP_NAME)["Arguments"]["Conditions"]
    passed = evaluate_conditions(conditions)
    return passed, with_overrides(only_branch(definition, sdk.GATE_STEP_NAME, "IfSteps" if passed else "ElseSteps"),
                                  values, properties=properties, property_files=files)


def only_branch(definition: Mapping[str, Any], step: str, keep: str | None) -> dict[str, Any]:
    """A copy of `definition` whose ConditionStep `step` keeps only its `keep` branch ("IfSteps" or
    "ElseSteps"; None: neither)."""
    copy = json.loads(json.dumps(definition))

    def prune(steps: list[dict[str, Any]]) -> None:
        for candidate in steps:
            arguments = candidate.get("Arguments", {})
            for branch in ("IfSteps", "ElseSteps"):
                if candidate["Name"] == step and branch != keep:
                    arguments[branch] = []
                prune(arguments.get(branch, []))
    prune(copy["Steps"])
    return copy


def model_uri() -> str:
    """Where the local run uploads the model (the training step's ModelArtifacts.S3ModelArtifacts)."""
    return f"s3://{LOCAL_BUCKET}/outputs/{EXECUTION_ID}/output/model/"


def evaluation_text(outcome: Mapping[str, Any]) -> list[str]:
    report, gate = outcome["evaluation"], outcome["gate"]
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    lines = [f"  {outcome['step']}: base loss {base['loss']:.6f} (perplexity {base['perplexity']:.3f}), fine-tuned "
             f"loss {tuned['loss']:.6f} (perplexity {tuned['perplexity']:.3f}) on {report['sequences']} sequences, "
             f"{report['tokens']:,} tokens ({report['data']['source']})"]
    if gate["passed"]:
        lines.append(f"  {gate['step']}: passed (improvement {report['improvement']:.6f}); {gate['next']} would send "
                     f"CreateModelPackage: {outcome['registration_request']}")
    else:
        lines.append(f"  {gate['step']}: refused, {gate['next']}: {gate['message']}")
    return lines

