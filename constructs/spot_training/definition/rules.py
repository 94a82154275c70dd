"""Checks a generated pipeline definition before it can be deployed.

Neither cfn-lint nor checkov looks inside a pipeline body: a bogus instance type or MaxWait below
MaxRuntime passes both and fails only when a run starts. So every TrainingStep is checked here against
botocore's `CreateTrainingJob` input shape (types, required and unknown keys, enums, lengths, ranges,
patterns; botocore's own ParamValidator skips the last four) and against the platform's own rules.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import botocore.session

from spot_training.config.capacity import resolve_run, run_started_at

MAX_DEFINITION_CHARACTERS = 1_048_576  # CreatePipeline PipelineDefinition length limit
MAX_RUNTIME_SECONDS = 28 * 24 * 3600  # StoppingCondition.MaxRuntimeInSeconds service limit (not in botocore)
EXECUTION_ID_STAND_IN = "validation0exec"
EVALUATE_STEP = "Evaluate"  # definition.build.EVALUATE_STEP_NAME (build imports this module, not the reverse)
PREPARE_STEP = "PrepareData"  # definition.build.PREPARE_STEP_NAME
# The Lambda step that names the run (config.capacity.resolve_run) and its output, the checkpoints' key.
RESOLVE_RUN_STEP, RUN_OUTPUT = "ResolveRun", "RunId"
_RETRYABLE_JOB_ERRORS = ("SageMaker.CAPACITY_ERROR", "SageMaker.RESOURCE_LIMIT", "SageMaker.JOB_INTERNAL_ERROR")


@dataclasses.dataclass(frozen=True)
class Violation:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Expectations:
    """What the definition must say, from the platform's configuration."""

    use_spot: bool
    network_isolation: bool
    inter_container_encryption: bool
    volume_encryption: bool
    # The preparation step's volume key: required (True), rejected (False), or no preparation step (None).
    preparation_volume_encryption: bool | None = None
    # The same for the evaluation step; with it, the gate and the registration are expected too.
    evaluation_volume_encryption: bool | None = None


def training_job_stand_in(step_name: str) -> str:
    """The name Pipelines would give the training job of `step_name` in the stand-in execution (job names are
    pipelines-<execution id>-<step>-<random>, lower case)."""
    return f"pipelines-{EXECUTION_ID_STAND_IN}-{step_name}-a1b2c3d4e5".lower()


def resolve(definition: Mapping[str, Any], properties: Mapping[str, Any] | None = None,
            property_files: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The definition as one run with default parameters would see it: `Get` and `Std:Join` evaluated, a
    processing step's output location included (`Steps.<step>.ProcessingOutputConfig.Outputs['<name>']...`), and
    a training step's job name, model location (`ModelArtifacts.S3ModelArtifacts`: the uncompressed model under
    `<S3OutputPath>/<job>/output/model/`) and times as a job of the stand-in execution would have them.
    `properties` replace any of those (`Steps.<step>.<property>` -> value); `Std:JsonGet` reads
    `property_files` (`Steps.<step>.PropertyFiles.<name>` -> the parsed file) and is left as is without it."""
    defaults = {p["Name"]: p.get("DefaultValue") for p in definition.get("Parameters", [])}
    known: dict[str, Any] = {
        f"Steps.{step['Name']}.ProcessingOutputConfig.Outputs['{out['OutputName']}'].S3Output.S3Uri":
        out["S3Output"]["S3Uri"]
        for step in all_steps(definition) if step.get("Type") == "Processing"
        for out in step["Arguments"].get("ProcessingOutputConfig", {}).get("Outputs", [])}
    for step in all_steps(definition):
        if step.get("Type") == "Training":
            job, where = training_job_stand_in(step["Name"]), f"Steps.{step['Name']}."
            output = step["Arguments"].get("OutputDataConfig", {}).get("S3OutputPath", "s3://stand-in/")
            known[where + "TrainingJobName"] = job
            known[where + "ModelArtifacts.S3ModelArtifacts"] = {"Std:Join": {"On": "", "Values": [
                output, "/" if not isinstance(output, str) or not output.endswith("/") else "", job, "/output/model/"]}}
            known[where + "TrainingTimeInSeconds"] = known[where + "BillableTimeInSeconds"] = 3600

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"Get"}:
                ref = node["Get"]
                if ref.startswith("Parameters."):
                    return defaults[ref.removeprefix("Parameters.")]
                if ref in known:
                    return walk(known[ref])
                return EXECUTION_ID_STAND_IN if ref == "Execution.PipelineExecutionId" else f"<{ref}>"
            if set(node) == {"Std:Join"}:
                join = node["Std:Join"]
                return join["On"].join(str(walk(v)) for v in join["Values"])
            if set(node) == {"Std:JsonGet"} and property_files is not None:
                return json_get(property_files, node["Std:JsonGet"])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    for step in all_steps(definition):  # the run identity, as the ResolveRun function computes it
        if step.get("Type") == "Lambda" and step["Name"] == RESOLVE_RUN_STEP:
            arguments = walk(step["Arguments"])
            run_started_at(arguments.get("run_started_at"))
            known[f"Steps.{step['Name']}.OutputParameters['{RUN_OUTPUT}']"] = resolve_run(
                arguments.get("run_id"), arguments["execution_id"])
    known.update(properties or {})
    return walk(definition)


class PropertyFileError(KeyError):
    """A `Std:JsonGet` whose file or path is missing: Pipelines fails the step that reads it."""


def json_get(property_files: Mapping[str, Any], expression: Mapping[str, Any]) -> Any:
    """`Std:JsonGet` as Pipelines evaluates it on a property file: a dotted JsonPath (`metrics.base.loss`)."""
    name = expression["PropertyFile"]["Get"] if isinstance(expression["PropertyFile"], dict) else \
        expression["PropertyFile"]
    if name not in property_files:
        raise PropertyFileError(f"{name}: no such property file (its step did not run or wrote no file)")
    value: Any = property_files[name]
    for part in expression["Path"].split("."):
        if not isinstance(value, dict) or part not in value:
            raise PropertyFileError(f"{name}: no {expression['Path']!r} in the file")
        value = value[part]
    return value


def evaluate_conditions(conditions: list[Mapping[str, Any]]) -> bool:
    """A resolved ConditionStep's conditions (all must hold), for the comparison types this pipeline uses."""
    compare = {"GreaterThan": lambda a, b: a > b, "GreaterThanOrEqualTo": lambda a, b: a >= b,
               "LessThan": lambda a, b: a < b, "LessThanOrEqualTo": lambda a, b: a <= b,
               "Equals": lambda a, b: a == b}
    return all(compare[c["Type"]](float(c["LeftValue"]), float(c["RightValue"])) for c in conditions)


def all_steps(definition: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every step, including those nested in condition steps' branches."""
    found = []
    for step in definition["Steps"]:
        found.append(step)
        if step["Type"] == "Condition":
            branches = step["Arguments"]
            found += all_steps({"Steps": branches.get("IfSteps", []) + branches.get("ElseSteps", [])})
    return found


def check(definition: Mapping[str, Any], expect: Expectations) -> list[Violation]:
    """Every violation in `definition` (unresolved, as generated); empty when it is deployable."""
    violations = []
    size = len(json.dumps(definition))
    if size > MAX_DEFINITION_CHARACTERS:
        violations.append(Violation("PipelineDefinition", f"{size} characters; CreatePipeline accepts at "
                                    f"most {MAX_DEFINITION_CHARACTERS}"))
    resolved = resolve(definition)
    training_steps = [s for s in all_steps(resolved) if s.get("Type") == "Training"]
    if not training_steps:
        violations.append(Violation("Steps", "no Training step"))
    for step in training_steps:
        where = f"Steps[{step['Name']}]"
        # Pipelines drop TrainingJobName and name the job themselves; the API still requires one.
        arguments = {"TrainingJobName": "pipelines-validation", **step["Arguments"]}
        violations += [Violation(f"{where}.Arguments.{v.field}", v.message)
                       for v in check_shape(arguments, _create_training_job_shape())]
        violations += [Violation(f"{where}.{v.field}", v.message) for v in _own_rules(step, expect)]
    processing_steps = [s for s in all_steps(resolved) if s.get("Type") == "Processing"]
    if expect.preparation_volume_encryption is not None and PREPARE_STEP not in {s["Name"] for s in processing_steps}:
        violations.append(Violation("Steps", f"no {PREPARE_STEP} Processing step (the data preparation is configured)"))
    for step in processing_steps:
        where = f"Steps[{step['Name']}]"
        arguments = {"ProcessingJobName": "pipelines-validation", **step["Arguments"]}
        violations += [Violation(f"{where}.Arguments.{v.field}", v.message)
                       for v in check_shape(arguments, operation_shape("CreateProcessingJob"))]
        volume = expect.evaluation_volume_encryption if step["Name"] == EVALUATE_STEP else \
            expect.preparation_volume_encryption
        violations += [Violation(f"{where}.{v.field}", v.message) for v in _processing_rules(step, volume, expect)]
    names = {s["Name"] for s in processing_steps}
    registrations = [s for s in all_steps(resolved) if s.get("Type") == "RegisterModel"]
    if expect.evaluation_volume_encryption is not None and (EVALUATE_STEP not in names or not registrations):
        violations.append(Violation("Steps", f"no {EVALUATE_STEP} step and registration (the evaluation is configured)"))
    for step in registrations:
        where = f"Steps[{step['Name']}]"
        violations += [Violation(f"{where}.Arguments.{v.field}", v.message)
                       for v in check_shape(step["Arguments"], operation_shape("CreateModelPackage"))]
        status = step["Arguments"].get("ModelApprovalStatus")
        if status != "PendingManualApproval":
            violations.append(Violation(f"{where}.Arguments.ModelApprovalStatus", f"is {status!r}: a pipeline registers "
                                        "PendingManualApproval only; a reviewer approves"))
    return violations


def operation_shape(operation: str) -> Any:
    return botocore.session.get_session().get_service_model("sagemaker").operation_model(operation).input_shape


def _processing_rules(step: Mapping[str, Any], volume_encryption: bool | None,
                      expect: Expectations) -> list[Violation]:
    """The preparation and evaluation steps run like training: private subnets, isolation and encryption as
    configured, KMS."""
    args, out = step["Arguments"], []
    out += _network_rules(args.get("NetworkConfig", {}), "Arguments.NetworkConfig.", expect,
                          "the step runs in the training subnets")
    if not args.get("ProcessingOutputConfig", {}).get("KmsKeyId"):
        out.append(Violation("Arguments.ProcessingOutputConfig.KmsKeyId", "is required: outputs are KMS-encrypted"))
    volume_key = args.get("ProcessingResources", {}).get("ClusterConfig", {}).get("VolumeKmsKeyId")
    if volume_encryption and not volume_key:
        out.append(Violation("Arguments.ProcessingResources.ClusterConfig.VolumeKmsKeyId",
                             "is required for this instance type"))
    if "MaxRuntimeInSeconds" not in args.get("StoppingCondition", {}):
        out.append(Violation("Arguments.StoppingCondition.MaxRuntimeInSeconds", "is required: it caps the cost"))
    return out


def _create_training_job_shape() -> Any:
    return operation_shape("CreateTrainingJob")


def check_shape(value: Any, shape: Any, path: str = "") -> list[Violation]:
    """Walk `value` against a botocore shape, checking what ParamValidator does and what it skips."""
    here = path or shape.name
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [Violation(here, f"must be an object, got {type(value).__name__}")]
        out = [Violation(_join(path, name), "is required") for name in shape.required_members
               if name not in value]
        for name, item in value.items():
            if name not in shape.members:
                out.append(Violation(_join(path, name), f"unknown field of {shape.name}"))
            else:
                out += check_shape(item, shape.members[name], _join(path, name))
        return out
    if kind == "list":
        if not isinstance(value, list):
            return [Violation(here, f"must be a list, got {type(value).__name__}")]
        out = _length(here, len(value), shape.metadata, "items")
        for i, item in enumerate(value):
            out += check_shape(item, shape.member, f"{here}[{i}]")
        return out
    if kind == "map":
        if not isinstance(value, dict):
            return [Violation(here, f"must be an object, got {type(value).__name__}")]
        out = _length(here, len(value), shape.metadata, "entries")
        for key, item in value.items():
            out += check_shape(key, shape.key, f"{here} key {key!r}")
            out += check_shape(item, shape.value, f"{here}.{key}")
        return out
    if kind == "string":
        if not isinstance(value, str):
            return [Violation(here, f"must be a string, got {type(value).__name__} {value!r}")]
        if shape.enum and value not in shape.enum:
            return [Violation(here, f"{value!r} is not one of the {len(shape.enum)} values of {shape.name}")]
        out = _length(here, len(value), shape.metadata, "characters")
        pattern = shape.metadata.get("pattern")
        if pattern and not _full_match(pattern, value):
            out.append(Violation(here, f"{value!r} does not match {pattern}"))
        return out
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            return [Violation(here, f"must be an integer, got {value!r}")]
        return _range(here, value, shape.metadata)
    if kind in ("float", "double"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [Violation(here, f"must be a number, got {value!r}")]
        return _range(here, value, shape.metadata)
    if kind == "boolean" and not isinstance(value, bool):
        return [Violation(here, f"must be true or false, got {value!r}")]
    return []


def _own_rules(step: Mapping[str, Any], expect: Expectations) -> list[Violation]:
    args = step["Arguments"]
    out = []
    stopping = args.get("StoppingCondition", {})
    spot = args.get("EnableManagedSpotTraining", False)
    if spot != expect.use_spot:
        out.append(Violation("Arguments.EnableManagedSpotTraining", f"is {spot}, configured {expect.use_spot}"))
    if spot:
        checkpoint = args.get("CheckpointConfig", {})
        if not checkpoint.get("S3Uri"):
            out.append(Violation("Arguments.CheckpointConfig.S3Uri",
                                 "managed spot needs a checkpoint location, or interruptions restart from zero"))
        elif not checkpoint["S3Uri"].endswith("/") or EXECUTION_ID_STAND_IN not in checkpoint["S3Uri"]:
            # Without the trailing slash a restore of run-1 also pulls run-10 (S3 prefix semantics).
            out.append(Violation("Arguments.CheckpointConfig.S3Uri",
                                 f"{checkpoint['S3Uri']!r} must be keyed on the run ({RESOLVE_RUN_STEP}'s {RUN_OUTPUT}, the "
                                 "execution id unless RunId is given) and end with '/'"))
        if checkpoint.get("LocalPath", "/opt/ml/checkpoints") != "/opt/ml/checkpoints":
            out.append(Violation("Arguments.CheckpointConfig.LocalPath",
                                 f"{checkpoint['LocalPath']!r}: the trainer saves to /opt/ml/checkpoints"))
        max_wait, max_run = stopping.get("MaxWaitTimeInSeconds"), stopping.get("MaxRuntimeInSeconds")
        if max_wait is None:
            out.append(Violation("Arguments.StoppingCondition.MaxWaitTimeInSeconds", "is required with managed spot"))
        elif max_run is not None and max_wait < max_run:
            out.append(Violation("Arguments.StoppingCondition.MaxWaitTimeInSeconds",
                                 f"{max_wait} is below MaxRuntimeInSeconds ({max_run})"))
    elif "MaxWaitTimeInSeconds" in stopping:
        out.append(Violation("Arguments.StoppingCondition.MaxWaitTimeInSeconds",
                             "must be absent without managed spot (sagemaker-python-sdk#4140)"))
    if "MaxRuntimeInSeconds" not in stopping:
        out.append(Violation("Arguments.StoppingCondition.MaxRuntimeInSeconds", "is required: it caps the cost of a run"))
    elif stopping["MaxRuntimeInSeconds"] > MAX_RUNTIME_SECONDS:
        out.append(Violation("Arguments.StoppingCondition.MaxRuntimeInSeconds",
                             f"{stopping['MaxRuntimeInSeconds']} is above SageMaker's 28-day limit ({MAX_RUNTIME_SECONDS})"))
    out += _network_rules(args, "Arguments.", expect, "training runs in private subnets")
    if not args.get("OutputDataConfig", {}).get("KmsKeyId"):
        out.append(Violation("Arguments.OutputDataConfig.KmsKeyId", "is required: outputs are KMS-encrypted"))
    volume_key = args.get("ResourceConfig", {}).get("VolumeKmsKeyId")
    if expect.volume_encryption and not volume_key:
        out.append(Violation("Arguments.ResourceConfig.VolumeKmsKeyId", "is required for this instance type"))
    if not expect.volume_encryption and volume_key:
        out.append(Violation("Arguments.ResourceConfig.VolumeKmsKeyId", "is rejected by SageMaker for instance "
                             "types with local NVMe storage"))
    retried = {e for policy in step.get("RetryPolicies", []) for e in policy.get("ExceptionType", [])}
    missing = [e for e in _RETRYABLE_JOB_ERRORS if e not in retried]
    if missing:
        out.append(Violation("RetryPolicies", f"must retry {', '.join(missing)}"))
    return out


def _network_rules(holder: Mapping[str, Any], path: str, expect: Expectations, why: str) -> list[Violation]:
    """VpcConfig, EnableNetworkIsolation and EnableInterContainerTrafficEncryption of a job request: at the top
    of CreateTrainingJob, under NetworkConfig in CreateProcessingJob (`holder`, at `path`)."""
    out = []
    vpc = holder.get("VpcConfig", {})
    if not vpc.get("Subnets") or not vpc.get("SecurityGroupIds"):
        out.append(Violation(f"{path}VpcConfig", f"subnets and security groups are required: {why}"))
    for flag, wanted in (("EnableNetworkIsolation", expect.network_isolation),
                         ("EnableInterContainerTrafficEncryption", expect.inter_container_encryption)):
        if holder.get(flag, False) != wanted:
            out.append(Violation(f"{path}{flag}", f"is {holder.get(flag, False)}, configured {wanted}"))
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _length(where: str, n: int, meta: Mapping[str, Any], unit: str) -> list[Violation]:
    if "min" in meta and n < meta["min"]:
        return [Violation(where, f"{n} {unit}, at least {meta['min']} allowed")]
    if "max" in meta and n > meta["max"]:
        return [Violation(where, f"{n} {unit}, at most {meta['max']} allowed")]
    return []


def _range(where: str, value: float, meta: Mapping[str, Any]) -> list[Violation]:
    if "min" in meta and value < meta["min"]:
        return [Violation(where, f"{value} is below the minimum {meta['min']}")]
    if "max" in meta and value > meta["max"]:
        return [Violation(where, f"{value} is above the maximum {meta['max']}")]
    return []


def _full_match(pattern: str, value: str) -> bool:
    try:
        return re.fullmatch(pattern.removeprefix("^").removesuffix("$"), value, re.DOTALL) is not None
    except re.error:  # a Java-only construct botocore copies from the service model: not ours to judge
        return True
