"""The platform's settings: one typed, frozen, validated object.

Read once, in `app.py`, from the `training` key of the CDK context (`cdk.json`) with each field
overridable on the command line as `-c training.<field>=<value>`. Every bad value raises `ConfigError`
whose message is one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from spot_training.config import instance_types
from spot_training.config.sizing import Workload, guardrail_findings

CONTEXT_KEY = "training"
MAX_RUNTIME_LIMIT_SECONDS = 28 * 24 * 3600  # SageMaker's MaxRuntimeInSeconds ceiling (28 days)
# CloudWatch Logs accepts only these retention periods (PutRetentionPolicy).
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192,
                      2557, 2922, 3288, 3653)


class ConfigError(ValueError):
    """A setting the platform cannot run with; the message is meant for the user, as is."""


# How messages name a field: `training.<field>` for a config read from the CDK context (cdk.json, -c), and
# `TrainingConfig.<field>` for one built in Python. `from_mapping` sets it while it constructs.
_PREFIX = contextvars.ContextVar("spot_training_config_prefix", default="TrainingConfig")


def _field(default: Any, doc: str, **rules: Any) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc, **rules})


def _expand_instance_types(entry: str) -> list[str]:
    """`ml.g5.*` -> every training type of that family; an exact type -> itself."""
    if entry.endswith(".*"):
        return [t for t in instance_types.training_instance_types() if t.startswith(entry[:-1])]
    return [entry]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeamConfig:
    """One team's guardrails: what its runs may request, enforced by its own pipeline and pipeline role."""

    name: str
    instance_types: tuple[str, ...]
    max_instance_count: int
    max_run_seconds: int
    principals: tuple[str, ...] = ()
    instance_type: str = ""
    instance_count: int = 0

    FIELDS = ("instance_types", "max_instance_count", "max_run_seconds", "principals", "instance_type",
              "instance_count")

    def allowed_instance_types(self) -> tuple[str, ...]:
        """Exact types, with families such as `ml.g5.*` expanded from botocore's list."""
        expanded: list[str] = []
        for entry in self.instance_types:
            expanded += [t for t in _expand_instance_types(entry) if t not in expanded]
        return tuple(expanded)

    def __post_init__(self) -> None:
        # Messages name `training.teams.<name>.<field>` for a team read from the context, `TeamConfig.<field>`
        # for one built in Python.
        from_context = _PREFIX.get() == CONTEXT_KEY
        where = f"{CONTEXT_KEY}.teams.{self.name}" if from_context else "TeamConfig"
        show = _show if from_context else repr
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9-]{0,19}", self.name):
            raise ConfigError(f"{where}.name={show(self.name)}: team name must be 1 to 20 lowercase letters, "
                              "digits and hyphens, starting with a letter")
        types = self.instance_types
        if isinstance(types, str) or not isinstance(types, (list, tuple)) or not types or \
                not all(isinstance(t, str) for t in types):
            raise ConfigError(f"{where}.instance_types={show(types)}: must be a non-empty list of instance types "
                              "or families such as ml.g5.*")
        object.__setattr__(self, "instance_types", tuple(types))
        for key, low, high in (("max_instance_count", 1, 64), ("max_run_seconds", 60, MAX_RUNTIME_LIMIT_SECONDS),
                               ("instance_count", 0, 64)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{where}.{key}={show(value)}: must be an integer from {low} to {high}")
        principals = self.principals
        role_arn = r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+"
        if isinstance(principals, str) or not isinstance(principals, (list, tuple)) or \
                not all(isinstance(p, str) and re.fullmatch(role_arn, p) for p in principals):
            raise ConfigError(f"{where}.principals={show(principals)}: must be a list of IAM role ARNs")
        object.__setattr__(self, "principals", tuple(principals))
        if not isinstance(self.instance_type, str):
            raise ConfigError(f"{where}.instance_type={show(self.instance_type)}: must be a string")
        offered = instance_types.training_instance_types()
        for entry in self.instance_types:
            if not set(_expand_instance_types(entry)) & set(offered):
                raise ConfigError(f"{where}.instance_types: {entry} is neither a SageMaker training instance type "
                                  "nor a family such as ml.g5.*")

    @staticmethod
    def parse(name: str, raw: Any) -> TeamConfig:
        """A team from the context (`training.teams.<name>`): the object's shape here, its values in
        `__post_init__`, the same checks as a TeamConfig built in Python."""
        where = f"{CONTEXT_KEY}.teams.{name}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}={_show(raw)}: must be an object with {', '.join(TeamConfig.FIELDS)}")
        unknown = [k for k in raw if k not in TeamConfig.FIELDS]
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown team field; allowed: {', '.join(TeamConfig.FIELDS)}")
        for required in ("instance_types", "max_instance_count", "max_run_seconds"):
            if required not in raw:
                raise ConfigError(f"{where}.{required}: required")
        return TeamConfig(name=name, **raw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Settings of one deployment. Field docs are the README's configuration reference."""

    region: str = _field("", "AWS region the stacks deploy to (also picks the training image). Required by the "
                         "app (cdk.json sets it); empty in a config given to the construct: the stack's region.",
                         pattern=r"|[a-z]{2}(-gov)?-[a-z]+-\d",
        allowed="an AWS region such as us-east-1, or empty")
    pipeline_name: str = _field("distributed-training", "SageMaker pipeline name; the stacks are named "
                                "after it (DistributedTrainingNetworking, ...).",
                                pattern=r"[a-zA-Z][a-zA-Z0-9-]{0,47}",
        allowed="1 to 48 letters, digits and hyphens, starting with a letter")
    instance_type: str = _field("ml.p4d.24xlarge", "Default training instance type (pipeline parameter "
                                "InstanceType).")
    allowed_instance_types: tuple[str, ...] = _field((), "Instance types a run may request; the pipeline "
                                                     "role's IAM condition. Empty: only instance_type. "
                                                     "On the command line: comma-separated.")
    instance_count: int = _field(2, "Default number of instances (pipeline parameter InstanceCount).",
                                 min=1, max=64)
    max_instance_count: int = _field(0, "Cap on InstanceCount a run may request, enforced by the pipeline "
                                     "(a condition step) since IAM has no such key; 0: no cap.", min=0, max=64)
    require_gpu: bool = _field(True, "Refuse instance types without NVIDIA GPUs. Set false for a CPU "
                               "smoke run (the trainer then uses gloo; set image_uri too: the default DLC is GPU-only).")
    use_spot: bool = _field(True, "Run on managed spot capacity (checkpointing is always on).")
    max_run_seconds: int = _field(43200, "MaxRuntimeInSeconds: cap on training time, all spot attempts "
                                  "together.", min=60, max=MAX_RUNTIME_LIMIT_SECONDS)
    capacity_ladder: bool = _field(False, "When spot capacity does not come, climb: a second pipeline "
                                   "(<pipeline_name>-on-demand) runs the same definition on demand, and a controller "
                                   "starts the next rung (spot on each other allowed type, then on demand) of a run "
                                   "whose execution ended for capacity, with the same RunId, while the run can still "
                                   "finish within slo_hours. The spot pipeline's MaxWait and MaxRuntime then come from "
                                   "the sizing model (spot-training size --capacity-ladder). Needs use_spot.")
    max_wait_seconds: int = _field(86400, "MaxWaitTimeInSeconds: cap on training plus waiting for spot "
                                   "capacity; must be >= max_run_seconds with spot.",
                                   min=60, max=2 * MAX_RUNTIME_LIMIT_SECONDS)
    volume_size_gb: int = _field(500, "EBS volume per instance (GB) for data, model and checkpoints.",
                                 min=1, max=16384)
    network_isolation: bool = _field(True, "EnableNetworkIsolation: no outbound network from the "
                                     "training container.")
    inter_container_encryption: bool = _field(True, "EnableInterContainerTrafficEncryption between "
                                              "nodes (IPsec; slows NCCL traffic somewhat).")
    retry_attempts: int = _field(3, "Pipeline step retries on capacity, quota and internal errors.",
                                 min=1, max=20)
    forward_stop_signal: bool = _field(True, "Start the training container with the platform's entry point, "
                                       "which runs the image's command and passes SageMaker's stop signal "
                                       "(StopTrainingJob, MaxRuntime) on to the trainer, so it stops after the "
                                       "step in progress; needs an image built on the AWS PyTorch training image. "
                                       "false: the image's own entry point, which forwards no signal (a stop is a "
                                       "kill 120 s later).")
    prepare_data: bool = _field(True, "Run the preparation step before training: tokenize the train channel "
                                "once into memory-mapped token shards (false: the trainer reads the channel as "
                                "is: prepared shards, *.npy, or at most 64 MiB of *.jsonl).")
    validation_data: bool = _field(False, "Give runs a validation channel: the pipeline parameter "
                                   "ValidationDataUri (default data/validation/ in the bucket), prepared like train "
                                   "and read by the trainer as validation_dir; the prefix must hold data. false: "
                                   "the trainer holds out validation_holdout_fraction of train.")
    preparation_instance_type: str = _field("ml.m5.2xlarge", "CPU instance type of the preparation step.")
    preparation_max_run_seconds: int = _field(21600, "MaxRuntimeInSeconds of the preparation step.",
                                              min=60, max=5 * 24 * 3600)
    method: str = _field("full", "Default of the pipeline parameter Method: full trains every weight; lora freezes the "
                         "base and trains low-rank adapters (peft), so checkpoints hold only the adapters and their "
                         "optimizer state, and the model output is the merged model with the adapter in peft's "
                         "format under adapter/.", choices=("full", "lora"))
    lora_rank: int = _field(16, "Default of the pipeline parameter LoraRank (r).", min=1, max=1024)
    lora_alpha: float = _field(32.0, "Default of the pipeline parameter LoraAlpha: the adapters' update is scaled by "
                               "alpha / r.", min=0.0, max=4096.0, exclusive_min=True)
    lora_dropout: float = _field(0.05, "Default of the pipeline parameter LoraDropout.", min=0.0, max=0.9)
    lora_target_modules: str = _field("all-linear", "Modules that get adapters: all-linear (every linear layer but the "
                                      "output head) or comma-separated module names such as q_proj,v_proj.",
                                      pattern=r"all-linear|[A-Za-z_][A-Za-z0-9_]*(,[A-Za-z_][A-Za-z0-9_]*)*",
        allowed="all-linear or comma-separated module names")
    data_format: str = _field("auto", "What the training data's *.jsonl lines are: text ({\"text\"}: documents "
                              "joined into one stream, every token trained), chat ({\"messages\"}: rendered with the "
                              "base model's chat template, loss on the assistant turns), prompt_completion "
                              "({\"prompt\", \"completion\"}: loss on the completion), or auto (each split's first "
                              "line decides; the preparation log says which). chat and prompt_completion examples are "
                              "packed whole into SequenceLength + 1 tokens and attend only within themselves.",
                              choices=("auto", "text", "chat", "prompt_completion"))
    data_max_truncated_fraction: float = _field(0.05, "Data contract (chat and prompt_completion): the preparation "
                                                "stops, in one line, when more than this fraction of a source's "
                                                "examples are longer than SequenceLength + 1 and get cut.",
                                                min=0.0, max=1.0)
    data_max_untrained_fraction: float = _field(0.0, "Data contract: most examples of a source with no trained token "
                                                "(no assistant turn, an empty answer, a template without one), as a "
                                                "fraction.", min=0.0, max=1.0)
    data_max_unterminated_fraction: float = _field(0.0, "Data contract: most examples of a source whose answer ends "
                                                   "without an end-of-turn token (the model would not learn to stop), "
                                                   "as a fraction.", min=0.0, max=1.0)
    preparation_cache_days: int = _field(30, "Pipelines step caching of the preparation step: a run with the "
                                         "same data and model URIs reuses the shards prepared in the last N days "
                                         "(the cache keys on the arguments, not on the objects: write changed "
                                         "data under a new prefix); 0: prepare on every run.", min=0, max=3650)
    evaluate_model: bool = _field(True, "After training, an evaluation step computes the held-out loss and "
                                  "perplexity of the base and the fine-tuned model on the validation data "
                                  "(prepared as for training), a gate stops a model that does not beat its base, "
                                  "and a model that does is registered, PendingManualApproval, in the model package "
                                  "group. false: the pipeline ends with the model in outputs/.")
    evaluation_instance_type: str = _field("ml.g5.2xlarge", "Instance type of the evaluation step: one GPU holds "
                                           "an 8B model in bf16 (24 GB on g5); above that pick a multi-GPU type (the "
                                           "step spreads the layers over its GPUs).")
    evaluation_max_run_seconds: int = _field(7200, "MaxRuntimeInSeconds of the evaluation step.",
                                             min=60, max=5 * 24 * 3600)
    evaluation_volume_size_gb: int = _field(100, "Storage volume (GB) of the evaluation step: the base and the "
                                            "fine-tuned model and the evaluated data are copied onto it (File mode; "
                                            "Processing has no FastFile, botocore ProcessingS3InputMode is Pipe or "
                                            "File): 2 x 16 GB for an 8B model in bf16, plus the data. Without a "
                                            "validation channel the whole training data is copied.",
                                            min=1, max=16384)
    evaluation_max_sequences: int = _field(512, "Validation sequences (of the run's SequenceLength) each model is "
                                           "evaluated on, the first in stream order; 0: all.", min=0, max=10**8)
    evaluation_min_improvement: float = _field(0.0, "Default of the pipeline parameter EvaluationMinImprovement: "
                                               "the fine-tuned model's validation loss must be below the base "
                                               "model's by more than this (nats per token) to be registered.",
                                               min=0.0, max=100.0)
    compare_with_approved: bool = _field(False, "The gate also requires the fine-tuned model's validation loss to be "
                                         "no worse than that of the group's latest Approved model (pipeline parameter "
                                         "ApprovedModelLoss, which `spot-training start` fills in when that model was "
                                         "evaluated on the same data and base model, else leaves at 1e9: no limit).")
    model_package_group: str = _field("", "Model package group the pipeline registers models in (created by the "
                                      "stack, kept on delete). Empty: <pipeline_name>-models. With teams, each "
                                      "team's pipeline registers in <group>-<team>.",
                                      pattern=r"|[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}",
        allowed="1 to 63 letters, digits and hyphens, not starting or ending with a hyphen, or empty")
    create_model_package_group: bool = _field(True, "The stack creates the model package group. False: the group "
                                              "already exists (the stack keeps it on delete, so a redeployment "
                                              "after `cdk destroy` must use it, not create it again) and the "
                                              "stack only registers in it.")
    inference_instance_type: str = _field("ml.g5.2xlarge", "Instance type registered models name for real-time "
                                          "inference (InferenceInstanceTypes).")
    az_count: int = _field(2, "Availability zones (one isolated subnet each) of the created VPC.",
                           min=2, max=6)
    vpc_cidr: str = _field("10.80.0.0/16", "CIDR block of the created VPC.",
                           pattern=r"(\d{1,3}\.){3}\d{1,3}/(1[6-9]|2[0-4])",
        allowed="an IPv4 CIDR block from /16 to /24")
    checkpoint_expiration_days: int = _field(30, "Delete checkpoint objects this many days after "
                                             "writing.", min=1, max=3650)
    noncurrent_version_expiration_days: int = _field(30, "Delete overwritten object versions after this "
                                                     "many days.", min=1, max=3650)
    abort_incomplete_upload_days: int = _field(7, "Abort incomplete multipart uploads after this many "
                                               "days.", min=1, max=365)
    log_retention_days: int = _field(365, "Retention of the VPC flow log group (a CloudWatch value).",
                                     choices=LOG_RETENTION_DAYS)
    image_uri: str = _field("", "Training image. Empty: the AWS Hugging Face PyTorch training DLC for "
                            "framework_version/transformers_version in this region.",
                            pattern=r"|\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[a-z0-9._/-]+[:@][\w.:-]+",
                            allowed="an ECR image URI <account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>, "
                                    "or empty")
    framework_version: str = _field("2.8.0", "PyTorch version of the default image (exact).",
                                    pattern=r"\d+\.\d+\.\d+",
        allowed="an exact version such as 2.8.0")
    transformers_version: str = _field("4.56.2", "transformers version of the default image (exact).",
                                       pattern=r"\d+\.\d+\.\d+",
        allowed="an exact version such as 4.56.2")
    py_version: str = _field("py312", "Python version tag of the default image.", pattern=r"py3\d+",
        allowed="a tag such as py312")
    strategy: str = _field("auto", "Default distribution strategy of the trainer: ddp, fsdp, or auto (ddp when the "
                           "memory planner says the model's whole state fits each GPU, else fsdp).",
                           choices=("auto", "ddp", "fsdp"))
    activation_checkpointing: str = _field("auto", "Recompute each decoder block's activations in the backward pass: "
                                           "true, false or auto (on with fsdp).", choices=("auto", "true", "false"))
    model_parameters: int = _field(0, "Parameters of the model to fine-tune, optional: synth then checks with the "
                                   "memory planner that the default instance type, count, strategy, batch and "
                                   "sequence length fit GPU memory (warn or refuse per guardrails); 0: unchecked.",
                                   min=0, max=10**13)
    max_steps: int = _field(1000, "Default optimizer steps per run (pipeline parameter MaxSteps).",
                            min=1, max=10_000_000)
    learning_rate: float = _field(2e-5, "Default peak learning rate (pipeline parameter LearningRate).",
                                  min=0.0, max=1.0, exclusive_min=True)
    per_device_batch_size: int = _field(4, "Default sequences per GPU per micro-step.", min=1, max=4096)
    gradient_accumulation_steps: int = _field(8, "Default micro-steps per optimizer step.", min=1,
                                              max=4096)
    sequence_length: int = _field(2048, "Default tokens per training sequence.", min=8, max=1_048_576)
    checkpoint_interval_minutes: float = _field(10.0, "Default wall-clock interval between checkpoints; "
                                                "bounds the work lost per interruption.", min=0.0,
                                                max=1440.0, exclusive_min=True)
    guardrails: str = _field("warn", "What synth does when the sizing model says a limit will not hold: "
                             "warn, refuse (exit 2) or off.", choices=("warn", "refuse", "off"))
    expected_run_hours: float = _field(6.0, "Expected training time of one run without interruptions "
                                       "(sizing model).", min=0.0, max=672.0, exclusive_min=True)
    slo_hours: float = _field(24.0, "Refresh SLO: a run must finish within this many hours (sizing model).",
                              min=0.0, max=8760.0, exclusive_min=True)
    interruptions_per_instance_hour: float = _field(0.05, "Expected spot interruptions per instance-hour "
                                                    "(sizing model).", min=0.0, max=10.0)
    max_lost_work_minutes: float = _field(10.0, "Target: most work lost per interruption (sizing model).",
                                          min=0.0, max=1440.0, exclusive_min=True)
    checkpoint_save_seconds: float = _field(30.0, "Training time one checkpoint save blocks (sizing model).",
                                            min=0.0, max=3600.0)
    provisioning_minutes: float = _field(10.0, "Capacity wait, instance and container start after an interruption, "
                                         "before downloads (sizing model; the restart time adds the checkpoint "
                                         "download when model_parameters is set).", min=0.0, max=1440.0)
    restore_gb_per_second: float = _field(1.0, "Download rate of SageMaker's checkpoint restore into one instance, "
                                          "GB/s (sizing model; undocumented by SageMaker: measure yours from a "
                                          "restarted job's Downloading time).", min=0.0, max=100.0,
                                          exclusive_min=True)
    alarm_email: str = _field("", "E-mail address subscribed to the alarm topic (confirm the subscription "
                              "mail). Empty: no subscription.", pattern=r"|[^@\s]+@[^@\s]+\.[^@\s]+",
        allowed="an e-mail address, or empty")
    mlflow: bool = _field(False, "Create a SageMaker managed MLflow tracking server (and its VPC endpoint) and "
                          "have the trainer log to it. Needs network_isolation=false and an image_uri with mlflow "
                          "and sagemaker-mlflow.")
    teams: tuple[TeamConfig, ...] = _field((), "Teams, each with its own pipeline and pipeline role: an object "
                                           "of team name -> {instance_types, max_instance_count, "
                                           "max_run_seconds, principals, instance_type, instance_count}.")
    alarm_after_hours: float = _field(12.0, "Alarm when an execution is still running after this many hours.",
                                      min=0.0, max=720.0, exclusive_min=True)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _check_type(f, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            _check_rules(f, value)
        self._check_instance_type("instance_type", self.instance_type)
        if self.preparation_instance_type not in instance_types.processing_instance_types():
            raise ConfigError(f"{_PREFIX.get()}.preparation_instance_type={self.preparation_instance_type}: not an "
                              "instance type SageMaker offers (botocore ProcessingInstanceType)")
        if self.evaluation_instance_type not in instance_types.processing_instance_types():
            raise ConfigError(f"{_PREFIX.get()}.evaluation_instance_type={self.evaluation_instance_type}: not an "
                              "instance type SageMaker offers for processing (botocore ProcessingInstanceType)")
        if self.inference_instance_type not in instance_types.inference_instance_types():
            raise ConfigError(f"{_PREFIX.get()}.inference_instance_type={self.inference_instance_type}: not an "
                              "instance type SageMaker offers for real-time inference (botocore "
                              "ProductionVariantInstanceType)")
        for i, allowed in enumerate(self.allowed_instance_types):
            self._check_instance_type(f"allowed_instance_types[{i}]", allowed)
        if self.allowed_instance_types and self.instance_type not in self.allowed_instance_types:
            raise ConfigError(
                f"{_PREFIX.get()}.allowed_instance_types={','.join(self.allowed_instance_types)}: must "
                f"include {_PREFIX.get()}.instance_type ({self.instance_type})")
        if self.max_instance_count and self.instance_count > self.max_instance_count:
            raise ConfigError(f"{_PREFIX.get()}.instance_count={self.instance_count}: above "
                              f"{_PREFIX.get()}.max_instance_count ({self.max_instance_count})")
        if self.mlflow and self.network_isolation:
            raise ConfigError(f"{_PREFIX.get()}.mlflow=true: needs {_PREFIX.get()}.network_isolation=false; an "
                              "isolated training container cannot reach the MLflow tracking server (metrics "
                              "still reach CloudWatch through the metric definitions)")
        if self.mlflow and not self.image_uri:
            raise ConfigError(f"{_PREFIX.get()}.mlflow=true: needs {_PREFIX.get()}.image_uri, an image with mlflow "
                              "and sagemaker-mlflow installed; the default Hugging Face DLC has neither and the job "
                              "cannot pip install")
        names = [team.name for team in self.teams]
        if len(set(names)) != len(names):
            raise ConfigError(f"{_PREFIX.get()}.teams: team names must be unique, got {', '.join(names)}")
        for team in self.teams:
            self.for_team(team)  # raises on a default that breaks the team's limits
        group = self.model_package_group_name
        if self.evaluate_model and len(group) > 63:
            source = ("model_package_group" if self.model_package_group
                      else f"pipeline_name={self.pipeline_name} (model_package_group empty: <pipeline_name>-models)")
            raise ConfigError(f"{_PREFIX.get()}.{source}: the model package group name {group} is {len(group)} "
                              "characters, SageMaker allows at most 63; set a shorter model_package_group")
        if self.data_format in ("chat", "prompt_completion") and not self.prepare_data:
            raise ConfigError(f"{_PREFIX.get()}.data_format={self.data_format}: needs {_PREFIX.get()}.prepare_data=true "
                              "(instruction examples are tokenized with their loss mask and packed by the preparation "
                              "step; the trainer reads raw text only)")
        if self.capacity_ladder and not self.use_spot:
            raise ConfigError(f"{_PREFIX.get()}.capacity_ladder=true: needs {_PREFIX.get()}.use_spot=true (the ladder "
                              "climbs from spot to on-demand; without spot every run is on demand already)")
        if self.use_spot and self.max_wait_seconds < self.max_run_seconds:
            raise ConfigError(
                f"{_PREFIX.get()}.max_wait_seconds={self.max_wait_seconds}: must be >= "
                f"{_PREFIX.get()}.max_run_seconds ({self.max_run_seconds}) when {_PREFIX.get()}.use_spot=true")

    def _check_instance_type(self, name: str, value: str) -> None:
        offered = instance_types.training_instance_types()
        if value not in offered:
            close = difflib.get_close_matches(value, offered, n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ConfigError(f"{_PREFIX.get()}.{name}={value}: not an instance type SageMaker offers for "
                              f"training (botocore TrainingInstanceType){hint}")
        if self.require_gpu and instance_types.gpus_per_instance(value) == 0:
            raise ConfigError(f"{_PREFIX.get()}.{name}={value}: has no NVIDIA GPU, so it cannot run "
                              f"distributed GPU training; use a GPU type such as ml.p4d.24xlarge, "
                              f"ml.p5.48xlarge or ml.g5.12xlarge, or set {_PREFIX.get()}.require_gpu=false")

    @property
    def instance_type_allow_list(self) -> tuple[str, ...]:
        return self.allowed_instance_types or (self.instance_type,)

    @property
    def volume_encryption_allowed(self) -> bool:
        """SageMaker rejects VolumeKmsKeyId on local-NVMe types; decided over every allowed type."""
        return not any(instance_types.has_local_storage(t) for t in self.instance_type_allow_list)

    @property
    def preparation_volume_encryption_allowed(self) -> bool:
        """The same rule for the preparation step's one instance type."""
        return not instance_types.has_local_storage(self.preparation_instance_type)

    @property
    def evaluation_volume_encryption_allowed(self) -> bool:
        """The same rule for the evaluation step's instance type."""
        return not instance_types.has_local_storage(self.evaluation_instance_type)

    @property
    def model_package_group_name(self) -> str:
        return self.model_package_group or f"{self.pipeline_name}-models"

    def for_team(self, team: TeamConfig) -> TrainingConfig:
        """This deployment as seen by one team's pipeline: its name, instance types, caps and defaults."""
        where = f"{_PREFIX.get()}.teams.{team.name}"
        allowed = team.allowed_instance_types()
        instance_type = team.instance_type or (self.instance_type if self.instance_type in allowed else allowed[0])
        if instance_type not in allowed:
            raise ConfigError(f"{where}.instance_type={instance_type}: not among the team's instance_types "
                              f"({', '.join(allowed)})")
        instance_count = team.instance_count or min(self.instance_count, team.max_instance_count)
        if instance_count > team.max_instance_count:
            raise ConfigError(f"{where}.instance_count={instance_count}: above the team's max_instance_count "
                              f"({team.max_instance_count})")
        if self.use_spot and self.max_wait_seconds < team.max_run_seconds:
            raise ConfigError(f"{where}.max_run_seconds={team.max_run_seconds}: above {_PREFIX.get()}.max_wait_seconds "
                              f"({self.max_wait_seconds}); spot needs MaxWait >= MaxRuntime")
        group = (f"{self.model_package_group}-{team.name}" if self.model_package_group
                 else f"{self.pipeline_name}-{team.name}-models")
        if self.evaluate_model and len(group) > 63:
            raise ConfigError(f"{where}.name={team.name}: the team's model package group {group} is {len(group)} "
                              "characters, SageMaker allows at most 63; use a shorter team name or model_package_group")
        return dataclasses.replace(
            # Each team's pipeline registers in its own group: a shared explicit name would be created twice.
            self, pipeline_name=f"{self.pipeline_name}-{team.name}", instance_type=instance_type,
            model_package_group=group if self.model_package_group and self.evaluate_model else "",
            allowed_instance_types=allowed, instance_count=instance_count, max_instance_count=team.max_instance_count,
            max_run_seconds=team.max_run_seconds, teams=())

    def workload(self) -> Workload:
        """This deployment as the sizing model sees it."""
        return Workload(instance_count=self.instance_count, run_hours=self.expected_run_hours,
                        slo_hours=self.slo_hours, interruptions_per_instance_hour=self.interruptions_per_instance_hour,
                        checkpoint_save_seconds=self.checkpoint_save_seconds,
                        provisioning_minutes=self.provisioning_minutes, model_parameters=self.model_parameters,
                        restore_gb_per_second=self.restore_gb_per_second,
                        trained_parameters=self.trained_parameters(),
                        max_lost_work_minutes=self.max_lost_work_minutes,
                        checkpoint_interval_minutes=self.checkpoint_interval_minutes)

    def guardrail_findings(self) -> list[str]:
        if self.guardrails == "off":
            return []
        findings = guardrail_findings(self.workload(), use_spot=self.use_spot, max_run_seconds=self.max_run_seconds,
                                      max_wait_seconds=self.max_wait_seconds, retry_attempts=self.retry_attempts)
        return findings + self.memory_findings()

    def trained_parameters(self) -> int:
        """With method=lora and model_parameters set: the adapters' parameters (all-linear on the model's shape;
        named target modules are counted as all-linear, an upper bound); else 0 (every parameter)."""
        if self.method != "lora" or not self.model_parameters:
            return 0
        from spot_training.trainer import memory

        return memory.ModelShape.from_parameters(self.model_parameters).lora_parameters(self.lora_rank)

    def memory_plan(self, shape: Any, instance_type: str, instance_count: int) -> Any:
        """The memory planner's figures per GPU for this config's trainer defaults on `instance_count` x
        `instance_type` (strategy auto resolved as the trainer resolves it)."""
        from spot_training.trainer import memory

        gpu_bytes = instance_types.gpu_memory_bytes(instance_type)
        world_size = instance_count * max(1, instance_types.gpus_per_instance(instance_type))
        strategy = self.strategy
        if strategy == "auto":
            strategy = memory.choose_strategy(shape, world_size=world_size, batch=self.per_device_batch_size,
                                              sequence_length=self.sequence_length, bf16=True,
                                              gpu_bytes=gpu_bytes or 0,
                                              activation_checkpointing=self.activation_checkpointing,
                                              accumulation=self.gradient_accumulation_steps,
                                              lora_parameters=shape.lora_parameters(self.lora_rank)
                                              if self.method == "lora" else 0)
        return memory.plan(shape, strategy=strategy, world_size=world_size, batch=self.per_device_batch_size,
                           sequence_length=self.sequence_length, bf16=True, gpu_bytes=gpu_bytes,
                           accumulation=self.gradient_accumulation_steps,
                           activation_checkpointing=memory.checkpointing_on(self.activation_checkpointing, strategy),
                           lora_parameters=shape.lora_parameters(self.lora_rank) if self.method == "lora" else 0)

    def memory_findings(self) -> list[str]:
        """With `model_parameters` set: one finding when the defaults cannot fit GPU memory."""
        if not self.model_parameters:
            return []
        from spot_training.trainer import memory

        shape = memory.ModelShape.from_parameters(self.model_parameters)
        plan = self.memory_plan(shape, self.instance_type, self.instance_count)
        if plan.fits is not False:
            return []
        gpus = max(1, instance_types.gpus_per_instance(self.instance_type))
        problem = memory.fit_error(shape, strategy=plan.strategy, world_size=self.instance_count * gpus,
                                   gpus_per_instance=gpus,
                                   batch=self.per_device_batch_size, sequence_length=self.sequence_length,
                                   activation_checkpointing=self.activation_checkpointing, bf16=True,
                                   accumulation=self.gradient_accumulation_steps, gpu_bytes=plan.gpu_bytes,
                                   lora_parameters=shape.lora_parameters(self.lora_rank) if self.method == "lora" else 0)
        return [f"{_PREFIX.get()}.model_parameters={self.model_parameters}: on {self.instance_count} x "
                f"{self.instance_type} {problem} (spot-training size --parameters shows each)"]

    @classmethod
    def field_docs(cls) -> list[tuple[str, Any, str]]:
        return [(f.name, f.default, f.metadata["doc"]) for f in dataclasses.fields(cls)]

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> TrainingConfig:
        """Merge `context["training"]` with `training.<field>` overrides, then parse and validate."""
        base = context.get(CONTEXT_KEY, {})
        if not isinstance(base, Mapping):
            raise ConfigError(f"{CONTEXT_KEY}={base!r}: must be an object of settings")
        merged = dict(base)
        prefix = CONTEXT_KEY + "."
        merged.update({k[len(prefix):]: v for k, v in context.items() if k.startswith(prefix)})
        return cls.from_mapping(merged)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainingConfig:
        token = _PREFIX.set(CONTEXT_KEY)
        try:
            return cls._from_mapping(values)
        finally:
            _PREFIX.reset(token)

    @classmethod
    def _from_mapping(cls, values: Mapping[str, Any]) -> TrainingConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        parsed = {}
        for name, raw in values.items():
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{CONTEXT_KEY}.{name}={_show(raw)}: unknown field{hint}; allowed: "
                                  f"{', '.join(fields)}")
            parsed[name] = _coerce(fields[name], raw)
        return cls(**parsed)


def _show(value: Any) -> str:
    if isinstance(value, TeamConfig):
        return value.name
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _coerce(f: dataclasses.Field, raw: Any) -> Any:
    """Turn a cdk.json value or a `-c` string into the field's type, or raise ConfigError."""
    kind = f.type
    where = f"{CONTEXT_KEY}.{f.name}={_show(raw)}"
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise ConfigError(f"{where}: must be true or false")
    if kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
            return int(raw)
        raise ConfigError(f"{where}: must be an integer{_range_text(f)}")
    if kind == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        raise ConfigError(f"{where}: must be a number{_range_text(f)}")
    if kind == "tuple[TeamConfig, ...]":
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f"{where}: must be a JSON object of team name -> settings") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must be an object of team name -> settings")
        return tuple(TeamConfig.parse(name, value) for name, value in raw.items())
    if kind == "tuple[str, ...]":
        if isinstance(raw, str):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
            return tuple(raw)
        raise ConfigError(f"{where}: must be a list of strings (comma-separated on the command line)")
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: must be a string")
    return raw


def _check_type(f: dataclasses.Field, value: Any) -> Any:
    """The value in the field's type (an int where a float goes, a list where a tuple goes), or ConfigError.
    Strings are not parsed here: that is `from_context`'s job; a Python caller passes real types."""
    kind, where = f.type, f"{_PREFIX.get()}.{f.name}={value!r}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be True or False")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer{_range_text(f)}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number{_range_text(f)}")
        return float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string")
    elif kind == "tuple[str, ...]":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{where}: must be a tuple of strings")
        return tuple(value)
    elif kind == "tuple[TeamConfig, ...]":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                not all(isinstance(x, TeamConfig) for x in value):
            raise ConfigError(f"{where}: must be a tuple of TeamConfig (or, in cdk.json, an object of team name "
                              "-> settings)")
        return tuple(value)
    return value


def _range_text(f: dataclasses.Field) -> str:
    if "min" not in f.metadata:
        return ""
    low = "above" if f.metadata.get("exclusive_min") else "from"
    return f" {low} {f.metadata['min']} to {f.metadata['max']}"


def _check_rules(f: dataclasses.Field, value: Any) -> None:
    rules = f.metadata
    where = f"{_PREFIX.get()}.{f.name}={_show(value)}"
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{where}: must be a finite number{_range_text(f)}")
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{where}: must be one of {', '.join(map(str, rules['choices']))}")
    if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
        raise ConfigError(f"{where}: must be {rules['allowed']}")
    if "min" in rules:
        too_low = value <= rules["min"] if rules.get("exclusive_min") else value < rules["min"]
        if too_low or value > rules["max"]:
            raise ConfigError(f"{where}: must be{_range_text(f)}")
