"""The jobs of one local execution, read from the pipeline definition `cdk synth` builds, and the attempts
that run them (an attempt ends with the job, an emulated interruption or a stop of local-run)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spot_training.config.capacity import RunIdError
from spot_training.config.layout import CHECKPOINT_LOCAL_PATH
from spot_training.config.settings import TrainingConfig

LOCAL_BUCKET = "local-artifact-bucket"
LOCAL_ASSET_BUCKET, LOCAL_CODE_KEY = "local-cdk-assets", "trainer.tar.gz"  # CDK asset keys have no "/"
EXECUTION_ID = "local-execution"
CLIMBED_EXECUTION_ID = "local-execution-rung-2"  # the execution the capacity ladder starts after a capacity failure
# The deployed defaults size a multi-GPU job (2048-token sequences); locally the same parameters are
# overridden the way `start-pipeline-execution --pipeline-parameters` would, to fit a 2-core CPU.
CPU_PARAMETERS = {"InstanceType": "ml.m5.xlarge", "PerDeviceBatchSize": 4, "GradientAccumulationSteps": 4,
                  "SequenceLength": 32, "LearningRate": 1e-3, "CheckpointIntervalMinutes": 60.0,
                  "CheckpointEverySteps": 2}
COMPLETE_FILE = "COMPLETE.json"  # the trainer's mark of a finished checkpoint (trainer/checkpointing.py MARKER)


class LocalRunError(RuntimeError):
    """The local job failed or cannot start; the message says why in one line."""


class LocalRunStopped(LocalRunError):
    """local-run was asked to stop (Ctrl-C or SIGTERM) and has ended every process it started."""


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """What one execution's TrainingStep asks SageMaker to run, resolved to concrete values."""

    hyperparameters: dict[str, str]  # as CreateTrainingJob carries them: JSON-encoded strings
    input_data_config: list[dict[str, Any]]
    instance_type: str
    instance_count: int
    environment: dict[str, str]
    checkpoint_s3_uri: str
    checkpoint_local_path: str
    metric_definitions: list[dict[str, str]]
    container_command: tuple[str, ...] = ()  # ContainerEntrypoint + ContainerArguments; () runs the image's own

    @property
    def entry_point(self) -> str:
        return json.loads(self.hyperparameters["sagemaker_program"])

    @property
    def channels(self) -> dict[str, str]:
        return {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in self.input_data_config}

    @property
    def user_hyperparameters(self) -> dict[str, Any]:
        """What the trainer receives as `--name value` (the toolkit leaves `sagemaker_*` out)."""
        return {k: _decoded(v) for k, v in sorted(self.hyperparameters.items()) if not k.startswith("sagemaker_")}

    @staticmethod
    def from_definition(resolved: Mapping[str, Any]) -> TrainingJob:
        """From the definition resolved as one execution (`with_overrides`)."""
        from spot_training.definition import build as sdk
        from spot_training.definition.rules import EXECUTION_ID_STAND_IN

        args = sdk.training_step(resolved)["Arguments"]
        # A channel fed by the preparation step reads its output under the execution's prefix.
        channels = json.loads(json.dumps(args["InputDataConfig"]).replace(EXECUTION_ID_STAND_IN, EXECUTION_ID))
        return TrainingJob(
            hyperparameters={k: str(v) for k, v in args["HyperParameters"].items()},
            input_data_config=channels,
            instance_type=args["ResourceConfig"]["InstanceType"],
            instance_count=int(args["ResourceConfig"]["InstanceCount"]),
            environment=dict(args.get("Environment", {})),
            checkpoint_s3_uri=args["CheckpointConfig"]["S3Uri"].replace(EXECUTION_ID_STAND_IN, EXECUTION_ID),
            checkpoint_local_path=args["CheckpointConfig"].get("LocalPath", CHECKPOINT_LOCAL_PATH),
            metric_definitions=args["AlgorithmSpecification"]["MetricDefinitions"],
            container_command=(*args["AlgorithmSpecification"].get("ContainerEntrypoint", []),
                               *args["AlgorithmSpecification"].get("ContainerArguments", [])))


@dataclasses.dataclass(frozen=True)
class ProcessingJob:
    """What one execution's preparation (processing) step asks SageMaker to run, resolved."""

    name: str
    arguments: dict[str, Any]  # the step's resolved Arguments, as CreateProcessingJob would carry them

    @property
    def inputs(self) -> dict[str, tuple[str, str]]:
        """name -> (S3 URI, container path)."""
        return {i["InputName"]: (i["S3Input"]["S3Uri"], i["S3Input"]["LocalPath"])
                for i in self.arguments["ProcessingInputs"]}

    @property
    def outputs(self) -> dict[str, tuple[str, str]]:
        """name -> (container path, S3 URI)."""
        return {o["OutputName"]: (o["S3Output"]["LocalPath"], o["S3Output"]["S3Uri"])
                for o in self.arguments["ProcessingOutputConfig"]["Outputs"]}

    @property
    def command(self) -> list[str]:
        app = self.arguments["AppSpecification"]
        return [*app.get("ContainerEntrypoint", []), *app.get("ContainerArguments", [])]

    @staticmethod
    def from_definition(resolved: Mapping[str, Any], name: str) -> ProcessingJob | None:
        """The processing step `name` of the resolved definition, or None when it has none."""
        from spot_training.definition.rules import EXECUTION_ID_STAND_IN, all_steps

        step = next((s for s in all_steps(resolved) if s.get("Type") == "Processing" and s["Name"] == name), None)
        if step is None:
            return None
        arguments = json.loads(json.dumps(step["Arguments"]).replace(EXECUTION_ID_STAND_IN, EXECUTION_ID))
        return ProcessingJob(name=step["Name"], arguments=arguments)


def _decoded(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text


def with_overrides(definition: Mapping[str, Any], overrides: Mapping[str, Any], *,
                   properties: Mapping[str, Any] | None = None,
                   property_files: Mapping[str, Any] | None = None, execution_id: str = EXECUTION_ID) -> dict[str, Any]:
    """`definition` resolved as one execution started with these parameter values (and, once steps ran, with
    their properties and property files; see `rules.resolve`)."""
    from spot_training.definition.rules import resolve

    copy = json.loads(json.dumps(definition))
    for parameter in copy["Parameters"]:
        if parameter["Name"] in overrides:
            parameter["DefaultValue"] = overrides[parameter["Name"]]
    resolved = resolve(copy, properties, property_files)
    # A step reading another's output under this execution's prefix reads it under the local execution id.
    return json.loads(json.dumps(resolved).replace(_stand_in(), execution_id))


def _stand_in() -> str:
    from spot_training.definition.rules import EXECUTION_ID_STAND_IN

    return EXECUTION_ID_STAND_IN


def check_parameters(definition: Mapping[str, Any], parameters: Mapping[str, str]) -> dict[str, Any]:
    """`--parameter` values as start-pipeline-execution takes them: names of the definition's parameters, values
    of their types; a bad one is refused in one line."""
    kinds = {p["Name"]: p["Type"] for p in definition["Parameters"]}
    checked: dict[str, Any] = {}
    for name, value in parameters.items():
        if name not in kinds:
            raise LocalRunError(f"--parameter {name}: not a parameter of the pipeline; allowed: {', '.join(kinds)}")
        try:
            checked[name] = {"Integer": int, "Float": float}.get(kinds[name], str)(value)
        except ValueError:
            raise LocalRunError(f"--parameter {name}={value}: must be {'an' if kinds[name] == 'Integer' else 'a'} "
                                f"{kinds[name].lower()}") from None
    return checked


def build_job(config: TrainingConfig, steps: int, trainer_dir: Path,
              parameters: Mapping[str, str] | None = None,
              execution_id: str = EXECUTION_ID) -> tuple[TrainingJob, dict[str, Any], dict[str, Any]]:
    """The TrainingStep of the pipeline `cdk synth` builds for `config`, as one local execution (`execution_id`)
    runs it, the definition, and the execution's parameter values (the local ones, then `parameters`, checked)."""
    from spot_training.definition import build as sdk
    from spot_training.definition.trainer_code import load_metric_definitions

    placeholders = dataclasses.replace(sdk.Placeholders.for_counts(1, 1), bucket_name=LOCAL_BUCKET,
                                       code_bucket_name=LOCAL_ASSET_BUCKET, code_object_key=LOCAL_CODE_KEY)
    definition = sdk.generate(config, metric_definitions=load_metric_definitions(trainer_dir),
                              placeholders=placeholders)
    values = {**local_parameters(steps), **check_parameters(definition, parameters or {})}
    try:
        resolved = with_overrides(definition, values, execution_id=execution_id)
    except RunIdError as error:
        raise LocalRunError(f"--parameter {error}") from None
    return TrainingJob.from_definition(resolved), definition, values


def preparation_resolver(definition: Mapping[str, Any], values: Mapping[str, Any]) -> Callable[
        [Mapping[str, Any]], ProcessingJob | None]:
    """The preparation step of one local execution, resolved with these parameter values on top of the
    execution's (None when the pipeline has no preparation step)."""
    from spot_training.definition.build import PREPARE_STEP_NAME

    def resolve(overrides: Mapping[str, Any]) -> ProcessingJob | None:
        return ProcessingJob.from_definition(with_overrides(definition, {**values, **overrides}), PREPARE_STEP_NAME)

    return resolve


def local_parameters(steps: int) -> dict[str, Any]:
    """The pipeline parameters of one local execution: CPU-sized, `steps` optimizer steps."""
    return {**CPU_PARAMETERS, "MaxSteps": steps}


def job_fingerprint(job: TrainingJob) -> dict[str, Any]:
    """What must match for a run in the same --out to be resumed rather than refused."""
    return {"hyperparameters": job.user_hyperparameters, "instance_count": job.instance_count,
            "instance_type": job.instance_type}


@dataclasses.dataclass
class Attempt:
    number: int
    resumed_from: int | None = None
    last_step: int = 0
    interrupted: bool = False
    interrupted_during_save: bool = False
    stopped: bool = False  # local-run itself was stopped (Ctrl-C, SIGTERM, SIGKILL) during this attempt
    returncodes: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # wall time of the attempt's containers (TrainingTimeInSeconds sums them)
    execution: str = EXECUTION_ID  # the pipeline execution whose training job this attempt belongs to
    rung: str = ""  # its capacity ladder rung (config.capacity: "spot:<type>", "on-demand:<type>")
    ended_for_capacity: bool = False  # the job ended MaxWaitTimeExceeded after this attempt (no capacity came back)


@dataclasses.dataclass(frozen=True, order=True)
class Interruption:
    step: int
    during_save: bool = False  # wait, from `step` on, for a checkpoint write of a step >= `step` in progress
    capacity: bool = False  # after this reclaim no spot capacity comes back: the job ends MaxWaitTimeExceeded

    def due(self, last_step: int, checkpoints: Path) -> bool:
        if last_step < self.step:
            return False
        return not self.during_save or save_in_progress(checkpoints, from_step=self.step)


def save_in_progress(checkpoints: Path, *, from_step: int = 0) -> bool:
    """A checkpoint of step `from_step` or later is being written in `checkpoints` (its `step-N/` has no
    COMPLETE.json yet)."""
    for folder in checkpoints.glob("step-*"):
        number = folder.name.removeprefix("step-")
        if number.isdigit() and int(number) >= from_step and not (folder / COMPLETE_FILE).exists():
            return True
    return False
