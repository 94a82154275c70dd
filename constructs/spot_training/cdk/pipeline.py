"""The L3 construct: a SageMaker pipeline that runs multi-node PyTorch fine-tuning on managed spot,
in private subnets, with checkpoints keyed on the pipeline execution."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_sagemaker as sagemaker
from aws_cdk import aws_sns as sns
from constructs import Construct

from spot_training.cdk.alarms import PipelineAlarms
from spot_training.cdk.ladder import CapacityController, RunIdentity
from spot_training.config.capacity import ON_DEMAND, SPOT
from spot_training.config.ladder import plan_for, rung_config
from spot_training.config.settings import ConfigError, TrainingConfig
from spot_training.definition.rules import Expectations
from spot_training.config.layout import LINEAGE_KEYS, PREFIXES
from spot_training.cdk.nag import acknowledge, arn_finding, bucket_arn_and_finding
from spot_training.cdk.network import TrainingSecurityGroup
from spot_training.cdk.roles import REVIEWED, PreparationLimits, TrainingRoles, model_package_arns
from spot_training.cdk.storage import ArtifactStore
from spot_training.definition.trainer_code import default_trainer_dir, deterministic_tarball, load_metric_definitions


# Start and follow runs; ListPipelineExecutions and ListPipelineParametersForExecution find a run's executions
# (start --resume-run, report --run).
START_ACTIONS = ["sagemaker:StartPipelineExecution", "sagemaker:RetryPipelineExecution",
                 "sagemaker:DescribePipelineExecution", "sagemaker:ListPipelineExecutionSteps",
                 "sagemaker:StopPipelineExecution", "sagemaker:ListPipelineExecutions",
                 "sagemaker:ListPipelineParametersForExecution"]


class TrainingPipeline(Construct):
    """A SageMaker pipeline whose one TrainingStep fine-tunes a model on `instance_count` GPU instances.

    The definition is generated at synth by the SageMaker Python SDK v2 `PyTorch` estimator with
    `torch_distributed`, offline and deterministically. Nothing runs on deploy: start each run with
    `start-pipeline-execution` (see `grant_start_execution`).
    """

    def __init__(self, scope: Construct, id: str, *, config: TrainingConfig, vpc: ec2.IVpc,
                 subnets: Sequence[ec2.ISubnet] | None = None,
                 security_group: ec2.ISecurityGroup | None = None,
                 bucket: s3.IBucket | None = None, key: kms.IKey | None = None,
                 training_role: iam.IRole | None = None, pipeline_role: iam.IRole | None = None,
                 grant_roles: bool = True, trainer_source_dir: str | Path | None = None,
                 metric_definitions: Sequence[Mapping[str, str]] | None = None,
                 hyperparameters: Mapping[str, str | int | float | bool] | None = None,
                 environment: Mapping[str, str] | None = None,
                 alarms: bool = True, endpoint_security_group: ec2.ISecurityGroup | None = None,
                 alarm_key: kms.IKey | None = None, alarm_topic: sns.ITopic | None = None,
                 run_identity: RunIdentity | None = None) -> None:
        """
        :param config: the validated platform settings (instance type and count, spot, limits, ...).
        :param vpc: the VPC the training instances run in.
        :param subnets: the subnets of `vpc` to run in, private ones
            (@default - the VPC's isolated subnets, else its private subnets with egress).
        :param security_group: the training instances' group
            (@default - a new group with the networking stack's rules: all traffic among its members, HTTPS to
            `endpoint_security_group` (which then admits it) or else the VPC CIDR, HTTPS to the S3 prefix list).
        :param bucket: artifact bucket for data, models, checkpoints and outputs, with `key`
            (@default - a new `ArtifactStore`: KMS key, versioned bucket, access logs).
        :param key: the KMS key of `bucket`, also used for outputs and volumes (give both or neither).
        :param training_role: the training jobs' execution role
            (@default - a new least-privilege role, see `TrainingRoles`).
        :param pipeline_role: the role the pipeline runs as
            (@default - a new role limited to this config's instance types, runtime, subnets and keys).
        :param grant_roles: attach to `training_role` and `pipeline_role` the managed policies each needs (the
            statements of `TrainingRoles`: S3 prefixes, KMS through S3, logs, ECR pull, VPC-mode ENIs for the
            execution role; guarded CreateTrainingJob, Describe/Stop/AddTags and PassRole for the pipeline
            role). Set False when the given roles already carry them (roles from `TrainingRoles`)
            (@default True). Roles this construct creates always get them.
        :param trainer_source_dir: the trainer code folder, entry point `train.py`
            (@default - the trainer shipped with this package).
        :param hyperparameters: what the trainer receives as `--name value` arguments, replacing the built-in
            trainer's (max_steps, learning_rate, ... fed by the pipeline parameters) (@default - those). A custom
            trainer gets exactly these, so its argument parser may be strict; numbers, booleans and strings
            without whitespace or shell syntax (the toolkit starts torchrun through a shell line).
        :param environment: extra environment variables of the training container, added to the offline
            ones (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, TOKENIZERS_PARALLELISM) (@default - none).
        :param metric_definitions: SageMaker metric definitions
            (@default - `METRIC_DEFINITIONS` of the trainer's `log_format.py`).
        :param alarms: create `PipelineAlarms` (failed, stopped and overlong executions to an SNS topic,
            e-mail from `config.alarm_email`) (@default True).
        :param alarm_key: the alarms' KMS key (@default - a new one; see `PipelineAlarms`).
        :param alarm_topic: an existing topic for the alarms (@default - a new encrypted topic).
        :param endpoint_security_group: the VPC interface endpoints' group, for the HTTPS of the alarm monitor and
            of the security group this construct creates (@default - HTTPS to the VPC's CIDR block).
        :param run_identity: the function of the pipeline's ResolveRun step (@default - a new `RunIdentity`;
            `TeamPipelines` give their pipelines the shared pipeline's). The pipeline role gets a managed policy to
            invoke it.

        With `config.capacity_ladder`, a second pipeline `<pipeline_name>-on-demand` runs the same definition
        without spot (`on_demand_pipeline`), the spot pipeline's MaxWait and MaxRuntime come from the ladder's
        first rung (`ladder_plan`), and a `CapacityController` climbs a run whose execution ended for capacity.
        """
        super().__init__(scope, id)
        _require_pair("bucket", bucket, "key", key)
        if config.teams:
            raise ConfigError(f"config.teams: {len(config.teams)} team(s) given; a TrainingPipeline is one pipeline: "
                              "pass dataclasses.replace(config, teams=()) here and the teams to "
                              "TeamPipelines(scope, id, shared=<this pipeline>, teams=config.teams)")
        config = config_for_stack(config, cdk.Stack.of(self))
        self.config = config
        self.vpc, self.endpoint_security_group = vpc, endpoint_security_group
        # The SageMaker SDK is imported here, on first use, not when this package is imported.
        from spot_training.definition import build as sdk

        self.image_uri = sdk.default_image_uri(config)
        self.subnets = _training_subnets(vpc, subnets)
        self.security_group = security_group or TrainingSecurityGroup(
            self, "SecurityGroup", vpc=vpc, endpoint_security_group=endpoint_security_group).security_group
        if bucket is None:
            store = ArtifactStore.for_config(self, "Store", config)
            bucket, key = store.bucket, store.key
        self.bucket, self.key = bucket, key
        self.preparation = preparation_limits(config)
        source_dir = Path(trainer_source_dir) if trainer_source_dir else default_trainer_dir()
        self.evaluation = evaluation_limits(config, source_dir, hyperparameters)
        if config.evaluate_model and self.evaluation is None:
            cdk.Annotations.of(self).add_warning_v2(
                "spot-training:NoEvaluation", "evaluate_model is on, but a custom trainer (hyperparameters, or a "
                f"trainer_source_dir without {EVALUATION_SCRIPT}) runs: the pipeline ends with the model, with no "
                "evaluation, gate or registration")
        self.model_package_group_name = config.model_package_group_name if self.evaluation else None
        self.roles = self._roles(training_role, pipeline_role, grant_roles)
        self.training_role, self.pipeline_role = self.roles.training_role, self.roles.pipeline_role
        self.mlflow_tracking_server = self._create_mlflow_tracking_server() if config.mlflow else None
        self.code_asset = self._package_trainer(source_dir)
        self.placeholders = sdk.Placeholders.for_counts(len(self.subnets), 1)
        self.run_identity = run_identity or RunIdentity(self, "RunIdentity", vpc=vpc, subnets=self.subnets,
                                                        endpoint_security_group=endpoint_security_group)
        self.run_identity.invoke_policy("InvokeResolveRun", self, [self.pipeline_role])
        self.ladder_plan = plan_for(config) if config.capacity_ladder else None

        def definition_for(capacity: str) -> tuple[dict[str, Any], Expectations]:
            rung = rung_config(config, capacity)
            definition = sdk.generate(rung, placeholders=self.placeholders, image_uri=self.image_uri,
                                      metric_definitions=metric_definitions or load_metric_definitions(source_dir),
                                      hyperparameters=hyperparameters, environment=environment,
                                      evaluation=self.evaluation is not None)
            return definition, Expectations(
                use_spot=rung.use_spot, network_isolation=config.network_isolation,
                inter_container_encryption=config.inter_container_encryption,
                volume_encryption=config.volume_encryption_allowed,
                preparation_volume_encryption=self.preparation.volume_encryption if self.preparation else None,
                evaluation_volume_encryption=self.evaluation.volume_encryption if self.evaluation else None)

        self.definition, self.expectations = definition_for(SPOT)
        self.model_package_group = (self._create_model_package_group()
                                    if self.evaluation and config.create_model_package_group else None)
        self.pipeline = sagemaker.CfnPipeline(
            self, "Resource", pipeline_name=config.pipeline_name, role_arn=self.pipeline_role.role_arn,
            pipeline_description="Multi-node PyTorch fine-tuning on managed spot with checkpoint recovery",
            pipeline_definition={"PipelineDefinitionBody": self._definition_body(self.definition)})
        self.pipeline_name = config.pipeline_name
        self.pipeline_arn = self._pipeline_arn(config.pipeline_name)
        # Every deployed definition with what it must say: the definition rules check each one at synth.
        self.checked_definitions = [(self.pipeline, self.definition, self.expectations)]
        self.on_demand_pipeline = None
        if self.ladder_plan is not None:
            definition, expectations = definition_for(ON_DEMAND)
            self.on_demand_pipeline = sagemaker.CfnPipeline(
                self, "OnDemand", pipeline_name=self.ladder_plan.pipelines[ON_DEMAND], role_arn=self.pipeline_role.role_arn,
                pipeline_description="The capacity ladder's on-demand rung: the same training without managed spot",
                pipeline_definition={"PipelineDefinitionBody": self._definition_body(definition)})
            self.checked_definitions.append((self.on_demand_pipeline, definition, expectations))
        for resource, _, _ in self.checked_definitions:
            if self.model_package_group is not None:
                resource.node.add_dependency(self.model_package_group)
        self.pipeline_arns = [self._pipeline_arn(resource.pipeline_name) for resource, _, _ in self.checked_definitions]
        self.alarms = PipelineAlarms(
            self, "Alarms", pipeline_name=config.pipeline_name, pipeline_arn=self.pipeline_arn, vpc=vpc,
            subnets=self.subnets, alarm_after_hours=config.alarm_after_hours, email=config.alarm_email or None,
            endpoint_security_group=endpoint_security_group, key=alarm_key, topic=alarm_topic,
            other_pipeline_arns=self.pipeline_arns[1:]) if alarms else None
        self.alarm_topic = self.alarms.topic if self.alarms else None
        self.capacity_controller = CapacityController(
            self, "CapacityLadder", plan=self.ladder_plan, pipeline_arns=self.pipeline_arns,
            training_step=sdk.TRAINING_STEP_NAME, vpc=vpc, subnets=self.subnets,
            endpoint_security_group=endpoint_security_group, key=self.run_identity.key, topic=self.alarm_topic,
            # The alarms' key is the topic's when the topic was created here or came with its key.
            topic_key=self.alarms.key if self.alarms and (alarm_topic is None or alarm_key is not None) else None) \
            if self.ladder_plan is not None else None

    def _pipeline_arn(self, name: str) -> str:
        return cdk.Stack.of(self).format_arn(service="sagemaker", resource="pipeline", resource_name=name.lower())

    def _start_grants(self) -> list[dict[str, Any]]:
        """Start and follow runs of this pipeline; and list the data prefix of the artifact bucket, which
        `spot-training start` does to fingerprint the data (operations.runs.data_fingerprint): keys only, no
        object reads. `s3:prefix` is ListBucket's condition key for the requested prefix (Service Authorization
        Reference, Amazon S3: list_amazons3.html)."""
        grants = [{"actions": START_ACTIONS,
                   "resource_arns": [*self.pipeline_arns, *[f"{arn}/execution/*" for arn in self.pipeline_arns]]},
                  {"actions": ["s3:ListBucket"], "resource_arns": [self.bucket.bucket_arn],
                   "conditions": {"StringLike": {"s3:prefix": [f"{PREFIXES['data']}*"]}}}]
        if self.model_package_group_name and self.config.compare_with_approved:
            # `start` reads the latest Approved model's lineage and report (operations.runs.approved_model_loss).
            _, packages = model_package_arns(cdk.Stack.of(self), self.model_package_group_name)
            bucket_arn, _ = bucket_arn_and_finding(self, self.bucket)
            grants += [{"actions": ["sagemaker:ListModelPackages"], "resource_arns": ["*"]},
                       {"actions": ["sagemaker:DescribeModelPackage"], "resource_arns": [packages]},
                       {"actions": ["s3:GetObject"], "resource_arns": [f"{bucket_arn}/{PREFIXES['evaluation']}*"]},
                       {"actions": ["kms:Decrypt"], "resource_arns": [self.key.key_arn], "conditions": {
                           "StringEquals": {"kms:ViaService": f"s3.{cdk.Stack.of(self).region}.amazonaws.com"}}}]
        return grants

    def grant_start_execution(self, grantee: iam.IGrantable) -> iam.Grant:
        """Let `grantee` start runs of this pipeline and follow them (start, retry, describe, list steps, stop),
        with `spot-training start`'s listing of the data prefix."""
        grants = [iam.Grant.add_to_principal(grantee=grantee, **grant) for grant in self._start_grants()]
        combined = grants[0]
        for grant in grants[1:]:
            combined = combined.combine(grant)
        return combined

    def start_execution_policy(self, id: str, roles: Sequence[iam.IRole]) -> iam.ManagedPolicy:
        """The same rights as `grant_start_execution`, as a managed policy attached to `roles` (for roles this
        app does not own: no inline policy is written onto them)."""
        policy = iam.ManagedPolicy(self, id, roles=list(roles), statements=[
            iam.PolicyStatement(actions=g["actions"], resources=g["resource_arns"], conditions=g.get("conditions"))
            for g in self._start_grants()])
        acknowledge(policy, {
            f"AwsSolutions-IAM5[Resource::{arn_finding(self, 'sagemaker', f'pipeline/{name.lower()}')}/execution/*]":
            "Execution ids are created at start; the wildcard covers executions of this one pipeline only."
            for name in [resource.pipeline_name for resource, _, _ in self.checked_definitions]})
        if self.model_package_group_name and self.config.compare_with_approved:
            _, bucket_ref = bucket_arn_and_finding(self, self.bucket)
            acknowledge(policy, {
                f"AwsSolutions-IAM5[Resource::{arn_finding(self, 'sagemaker', f'model-package/{self.model_package_group_name.lower()}/*')}]":
                "start reads the latest approved version of this one group; versions are numbered at registration.",
                "AwsSolutions-IAM5[Resource::*]": "sagemaker:ListModelPackages supports no resource-level permissions.",
                f"AwsSolutions-IAM5[Resource::{bucket_ref}/{PREFIXES['evaluation']}*]": "start reads the approved "
                "model's evaluation report, under a key made at run time, in this one prefix.",
            })
        return policy

    def _create_model_package_group(self) -> sagemaker.CfnModelPackageGroup:
        """The registry of this pipeline's models, kept when the stack is deleted (approved models outlive it)."""
        group = sagemaker.CfnModelPackageGroup(
            self, "ModelPackageGroup", model_package_group_name=self.model_package_group_name,
            model_package_group_description=f"Models fine-tuned by pipeline {self.config.pipeline_name}: each "
            "registered PendingManualApproval after beating its base model on held-out data")
        group.apply_removal_policy(cdk.RemovalPolicy.RETAIN)
        return group

    def _approver_statements(self) -> list[iam.PolicyStatement]:
        """Review this pipeline's models: read them and their evaluation reports, and approve or reject them
        (UpdateModelPackage, its status bound to Approved or Rejected by sagemaker:ModelApprovalStatus)."""
        if self.model_package_group_name is None:
            raise ValueError(f"{self.node.path}: this pipeline registers no models (evaluate_model is off or a custom "
                             "trainer runs), so there is nothing to approve")
        group, packages = model_package_arns(cdk.Stack.of(self), self.model_package_group_name)
        bucket_arn, _ = bucket_arn_and_finding(self, self.bucket)
        return [
            # The status only: a request that sets or removes any lineage property is not allowed (the keys are
            # defined for UpdateModelPackage in the Service Authorization Reference; Null true = not in the request).
            iam.PolicyStatement(sid="ApproveOrRejectModels", actions=["sagemaker:UpdateModelPackage"],
                                resources=[packages],
                                conditions={"StringEquals": {"sagemaker:ModelApprovalStatus": list(REVIEWED)},
                                            "Null": {"sagemaker:CustomerMetadataPropertiesToRemove": "true",
                                                     **{f"sagemaker:CustomerMetadataProperties/{key}": "true"
                                                        for key in LINEAGE_KEYS}}}),
            iam.PolicyStatement(sid="ReadModels", actions=["sagemaker:DescribeModelPackage"], resources=[packages]),
            iam.PolicyStatement(sid="ReadModelGroup", actions=["sagemaker:DescribeModelPackageGroup"],
                                resources=[group]),
            # ListModelPackages supports no resource-level permissions (Service Authorization Reference).
            iam.PolicyStatement(sid="ListModels", actions=["sagemaker:ListModelPackages"], resources=["*"]),
            iam.PolicyStatement(sid="ReadEvaluationReports", actions=["s3:GetObject"],
                                resources=[f"{bucket_arn}/{PREFIXES['evaluation']}*"]),
            iam.PolicyStatement(sid="DecryptEvaluationReportsThroughS3", actions=["kms:Decrypt"],
                                resources=[self.key.key_arn],
                                conditions={"StringEquals": {"kms:ViaService": f"s3.{cdk.Stack.of(self).region}.amazonaws.com"}}),
        ]

    def model_approver_policy(self, id: str, roles: Sequence[iam.IRole]) -> iam.ManagedPolicy:
        """A managed policy for the reviewers of this pipeline's models, attached to `roles`: list and read the
        group's packages and their evaluation reports, and set a package Approved or Rejected. The pipeline role
        itself can only register PendingManualApproval."""
        policy = iam.ManagedPolicy(self, id, roles=list(roles), statements=self._approver_statements())
        _, bucket_ref = bucket_arn_and_finding(self, self.bucket)
        acknowledge(policy, {
            f"AwsSolutions-IAM5[Resource::{arn_finding(self, 'sagemaker', f'model-package/{self.model_package_group_name.lower()}/*')}]":
            "Model package versions are numbered by SageMaker at registration; the pattern covers this one group.",
            "AwsSolutions-IAM5[Resource::*]": "sagemaker:ListModelPackages supports no resource-level permissions; "
            "it lists names and statuses only.",
            f"AwsSolutions-IAM5[Resource::{bucket_ref}/{PREFIXES['evaluation']}*]": "Reviewers read each run's "
            "evaluation report, under a key made at run time, in this one prefix.",
        })
        return policy

    def _create_mlflow_tracking_server(self) -> sagemaker.CfnMlflowTrackingServer:
        """A SageMaker managed MLflow tracking server storing artifacts under `mlflow/`; the training role may
        log to this server only."""
        role = iam.Role(self, "MlflowRole", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
                        description="SageMaker managed MLflow tracking server of the training pipeline")
        bucket_arn, bucket_ref = bucket_arn_and_finding(self, self.bucket)
        artifacts = iam.ManagedPolicy(self, "MlflowArtifacts", roles=[role], statements=[
            iam.PolicyStatement(actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                                resources=[f"{bucket_arn}/{PREFIXES['mlflow']}*"]),
            iam.PolicyStatement(actions=["s3:ListBucket", "s3:GetBucketLocation"], resources=[self.bucket.bucket_arn]),
            iam.PolicyStatement(actions=["kms:Decrypt", "kms:GenerateDataKey"], resources=[self.key.key_arn])])
        server = sagemaker.CfnMlflowTrackingServer(
            self, "MlflowTrackingServer", tracking_server_name=f"{self.config.pipeline_name}-tracking",
            artifact_store_uri=f"s3://{self.bucket.bucket_name}/{PREFIXES['mlflow']}", role_arn=role.role_arn,
            tracking_server_size="Small", automatic_model_registration=False)
        log_to_it = iam.ManagedPolicy(self, "LogToMlflow", roles=[self.training_role], statements=[
            iam.PolicyStatement(actions=["sagemaker-mlflow:*"], resources=[server.attr_tracking_server_arn])])
        acknowledge(log_to_it, {
            "AwsSolutions-IAM5[Action::sagemaker-mlflow:*]": "The MLflow client needs the whole sagemaker-mlflow "
            "action set (runs, metrics, params, artifacts) and it is bound to this one tracking server.",
        })
        acknowledge(artifacts, {
            f"AwsSolutions-IAM5[Resource::{bucket_ref}/{PREFIXES['mlflow']}*]": "MLflow writes run artifacts "
            "under keys it creates; the server may touch only the mlflow/ prefix.",
        })
        return server

    def _roles(self, training_role: iam.IRole | None, pipeline_role: iam.IRole | None,
               grant_roles: bool) -> TrainingRoles:
        config = self.config
        return TrainingRoles(self, "Roles", bucket=self.bucket, key=self.key, image_uri=self.image_uri,
                             training_role=training_role, pipeline_role=pipeline_role,
                             grant_training_role=grant_roles, grant_pipeline_role=grant_roles,
                             subnets=self.subnets, security_groups=[self.security_group],
                             allowed_instance_types=config.instance_type_allow_list,
                             max_run_seconds=config.max_run_seconds, network_isolation=config.network_isolation,
                             inter_container_encryption=config.inter_container_encryption,
                             volume_encryption=config.volume_encryption_allowed,
                             preparation=self.preparation, evaluation=self.evaluation,
                             model_package_group=self.model_package_group_name)

    def _package_trainer(self, source_dir: Path) -> s3_assets.Asset:
        archive = deterministic_tarball(source_dir)
        asset = s3_assets.Asset(self, "TrainerCode", path=str(archive))
        # A managed policy in this stack, attached to the role: no inline policy, no cross-stack cycle.
        # SageMaker lists each input channel's S3 prefix before it downloads (SageMaker developer guide, "How to
        # use SageMaker AI execution roles": s3:ListBucket scoped to the InputDataConfig S3Uri).
        iam.ManagedPolicy(self, "ReadTrainerCode", roles=[self.training_role], statements=[
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[asset.bucket.arn_for_objects(asset.s3_object_key)]),
            iam.PolicyStatement(actions=["s3:ListBucket"], resources=[asset.bucket.bucket_arn],
                                conditions={"StringEquals": {"s3:prefix": asset.s3_object_key}})])
        return asset

    def _definition_body(self, definition: Mapping[str, Any]) -> str:
        """A generated definition as JSON, each placeholder swapped for its deploy-time token."""
        placeholders = self.placeholders
        substitutions = {
            placeholders.resolve_run_function_arn: self.run_identity.function.function_arn,
            placeholders.role_arn: self.training_role.role_arn,
            placeholders.bucket_name: self.bucket.bucket_name,
            placeholders.kms_key_arn: self.key.key_arn,
            placeholders.code_bucket_name: self.code_asset.s3_bucket_name,
            placeholders.code_object_key: self.code_asset.s3_object_key,
            **{p: s.subnet_id for p, s in zip(placeholders.subnet_ids, self.subnets)},
            placeholders.security_group_ids[0]: self.security_group.security_group_id,
            **({placeholders.mlflow_tracking_server_arn: self.mlflow_tracking_server.attr_tracking_server_arn}
               if self.mlflow_tracking_server else {}),
        }
        body = json.dumps(definition, separators=(",", ":"))
        for placeholder, token in substitutions.items():
            body = body.replace(placeholder, token)
        return body


def preparation_limits(config: TrainingConfig) -> PreparationLimits | None:
    """What the pipeline role must allow for the preparation step, or None without one."""
    if not config.prepare_data:
        return None
    return PreparationLimits(instance_type=config.preparation_instance_type,
                             max_run_seconds=config.preparation_max_run_seconds,
                             volume_encryption=config.preparation_volume_encryption_allowed)


EVALUATION_SCRIPT = "evaluate.py"


def evaluation_limits(config: TrainingConfig, source_dir: Path | None = None,
                      hyperparameters: Mapping[str, Any] | None = None) -> PreparationLimits | None:
    """What the pipeline role must allow for the evaluation step, or None without one: it runs the built-in
    trainer's evaluate.py, so a custom trainer (its own hyperparameters or code) gets none."""
    source_dir = source_dir or default_trainer_dir()
    if not config.evaluate_model or hyperparameters is not None or not (source_dir / EVALUATION_SCRIPT).is_file():
        return None
    return PreparationLimits(instance_type=config.evaluation_instance_type,
                             max_run_seconds=config.evaluation_max_run_seconds,
                             volume_encryption=config.evaluation_volume_encryption_allowed)


def config_for_stack(config: TrainingConfig, stack: cdk.Stack) -> TrainingConfig:
    """`config` in its stack's region: the training image, the SDK session and the definition are per region.
    An environment-agnostic stack takes `config.region` as is (the pipeline is then right only there)."""
    if cdk.Token.is_unresolved(stack.region):
        if not config.region:
            raise ValueError("TrainingConfig.region: empty, and the stack is environment-agnostic; the training image "
                             "and the pipeline definition are per region: give the stack env=cdk.Environment(region=...) "
                             "or set TrainingConfig(region=...)")
        return config
    if config.region and config.region != stack.region:
        raise ValueError(f"TrainingConfig.region={config.region}: the stack deploys to {stack.region}; leave region "
                         "empty to follow the stack, or make them match")
    return dataclasses.replace(config, region=stack.region)


def _training_subnets(vpc: ec2.IVpc, given: Sequence[ec2.ISubnet] | None) -> list[ec2.ISubnet]:
    """`given`, checked against the VPC where its subnets are known; else the VPC's isolated subnets, else
    its private subnets with egress. Never public subnets: training instances get no public address."""
    known = {s.subnet_id: kind for kind, group in (("public", vpc.public_subnets), ("private", vpc.private_subnets),
                                                  ("isolated", vpc.isolated_subnets)) for s in group}
    if given is None:
        chosen = list(vpc.isolated_subnets) or list(vpc.private_subnets)
        if not chosen:
            raise ValueError(f"subnets: none given, and the vpc has no isolated or private subnets to default to "
                             f"(it has {len(vpc.public_subnets)} public); pass subnets=[...] of private subnets")
    else:
        chosen = list(given)
        foreign = [s.subnet_id for s in chosen if known and s.subnet_id not in known]
        if foreign:
            raise ValueError(f"subnets: {', '.join(foreign)} not among the vpc's {len(known)} subnets")
        public = [s.subnet_id for s in chosen if known.get(s.subnet_id) == "public"]
        if public:
            raise ValueError(f"subnets: {', '.join(public)} are public subnets of the vpc; pass private subnets")
    if not 1 <= len(chosen) <= 16:
        raise ValueError(f"subnets: {len(chosen)} given; a training job takes 1 to 16 subnets")
    return chosen


def _require_pair(name_a: str, a: Any, name_b: str, b: Any) -> None:
    if (a is None) != (b is None):
        raise ValueError(f"{name_a} and {name_b}: give both (bring your own) or neither (created for you)")
