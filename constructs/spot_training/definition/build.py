"""Generates the SageMaker pipeline definition with the SageMaker Python SDK v2, offline.

The only module that imports `sagemaker`, so a later move to SDK v3 touches this file alone.

`cdk synth` runs with no AWS credentials and no network, and its output must be identical across runs.
The SDK cannot take CDK tokens (it parses S3 URIs and looks up role ARNs), so the definition is built
with fixed placeholder values (`Placeholders`); the construct then swaps each placeholder for its token.
Each setting below that looks arbitrary is what it took to get zero network calls:
- telemetry opted out through `sagemaker_config` (with it on the SDK calls STS and an HTTP endpoint);
- an explicit image URI (`image_uris.retrieve` reads the SDK's bundled JSON), role ARN, output path and
  an `s3://` source_dir, so nothing is uploaded, resolved or looked up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import unittest.mock
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from spot_training.config.capacity import RUN_ID_PARAMETER, RUN_STARTED_AT_PARAMETER
from spot_training.config.settings import CONTEXT_KEY, ConfigError, TrainingConfig
from spot_training.definition.rules import EVALUATE_STEP, PREPARE_STEP, RESOLVE_RUN_STEP, RUN_OUTPUT, all_steps
from spot_training.config.layout import CHECKPOINT_LOCAL_PATH, DATA_PARAMETERS, LINEAGE_KEYS, NO_FINGERPRINT, PREFIXES
from spot_training.definition.trainer_code import CONTAINER_ENTRY, ENTRY_POINT

_SDK_LOGGERS = ("sagemaker", "sagemaker.config", "sagemaker.workflow.utilities", "sagemaker.telemetry")


@contextlib.contextmanager
def without_side_effects() -> Iterator[None]:
    """Run SageMaker SDK code (its import included) offline and quietly, then give the caller back its process
    as it was: `sys.excepthook` (the SDK installs a rich traceback hook), `os.environ`, and the logging
    configuration (root handlers and level, and the level of every logger that existed before).

    Inside: SAGEMAKER_SUPPRESS_V2_WARNING=1, AWS_EC2_METADATA_DISABLED=true (the SDK creates boto3 clients at
    import; without credentials botocore would probe the EC2 instance metadata endpoint, a network call), the
    SDK's loggers at ERROR and warnings ignored."""
    hook, environ = sys.excepthook, dict(os.environ)
    root = logging.getLogger()
    root_state = (root.level, list(root.handlers))
    levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    os.environ.update({"SAGEMAKER_SUPPRESS_V2_WARNING": "1", "AWS_EC2_METADATA_DISABLED": "true"})
    for name in _SDK_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.excepthook = hook
        for name in [n for n in os.environ if n not in environ]:
            del os.environ[name]
        os.environ.update(environ)
        root.setLevel(root_state[0])
        root.handlers[:] = root_state[1]
        for name, logger in logging.root.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


with without_side_effects():
    import boto3
    import sagemaker
    import sagemaker.config
    import sagemaker.session
    import sagemaker.utils
    from sagemaker import image_uris
    from sagemaker.inputs import TrainingInput
    from sagemaker.model import Model
    from sagemaker.model_metrics import MetricsSource, ModelMetrics
    from sagemaker.network import NetworkConfig
    from sagemaker.processing import ProcessingInput, ProcessingOutput, Processor
    from sagemaker.pytorch import PyTorch
    from sagemaker.workflow.condition_step import ConditionStep
    from sagemaker.workflow.conditions import ConditionGreaterThan, ConditionLessThanOrEqualTo
    from sagemaker.workflow.execution_variables import ExecutionVariables
    from sagemaker.workflow.fail_step import FailStep
    from sagemaker.lambda_helper import Lambda
    from sagemaker.workflow.functions import Join, JsonGet
    from sagemaker.workflow.lambda_step import LambdaOutput, LambdaOutputTypeEnum, LambdaStep
    from sagemaker.workflow.model_step import ModelStep
    from sagemaker.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString
    from sagemaker.workflow.pipeline import Pipeline
    from sagemaker.workflow.pipeline_context import PipelineSession
    from sagemaker.workflow.properties import PropertyFile
    from sagemaker.workflow.retry import (
        SageMakerJobExceptionTypeEnum,
        SageMakerJobStepRetryPolicy,
        StepExceptionTypeEnum,
        StepRetryPolicy,
    )
    from sagemaker.workflow.steps import CacheConfig, ProcessingStep, TrainingStep

TRAINING_STEP_NAME = "Train"
PREPARE_STEP_NAME = PREPARE_STEP
# Where the preparation step's container finds its inputs and leaves its output (SageMaker Processing copies
# each ProcessingInput to its LocalPath and uploads each ProcessingOutput's LocalPath; developer guide,
# "How Amazon SageMaker Processing Runs Your Processing Container Image").
PROCESSING_ROOT = "/opt/ml/processing"
PREPARE_CODE_DIR = "/tmp/prepare-code"
# The training container's command. SageMaker runs the image's ENTRYPOINT with the argument `train`; in the
# AWS PyTorch training images that is `bash -m start_with_right_hostname.sh train` (aws/deep-learning-containers
# pytorch/training/docker/2.8/py3/cu129/Dockerfile.gpu). With forward_stop_signal the container starts with our
# entry point instead (trainer_code.CONTAINER_ENTRY, from the code channel), which runs that same command as its
# child and passes SageMaker's stop signal on to the trainer (container_entry.py says why). All of it is one
# string after `bash -c`, so any argument SageMaker might append is ignored.
IMAGE_COMMAND = "bash -m start_with_right_hostname.sh train"
CODE_CHANNEL_DIR = "/opt/ml/input/data/code"
CONTAINER_ENTRY_DIR = "/tmp/spot-training-entry"
TRAINING_ENTRYPOINT = ["/bin/bash", "-c", f"set -e; d={CONTAINER_ENTRY_DIR}; mkdir -p $d; tar -xzf {CODE_CHANNEL_DIR}/* "
                       f"-C $d {CONTAINER_ENTRY}; exec python3 $d/{CONTAINER_ENTRY} {IMAGE_COMMAND}"]
EVALUATE_STEP_NAME = EVALUATE_STEP
GATE_STEP_NAME = "CheckEvaluation"
GATE_FAIL_STEP_NAME = "RefuseModelNotBetterThanBase"
REGISTER_STEP_NAME = "Register"  # the SDK names the step it makes <name>-RegisterModel
REGISTRATION_STEP = f"{REGISTER_STEP_NAME}-RegisterModel"
EVALUATION_REPORT = "evaluation.json"  # written by trainer/evaluate.py
EVALUATION_PROPERTY_FILE = "EvaluationReport"
MIN_IMPROVEMENT_PARAMETER = "EvaluationMinImprovement"
# The validation loss of the group's latest approved model, when it is comparable (operations.runs.start fills it
# in); the default means "none": no limit.
APPROVED_LOSS_PARAMETER, NO_APPROVED_LOSS = "ApprovedModelLoss", 1e9
# The built-in trainer's defaults that decide which blocks it trained on and how it initialises a base without
# weights (trainer/settings.py validation_holdout_fraction and seed; tests/test_evaluation.py checks they agree).
TRAINER_HOLDOUT_FRACTION = 0.02
TRAINER_SEED = 1234
INSTANCE_COUNT_CHECK_STEP_NAME = "CheckInstanceCount"
INSTANCE_COUNT_FAIL_STEP_NAME = "RefuseInstanceCountAboveCap"

# The container has no internet: never let transformers or tokenizers reach for the Hugging Face hub.
TRAINING_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

_SDK_CONFIG = {"SchemaVersion": "1.0",
               "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placeholders:
    """Stand-ins for deploy-time values. Each is unique, valid for the CreateTrainingJob shape, and
    replaced by the matching CDK token after generation."""

    role_arn: str = "arn:aws:iam::000000000000:role/placeholder-training-role-7f3a"
    bucket_name: str = "placeholder-artifact-bucket-7f3a"
    kms_key_arn: str = "arn:aws:kms:us-east-1:000000000000:key/00000000-0000-4000-8000-placeholder7"
    code_bucket_name: str = "placeholder-asset-bucket-7f3a"
    code_object_key: str = "placeholder-code-key-7f3a.tar.gz"
    resolve_run_function_arn: str = "arn:aws:lambda:us-east-1:000000000000:function:placeholder-resolve-run-7f3a"
    mlflow_tracking_server_arn: str = ("arn:aws:sagemaker:us-east-1:000000000000:mlflow-tracking-server/"
                                       "placeholder-tracking-7f3a")
    subnet_ids: tuple[str, ...] = ("subnet-placeholder7f3a0",)
    security_group_ids: tuple[str, ...] = ("sg-placeholder7f3a0",)

    @staticmethod
    def for_counts(subnets: int, security_groups: int) -> Placeholders:
        return Placeholders(subnet_ids=tuple(f"subnet-placeholder7f3a{i}" for i in range(subnets)),
                            security_group_ids=tuple(f"sg-placeholder7f3a{i}" for i in range(security_groups)))


@dataclasses.dataclass(frozen=True)
class PipelineParameter:
    """A per-run pipeline parameter: its name, SDK type and default."""

    name: str
    kind: type
    default: Any


def _require_region(config: TrainingConfig) -> None:
    if not config.region:
        raise ConfigError("TrainingConfig.region: empty; the image and the definition are per region (the construct "
                          "fills it from its stack)")


def default_image_uri(config: TrainingConfig) -> str:
    """The AWS Hugging Face PyTorch training DLC: torch, transformers, safetensors and accelerate are
    preinstalled, which the trainer needs because the isolated job cannot pip install."""
    if config.image_uri:
        return config.image_uri
    _require_region(config)
    with without_side_effects():
        return image_uris.retrieve("huggingface", region=config.region, version=config.transformers_version,
                                   base_framework_version=f"pytorch{config.framework_version}",
                                   py_version=config.py_version, instance_type=config.instance_type,
                                   image_scope="training")


def check_default_image(config: TrainingConfig) -> None:
    """Refuse, in one line, a region/version combination the SDK's image table has no image for."""
    if config.image_uri:
        return
    try:
        default_image_uri(config)
    except ValueError as error:
        reason = " ".join(str(error).split())[:160]
        raise ConfigError(
            f"{CONTEXT_KEY}.transformers_version={config.transformers_version}, framework_version="
            f"{config.framework_version}, py_version={config.py_version}, region={config.region}: no AWS Hugging "
            f"Face training image in the SageMaker SDK's table ({reason}); set {CONTEXT_KEY}.image_uri or pick "
            "listed versions") from None


def pipeline_parameters(config: TrainingConfig, bucket_name: str, *, evaluation: bool = False) -> list[PipelineParameter]:
    """Per-run values a user can override at start-pipeline-execution; defaults come from config."""
    gate = [PipelineParameter(MIN_IMPROVEMENT_PARAMETER, ParameterFloat, config.evaluation_min_improvement)] \
        if evaluation else []
    if evaluation and config.compare_with_approved:
        gate.append(PipelineParameter(APPROVED_LOSS_PARAMETER, ParameterFloat, NO_APPROVED_LOSS))
    validation = [PipelineParameter(DATA_PARAMETERS["validation"], ParameterString,
                                    f"s3://{bucket_name}/{PREFIXES['data']}validation/")] \
        if config.validation_data else []
    # An argument of the preparation step, so its cache key: `spot-training start` passes a digest of the data
    # objects (operations.runs.data_fingerprint), and changed data under the same prefix is prepared again.
    fingerprint = ([PipelineParameter("DataFingerprint", ParameterString, NO_FINGERPRINT)] if config.prepare_data
                   else [])
    return [
        PipelineParameter(DATA_PARAMETERS["train"], ParameterString, f"s3://{bucket_name}/{PREFIXES['data']}train/"),
        *validation,
        *fingerprint,
        PipelineParameter("BaseModelUri", ParameterString, f"s3://{bucket_name}/{PREFIXES['models']}base/"),
        PipelineParameter("InstanceType", ParameterString, config.instance_type),
        PipelineParameter("InstanceCount", ParameterInteger, config.instance_count),
        PipelineParameter("MaxSteps", ParameterInteger, config.max_steps),
        PipelineParameter("LearningRate", ParameterFloat, config.learning_rate),
        PipelineParameter("PerDeviceBatchSize", ParameterInteger, config.per_device_batch_size),
        PipelineParameter("GradientAccumulationSteps", ParameterInteger, config.gradient_accumulation_steps),
        PipelineParameter("SequenceLength", ParameterInteger, config.sequence_length),
        PipelineParameter("CheckpointIntervalMinutes", ParameterFloat, config.checkpoint_interval_minutes),
        PipelineParameter("CheckpointEverySteps", ParameterInteger, 0),
        # What is trained: every weight, or LoRA adapters beside the frozen base (trainer/lora.py).
        PipelineParameter("Method", ParameterString, config.method),
        PipelineParameter("LoraRank", ParameterInteger, config.lora_rank),
        PipelineParameter("LoraAlpha", ParameterFloat, config.lora_alpha),
        PipelineParameter("LoraDropout", ParameterFloat, config.lora_dropout),
        # The run this execution belongs to (config.capacity): empty starts a new run named by the execution id;
        # an earlier execution's run id resumes that run from its checkpoints. RunStartedAt (ISO 8601, UTC) is
        # when the run's first execution started, the origin of its deadline; empty: this execution's start.
        PipelineParameter(RUN_ID_PARAMETER, ParameterString, ""),
        PipelineParameter(RUN_STARTED_AT_PARAMETER, ParameterString, ""),
        *gate,
    ]


@contextlib.contextmanager
def _config_validated_once() -> Iterator[None]:
    """The SDK re-validates its config against a JSON schema on every lookup (23 times, ~2 s per
    definition). Ours is a constant: validate it once, then skip the repeats while generating."""
    sagemaker.config.validate_sagemaker_config(_SDK_CONFIG)
    with unittest.mock.patch.object(sagemaker.utils, "validate_sagemaker_config", lambda config=None: None), \
            unittest.mock.patch.object(sagemaker.session, "validate_sagemaker_config", lambda config=None: None):
        yield


HyperparameterValue = str | int | float | bool
# The toolkit joins the torchrun command into one shell line (sagemaker-training process.py run_async), so a
# value with whitespace or shell syntax would be split or interpreted there.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:/@+=,%-]*")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,255}")


def check_trainer_arguments(hyperparameters: Mapping[str, HyperparameterValue] | None,
                            environment: Mapping[str, str] | None) -> None:
    """Refuse, in one line, hyperparameters or environment the toolkit would mangle or that SageMaker owns."""
    for name, value in (hyperparameters or {}).items():
        if not _NAME.fullmatch(name) or name.startswith("sagemaker_"):
            raise ValueError(f"hyperparameters: {name!r} must be letters, digits, '_' and '-', starting with a "
                             "letter, and not start with sagemaker_ (the toolkit's own)")
        if not isinstance(value, (str, int, float, bool)) or not _SAFE_VALUE.fullmatch(str(value)):
            raise ValueError(f"hyperparameters: {name}={value!r} must be a number, a boolean or a string without "
                             "whitespace or shell syntax (the toolkit runs the trainer through a shell line)")
    for name, value in (environment or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,511}", name) or not isinstance(value, str):
            raise ValueError(f"environment: {name!r}={value!r} must be a variable name and a string value")


def generate(config: TrainingConfig, *, metric_definitions: Sequence[Mapping[str, str]],
             placeholders: Placeholders, image_uri: str | None = None,
             hyperparameters: Mapping[str, HyperparameterValue] | None = None,
             environment: Mapping[str, str] | None = None, evaluation: bool | None = None) -> dict[str, Any]:
    """The pipeline definition (a dict) for `config`, with `placeholders` where deploy-time values go.
    `hyperparameters` replace the built-in trainer's (a custom trainer receives exactly these); `environment`
    adds to the offline variables. `evaluation`: evaluate, gate and register after training (@default
    config.evaluate_model with the built-in trainer, whose evaluate.py the step runs)."""
    _require_region(config)
    check_trainer_arguments(hyperparameters, environment)
    if evaluation is None:
        evaluation = config.evaluate_model and hyperparameters is None
    with without_side_effects(), _config_validated_once():
        return _generate(config, metric_definitions, placeholders, image_uri, hyperparameters, environment,
                         evaluation)


def _generate(config: TrainingConfig, metric_definitions: Sequence[Mapping[str, str]],
              placeholders: Placeholders, image_uri: str | None,
              hyperparameters: Mapping[str, HyperparameterValue] | None = None,
              environment: Mapping[str, str] | None = None, evaluation: bool = False) -> dict[str, Any]:
    # Fixed dummy credentials: nothing is called, and botocore never walks its credential chain.
    boto_session = boto3.Session(region_name=config.region, aws_access_key_id="offline",
                                 aws_secret_access_key="offline")
    session = PipelineSession(boto_session=boto_session, sagemaker_config=_SDK_CONFIG,
                              default_bucket=placeholders.bucket_name)
    params = {p.name: p.kind(name=p.name, default_value=p.default)
              for p in pipeline_parameters(config, placeholders.bucket_name, evaluation=evaluation)}
    bucket = placeholders.bucket_name
    # Pipelines cannot default a parameter to the execution id: a first step resolves the run (RunId, or else
    # this execution's id) and the checkpoints are keyed on it, with a trailing "/" (without it a restore of
    # run-1 also pulls run-10: S3 prefixes).
    resolve_run = LambdaStep(
        name=RESOLVE_RUN_STEP, lambda_func=Lambda(function_arn=placeholders.resolve_run_function_arn, session=session),
        inputs={"run_id": params[RUN_ID_PARAMETER], "execution_id": ExecutionVariables.PIPELINE_EXECUTION_ID,
                "run_started_at": params[RUN_STARTED_AT_PARAMETER]},
        outputs=[LambdaOutput(output_name=RUN_OUTPUT, output_type=LambdaOutputTypeEnum.String)])
    checkpoint_s3_uri = Join(on="/", values=[f"s3://{bucket}/{PREFIXES['checkpoints'].rstrip('/')}",
                                             resolve_run.properties.Outputs[RUN_OUTPUT], ""])
    estimator = PyTorch(
        entry_point=ENTRY_POINT,
        source_dir=f"s3://{placeholders.code_bucket_name}/{placeholders.code_object_key}",
        image_uri=image_uri or default_image_uri(config),
        framework_version=config.framework_version,
        py_version=config.py_version,
        role=placeholders.role_arn,
        instance_type=params["InstanceType"],
        instance_count=params["InstanceCount"],
        volume_size=config.volume_size_gb,
        volume_kms_key=placeholders.kms_key_arn if config.volume_encryption_allowed else None,
        output_kms_key=placeholders.kms_key_arn,
        output_path=f"s3://{bucket}/{PREFIXES['outputs']}",
        code_location=f"s3://{bucket}/{PREFIXES['code'].rstrip('/')}",
        max_run=config.max_run_seconds,
        use_spot_instances=config.use_spot,
        max_wait=config.max_wait_seconds if config.use_spot else None,
        checkpoint_s3_uri=checkpoint_s3_uri,
        checkpoint_local_path=CHECKPOINT_LOCAL_PATH,
        subnets=list(placeholders.subnet_ids),
        security_group_ids=list(placeholders.security_group_ids),
        enable_network_isolation=config.network_isolation,
        encrypt_inter_container_traffic=config.inter_container_encryption,
        distribution={"torch_distributed": {"enabled": True}},
        hyperparameters=dict(hyperparameters) if hyperparameters is not None else {
            "max_steps": params["MaxSteps"],
            "learning_rate": params["LearningRate"],
            "per_device_batch_size": params["PerDeviceBatchSize"],
            "gradient_accumulation_steps": params["GradientAccumulationSteps"],
            "sequence_length": params["SequenceLength"],
            "checkpoint_interval_minutes": params["CheckpointIntervalMinutes"],
            "checkpoint_every_steps": params["CheckpointEverySteps"],
            "method": params["Method"],
            "lora_rank": params["LoraRank"],
            "lora_alpha": params["LoraAlpha"],
            "lora_dropout": params["LoraDropout"],
            "lora_target_modules": config.lora_target_modules,
            "strategy": config.strategy,
            "activation_checkpointing": config.activation_checkpointing,
            **({"mlflow_tracking_uri": placeholders.mlflow_tracking_server_arn} if config.mlflow else {}),
        },
        metric_definitions=[dict(m) for m in metric_definitions],
        environment={**TRAINING_ENVIRONMENT, **(environment or {})},
        container_entry_point=TRAINING_ENTRYPOINT if config.forward_stop_signal else None,
        # The model as the trainer wrote it (Hugging Face safetensors under output/model/): SageMaker would
        # otherwise gzip it into model.tar.gz on the training instances' clock (141 GB for 70B).
        disable_output_compression=True,
        disable_profiler=True,
        debugger_hook_config=False,
        sagemaker_session=session,
    )
    prepare = _prepare_step(config, params, placeholders, image_uri or default_image_uri(config), session,
                            environment) if config.prepare_data else None
    def data_uri(split: str) -> Any:
        """The channel a split's training reads: the preparation step's shards, else the raw prefix."""
        if prepare is None:
            return params[DATA_PARAMETERS[split]]
        return Join(on="/", values=[prepare.properties.ProcessingOutputConfig.Outputs["prepared"].S3Output.S3Uri,
                                    split, ""])

    # The model channel streams (FastFile): File mode would copy the whole base model (16 GB for 8B, 141 GB for
    # 70B in bf16) to every instance before each start, restarts included, where a resume reads none of it
    # and a fresh start reads each instance's share of the rows, in order (safetensors slices along dim 0:
    # the sequential reads FastFile serves well, TrainingInputMode in the SageMaker API reference).
    inputs = {"train": TrainingInput(s3_data=data_uri("train"), input_mode="File"),
              "model": TrainingInput(s3_data=params["BaseModelUri"], input_mode="FastFile")}
    if config.forward_stop_signal and not config.network_isolation:
        # Under network isolation the SDK already sends the code through this channel; without it the toolkit
        # downloads the code itself, after the container started: the entry point needs it before.
        inputs["code"] = TrainingInput(s3_data=f"s3://{placeholders.code_bucket_name}/{placeholders.code_object_key}",
                                       input_mode="File")
    if config.validation_data:  # the toolkit sets SM_CHANNEL_VALIDATION, the trainer's validation_dir
        inputs["validation"] = TrainingInput(s3_data=data_uri("validation"), input_mode="File")
    retry_policies = [
        SageMakerJobStepRetryPolicy(
            exception_types=[SageMakerJobExceptionTypeEnum.CAPACITY_ERROR,
                             SageMakerJobExceptionTypeEnum.RESOURCE_LIMIT,
                             SageMakerJobExceptionTypeEnum.INTERNAL_ERROR],
            interval_seconds=300, backoff_rate=2.0, max_attempts=config.retry_attempts),
        StepRetryPolicy(exception_types=[StepExceptionTypeEnum.SERVICE_FAULT, StepExceptionTypeEnum.THROTTLING],
                        interval_seconds=30, backoff_rate=2.0, max_attempts=config.retry_attempts),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No Wait, No Logs": the expected state of a PipelineSession
        step = TrainingStep(name=TRAINING_STEP_NAME, step_args=estimator.fit(inputs),
                            retry_policies=retry_policies)
        if prepare is not None:
            prepare.retry_policies = retry_policies
        steps = [resolve_run, *([prepare] if prepare is not None else []), step]
        if evaluation:
            steps += _evaluation_steps(config, params, placeholders, image_uri or default_image_uri(config), session,
                                       environment, step, data_uri, retry_policies)
        # The count check comes first: a refused run prepares nothing either.
        steps = [_instance_count_gate(config, params["InstanceCount"], steps)] if config.max_instance_count else steps
        # No PipelineExperimentConfig (the SDK's default would have Pipelines create a SageMaker experiment and
        # trial per run, which the pipeline role would then need sagemaker:CreateExperiment/CreateTrial/
        # AssociateTrialComponent for); runs are tracked through the metric definitions and, optionally, MLflow.
        pipeline = Pipeline(name=config.pipeline_name, parameters=list(params.values()), steps=steps,
                            sagemaker_session=session, pipeline_experiment_config=None)
        definition = json.loads(pipeline.definition())
    _point_code_at_asset(definition, placeholders)
    return definition


def _prepare_step(config: TrainingConfig, params: Mapping[str, Any], placeholders: Placeholders, image_uri: str,
                  session: Any, environment: Mapping[str, str] | None) -> Any:
    """The preparation step (trainer/prepare.py in the same image, on a CPU instance, in the same subnets and
    security group, isolated, KMS for volume and output): tokenizes the train channel (and the validation one
    when configured) once into token shards under prepared/<execution id>/<split>/; the training step reads
    them. Cached by Pipelines on its arguments."""
    bucket = placeholders.bucket_name
    processor = Processor(
        role=placeholders.role_arn, image_uri=image_uri, instance_count=1,
        instance_type=config.preparation_instance_type,
        # The code arrives as the trainer's archive (the CDK asset): unpack it, then run prepare.py with the
        # step's arguments.
        entrypoint=["/bin/bash", "-c", f"set -e; mkdir -p {PREPARE_CODE_DIR}; tar -xzf {PROCESSING_ROOT}/input/code/* "
                    f"-C {PREPARE_CODE_DIR}; exec python3 {PREPARE_CODE_DIR}/prepare.py \"$@\"", "prepare"],
        volume_size_in_gb=config.volume_size_gb,
        volume_kms_key=placeholders.kms_key_arn if config.preparation_volume_encryption_allowed else None,
        output_kms_key=placeholders.kms_key_arn, max_runtime_in_seconds=config.preparation_max_run_seconds,
        env={**TRAINING_ENVIRONMENT, "TOKENIZERS_PARALLELISM": "true", **(environment or {})},
        network_config=NetworkConfig(enable_network_isolation=config.network_isolation,
                                     security_group_ids=list(placeholders.security_group_ids),
                                     subnets=list(placeholders.subnet_ids),
                                     encrypt_inter_container_traffic=config.inter_container_encryption),
        sagemaker_session=session)
    prepared = Join(on="/", values=[f"s3://{bucket}/{PREFIXES['prepared'].rstrip('/')}",
                                    ExecutionVariables.PIPELINE_EXECUTION_ID])
    validation = [ProcessingInput(input_name="validation", source=params[DATA_PARAMETERS["validation"]],
                                  destination=f"{PROCESSING_ROOT}/input/validation")] if config.validation_data else []
    step_args = processor.run(
        inputs=[ProcessingInput(input_name="train", source=params[DATA_PARAMETERS["train"]],
                                destination=f"{PROCESSING_ROOT}/input/train"),
                *validation,
                ProcessingInput(input_name="model", source=params["BaseModelUri"],
                                destination=f"{PROCESSING_ROOT}/input/model"),
                ProcessingInput(input_name="code",
                                source=f"s3://{placeholders.code_bucket_name}/{placeholders.code_object_key}",
                                destination=f"{PROCESSING_ROOT}/input/code")],
        outputs=[ProcessingOutput(output_name="prepared", source=f"{PROCESSING_ROOT}/output/prepared",
                                  destination=prepared)],
        arguments=["--model_dir", f"{PROCESSING_ROOT}/input/model", "--train_dir", f"{PROCESSING_ROOT}/input/train",
                   *(["--validation_dir", f"{PROCESSING_ROOT}/input/validation"] if config.validation_data else []),
                   "--output_dir", f"{PROCESSING_ROOT}/output/prepared", "--data_fingerprint", params["DataFingerprint"],
                   # Instruction examples are packed into the run's sequences (a parameter: part of the cache key).
                   "--data_format", config.data_format,
                   "--sequence_length", Join(on="", values=[params["SequenceLength"]]),
                   "--max_truncated_fraction", str(config.data_max_truncated_fraction),
                   "--max_untrained_fraction", str(config.data_max_untrained_fraction),
                   "--max_unterminated_fraction", str(config.data_max_unterminated_fraction)])
    cache = CacheConfig(enable_caching=True, expire_after=f"P{config.preparation_cache_days}D") \
        if config.preparation_cache_days else None
    return ProcessingStep(name=PREPARE_STEP_NAME, step_args=step_args, cache_config=cache)


def _evaluation_steps(config: TrainingConfig, params: Mapping[str, Any], placeholders: Placeholders, image_uri: str,
                      session: Any, environment: Mapping[str, str] | None, training: Any, data_uri: Any,
                      retry_policies: list[Any]) -> list[Any]:
    """Evaluate -> gate -> register. The evaluation (trainer/evaluate.py, a processing job in the training
    subnets and security group, isolated, KMS for volume and output) scores the base and the fine-tuned model on
    the validation data as the trainer read it; the gate (a ConditionStep on its property file) registers the
    model only when its loss is below the base's by more than EvaluationMinImprovement, else a FailStep says
    both losses; the registration is a versioned model package, PendingManualApproval, of the uncompressed
    model with its metrics and its lineage."""
    bucket = placeholders.bucket_name
    processor = Processor(
        role=placeholders.role_arn, image_uri=image_uri, instance_count=1,
        instance_type=config.evaluation_instance_type,
        entrypoint=["/bin/bash", "-c", f"set -e; mkdir -p {PREPARE_CODE_DIR}; tar -xzf {PROCESSING_ROOT}/input/code/* "
                    f"-C {PREPARE_CODE_DIR}; exec python3 {PREPARE_CODE_DIR}/evaluate.py \"$@\"", "evaluate"],
        volume_size_in_gb=config.evaluation_volume_size_gb,
        volume_kms_key=placeholders.kms_key_arn if config.evaluation_volume_encryption_allowed else None,
        output_kms_key=placeholders.kms_key_arn, max_runtime_in_seconds=config.evaluation_max_run_seconds,
        env={**TRAINING_ENVIRONMENT, **(environment or {})},
        network_config=NetworkConfig(enable_network_isolation=config.network_isolation,
                                     security_group_ids=list(placeholders.security_group_ids),
                                     subnets=list(placeholders.subnet_ids),
                                     encrypt_inter_container_traffic=config.inter_container_encryption),
        sagemaker_session=session)
    split = "validation" if config.validation_data else "train"
    model_uri = training.properties.ModelArtifacts.S3ModelArtifacts  # the uncompressed output/model/ prefix
    evaluation_uri = Join(on="/", values=[f"s3://{bucket}/{PREFIXES['evaluation'].rstrip('/')}",
                                          ExecutionVariables.PIPELINE_EXECUTION_ID])
    fingerprint = params.get("DataFingerprint", NO_FINGERPRINT)
    step_args = processor.run(
        inputs=[ProcessingInput(input_name="base", source=params["BaseModelUri"],
                                destination=f"{PROCESSING_ROOT}/input/base"),
                ProcessingInput(input_name="model", source=model_uri, destination=f"{PROCESSING_ROOT}/input/model"),
                ProcessingInput(input_name="data", source=data_uri(split), destination=f"{PROCESSING_ROOT}/input/data"),
                ProcessingInput(input_name="code",
                                source=f"s3://{placeholders.code_bucket_name}/{placeholders.code_object_key}",
                                destination=f"{PROCESSING_ROOT}/input/code")],
        outputs=[ProcessingOutput(output_name="evaluation", source=f"{PROCESSING_ROOT}/output/evaluation",
                                  destination=evaluation_uri)],
        arguments=["--base_model_dir", f"{PROCESSING_ROOT}/input/base", "--model_dir", f"{PROCESSING_ROOT}/input/model",
                   "--data_dir", f"{PROCESSING_ROOT}/input/data", "--sequence_length",
                   Join(on="", values=[params["SequenceLength"]]),  # an integer parameter; arguments are strings
                   "--holdout_fraction", "0" if config.validation_data else str(TRAINER_HOLDOUT_FRACTION),
                   "--max_sequences", str(config.evaluation_max_sequences), "--seed", str(TRAINER_SEED),
                   "--data_fingerprint", fingerprint, "--base_model_uri", params["BaseModelUri"],
                   "--output_dir", f"{PROCESSING_ROOT}/output/evaluation"])
    report = PropertyFile(name=EVALUATION_PROPERTY_FILE, output_name="evaluation", path=EVALUATION_REPORT)
    evaluate = ProcessingStep(name=EVALUATE_STEP_NAME, step_args=step_args, property_files=[report],
                              retry_policies=retry_policies)

    def figure(path: str) -> JsonGet:
        return JsonGet(step_name=evaluate.name, property_file=report, json_path=path)

    approved = params.get(APPROVED_LOSS_PARAMETER)
    refuse = FailStep(name=GATE_FAIL_STEP_NAME, error_message=Join(on="", values=[
        "the fine-tuned model's validation loss ", figure("metrics.fine_tuned.loss"), " is not below the base "
        "model's ", figure("metrics.base.loss"), f" by more than {MIN_IMPROVEMENT_PARAMETER}=",
        params[MIN_IMPROVEMENT_PARAMETER],
        *([f", or is above the latest approved model's {APPROVED_LOSS_PARAMETER}=", approved] if approved else []),
        "; nothing was registered"]))
    serving_image, serving_pytorch = inference_image(config)
    model = Model(image_uri=serving_image, role=placeholders.role_arn, sagemaker_session=session,
                  model_data={"S3DataSource": {"S3Uri": model_uri, "S3DataType": "S3Prefix",
                                               "CompressionType": "None"}},
                  env={"HF_TASK": "text-generation", **TRAINING_ENVIRONMENT})
    lineage = {  # LINEAGE_KEYS: informational; comparisons read the evaluation report, which reviewers cannot edit
        "base_model": params["BaseModelUri"],
        "data_fingerprint": fingerprint,
        "trainer_code": f"s3://{placeholders.code_bucket_name}/{placeholders.code_object_key}",
        "training_image": image_uri,
        "training_job": training.properties.TrainingJobName,
        "method": params["Method"],
        "pipeline_execution": ExecutionVariables.PIPELINE_EXECUTION_ID,
        "training_seconds": Join(on="", values=[training.properties.TrainingTimeInSeconds]),
        "billable_seconds": Join(on="", values=[training.properties.BillableTimeInSeconds]),
    }
    assert tuple(lineage) == LINEAGE_KEYS
    register = ModelStep(name=REGISTER_STEP_NAME, retry_policies=retry_policies[1:], step_args=model.register(
        content_types=["application/json"], response_types=["application/json"],
        inference_instances=[config.inference_instance_type],
        model_package_group_name=config.model_package_group_name, approval_status="PendingManualApproval",
        model_metrics=ModelMetrics(model_statistics=MetricsSource(
            content_type="application/json", s3_uri=Join(on="/", values=[evaluation_uri, EVALUATION_REPORT]))),
        customer_metadata_properties=lineage,
        description=f"Fine-tuned by pipeline {config.pipeline_name}; approve after review",
        domain="NATURAL_LANGUAGE_PROCESSING", task="OTHER", framework="PYTORCH",
        framework_version=serving_pytorch))  # the PyTorch of the image that serves it, not of training
    conditions = [ConditionGreaterThan(left=figure("improvement"), right=params[MIN_IMPROVEMENT_PARAMETER])]
    if approved:  # all conditions must hold
        conditions.append(ConditionLessThanOrEqualTo(left=figure("metrics.fine_tuned.loss"), right=approved))
    gate = ConditionStep(name=GATE_STEP_NAME, conditions=conditions, if_steps=[register], else_steps=[refuse])
    return [evaluate, gate]


def inference_image_uri(config: TrainingConfig) -> str:
    return inference_image(config)[0]


def inference_image(config: TrainingConfig) -> tuple[str, str]:
    """(image URI, its PyTorch version): the AWS Hugging Face PyTorch inference DLC for the model's framework: the newest transformers version
    the SDK's image table (read offline) lists that is not newer than the training image's, with the newest
    PyTorch it pairs with. The table's inference images lag the training ones (4.51.3 with PyTorch 2.6.0 while
    training is 4.56.2 with 2.8.0 in sagemaker 2.257): a Llama-family model saved by the newer version loads in
    the older one."""
    _require_region(config)
    with without_side_effects():
        table = image_uris.config_for_framework("huggingface")["inference"]["versions"]
    wanted = _version(config.transformers_version)
    listed = sorted((v for v in table if not v.startswith("version_") and _version(v) <= wanted), key=_version)
    if not listed:
        raise ConfigError(f"{CONTEXT_KEY}.transformers_version={config.transformers_version}: no Hugging Face "
                          "inference image in the SageMaker SDK's table is as old or older")
    version = listed[-1]
    frameworks = sorted((k.removeprefix("pytorch") for k in table[version] if k.startswith("pytorch")), key=_version)
    with without_side_effects():
        uri = image_uris.retrieve("huggingface", region=config.region, version=version,
                                  base_framework_version=f"pytorch{frameworks[-1]}",
                                  py_version=table[version][f"pytorch{frameworks[-1]}"]["py_versions"][-1],
                                  instance_type=config.inference_instance_type, image_scope="inference")
    return uri, frameworks[-1]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def _instance_count_gate(config: TrainingConfig, instance_count, steps: list[Any]) -> ConditionStep:
    """IAM has no condition key on instance count, so the pipeline itself refuses a run above the cap
    before any job starts: a condition step, and a fail step with the reason."""
    refuse = FailStep(name=INSTANCE_COUNT_FAIL_STEP_NAME, error_message=Join(on="", values=[
        "InstanceCount=", instance_count, f" is above this pipeline's cap of {config.max_instance_count} instances "
        f"(team limit); start with InstanceCount <= {config.max_instance_count}"]))
    return ConditionStep(name=INSTANCE_COUNT_CHECK_STEP_NAME,
                         conditions=[ConditionLessThanOrEqualTo(left=instance_count, right=config.max_instance_count)],
                         if_steps=steps, else_steps=[refuse])


def training_step(definition: Mapping[str, Any]) -> dict[str, Any]:
    return next(s for s in all_steps(definition) if s["Name"] == TRAINING_STEP_NAME)


def _point_code_at_asset(definition: dict[str, Any], placeholders: Placeholders) -> None:
    """Under network isolation the SDK ships code through a `code` channel and names the archive
    `sourcedir.tar.gz`; a CDK asset's key is `<hash>.gz`, so name the real key (the container checks
    `tarfile.is_tarfile`, not the name)."""
    hyperparameters = training_step(definition)["Arguments"]["HyperParameters"]
    if "sagemaker_submit_directory" in hyperparameters and \
            "/opt/ml/input/data/code/" in hyperparameters["sagemaker_submit_directory"]:
        hyperparameters["sagemaker_submit_directory"] = json.dumps(
            f"/opt/ml/input/data/code/{placeholders.code_object_key}")
