"""Least-privilege IAM for training: the job's execution role and the pipeline's role."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from spot_training.config.layout import PREFIXES
from spot_training.cdk.nag import acknowledge, arn_finding, bucket_arn_and_finding

SAGEMAKER = iam.ServicePrincipal("sagemaker.amazonaws.com")
# Pipelines name the training jobs they create `pipelines-<id>-<step>-<hash>`.
PIPELINE_JOB_PATTERN = "pipelines-*"


def ecr_repository_arn(image_uri: str) -> str:
    """`<account>.dkr.ecr.<region>.amazonaws.com/<repo>:<tag>` -> the repository's ARN."""
    match = re.fullmatch(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/([^:@]+)[:@].+", image_uri)
    if not match:
        raise ValueError(f"image_uri={image_uri}: must be an ECR image URI "
                         "<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>")
    account, region, repository = match.groups()
    return f"arn:{cdk.Aws.PARTITION}:ecr:{region}:{account}:repository/{repository}"


def network_interface_arns(stack: cdk.Stack, subnets: Sequence[ec2.ISubnet],
                           security_groups: Sequence[ec2.ISecurityGroup]) -> tuple[str, list[str]]:
    """For a role whose service creates ENIs in our VPC: the network-interface ARN pattern, and what
    `ec2:CreateNetworkInterface` may touch (that pattern, the subnets, the security groups)."""
    eni = stack.format_arn(service="ec2", resource="network-interface", resource_name="*")
    return eni, [eni, *[stack.format_arn(service="ec2", resource="subnet", resource_name=s.subnet_id) for s in subnets],
                 *[stack.format_arn(service="ec2", resource="security-group", resource_name=g.security_group_id)
                   for g in security_groups]]


UNSCOPED_ENI_REASON = ("The ENI rights of VPC mode are unscoped because the role also runs the preparation "
                       "or evaluation (processing) jobs, whose creation-time validation fails on scoped ENI permissions (SageMaker "
                       "developer guide, 'How to use SageMaker AI execution roles'); the pipeline role still binds "
                       "every job to our subnets and security groups.")


@dataclasses.dataclass(frozen=True)
class PreparationLimits:
    """What one of the pipeline's processing steps (the preparation, the evaluation) may request."""

    instance_type: str
    max_run_seconds: int
    volume_encryption: bool


# The status a pipeline may register a model in; a reviewer (the approver policy) moves it on.
PENDING = "PendingManualApproval"
REVIEWED = ("Approved", "Rejected")


def model_package_arns(stack: cdk.Stack, group: str) -> tuple[str, str]:
    """The group's ARN and the pattern of its versioned packages (`model-package/<group>/<version>`; SageMaker
    ARNs carry resource names in lower case, as pipeline ARNs do)."""
    return (stack.format_arn(service="sagemaker", resource="model-package-group", resource_name=group.lower()),
            stack.format_arn(service="sagemaker", resource="model-package", resource_name=f"{group.lower()}/*"))


class TrainingRoles(Construct):
    """The training job's execution role and the SageMaker pipeline's role, each with one managed policy.

    The execution role reads `data/` and `models/`, reads and writes `checkpoints/`, writes `outputs/`,
    uses the KMS key only through S3, writes its own logs, pulls the training image and manages the ENIs
    of VPC mode. The pipeline role may create training jobs only inside our subnets and security groups,
    with isolation, encryption, KMS keys, instance types and a runtime cap as configured
    (`sagemaker:*` condition keys), and pass only the execution role, only to SageMaker.
    """

    def __init__(self, scope: Construct, id: str, *, bucket: s3.IBucket, key: kms.IKey, image_uri: str,
                 subnets: Sequence[ec2.ISubnet], security_groups: Sequence[ec2.ISecurityGroup],
                 allowed_instance_types: Sequence[str], max_run_seconds: int, network_isolation: bool = True,
                 inter_container_encryption: bool = True, volume_encryption: bool = False,
                 training_role: iam.IRole | None = None, pipeline_role: iam.IRole | None = None,
                 grant_training_role: bool = True, grant_pipeline_role: bool = True,
                 preparation: PreparationLimits | None = None, evaluation: PreparationLimits | None = None,
                 model_package_group: str | None = None) -> None:
        """
        :param image_uri: the training image; the execution role may pull from its repository only.
        :param subnets: the only subnets a training job may use.
        :param security_groups: the only security groups a training job may use.
        :param allowed_instance_types: the instance types a training job may request.
        :param max_run_seconds: the highest MaxRuntimeInSeconds a training job may request.
        :param volume_encryption: whether jobs pass VolumeKmsKeyId (@default False: local-NVMe types).
        :param training_role: an existing execution role to pass (@default - a new one).
        :param pipeline_role: an existing role for the pipeline to run as (@default - a new one).
        :param grant_training_role: attach the execution role's managed policy to `training_role` (@default
            True; False when the given role already carries it). A role created here always gets it.
        :param grant_pipeline_role: attach the pipeline role's managed policy to `pipeline_role` (@default True).
            Managed policies attach through their own Roles list, so imported roles get them even when
            imported with `mutable=False`.
        :param preparation: the preparation step's limits: the pipeline role may then create processing jobs
            under the same network, isolation and KMS conditions, with this instance type and runtime cap, and
            the execution role writes `prepared/` (@default None: no preparation step).
        :param evaluation: the evaluation step's limits, the same way: the execution role then reads `outputs/`
            (the fine-tuned model) and writes `evaluation/` (@default None: no evaluation step).
        :param model_package_group: the group the pipeline registers models in: the pipeline role may create
            packages there only, only as PendingManualApproval, and read the evaluation report the gate reads
            (@default None: no registration).
        """
        super().__init__(scope, id)
        stack = cdk.Stack.of(self)
        self.training_policy = None
        self.pipeline_policy = None
        bucket_arn, bucket_ref = bucket_arn_and_finding(self, bucket)
        processing = preparation is not None or evaluation is not None
        if training_role is None:
            training_role, grant_training_role = iam.Role(
                self, "TrainingRole", assumed_by=SAGEMAKER,
                description="Execution role of the distributed training jobs"), True
        if grant_training_role:
            self.training_policy = iam.ManagedPolicy(
                self, "TrainingPolicy", roles=[training_role],
                statements=self._training_statements(stack, bucket_arn, key, image_uri, subnets, security_groups,
                                                     preparation is not None, evaluation is not None))
            self._acknowledge_training_policy(bucket_ref, preparation is not None, evaluation is not None)
            if processing:  # the same finding for checkov, on the policy itself
                self.training_policy.node.default_child.add_metadata("checkov", {"skip": [
                    {"id": check, "comment": UNSCOPED_ENI_REASON}
                    for check in ("CKV_AWS_109", "CKV_AWS_111", "CKV_AWS_356")]})
        self.training_role = training_role
        if pipeline_role is None:
            pipeline_role, grant_pipeline_role = iam.Role(
                self, "PipelineRole", assumed_by=SAGEMAKER,
                description="Role of the SageMaker pipeline: starts the training jobs"), True
        self.pipeline_role = pipeline_role
        if not grant_pipeline_role:
            return
        job_arn = stack.format_arn(service="sagemaker", resource="training-job", resource_name=PIPELINE_JOB_PATTERN)
        subnet_ids = [s.subnet_id for s in subnets]
        group_ids = [g.security_group_id for g in security_groups]

        # Condition keys of CreateTrainingJob and CreateProcessingJob (Service Authorization Reference for
        # SageMaker AI; the same set for both). SageMaker sets each key from the request's own fields, and the SDK
        # leaves false flags out of the request, so:
        # - ForAllValues is vacuously true for a missing key: Null=false makes the keys required;
        # - Bool "true" requires isolation/encryption; when the config turns one off nothing is required (a
        #   `Bool false` condition on a key the request lacks would never match);
        # - the key ARNs: the output key is always set; the volume key only where no allowed type has local
        #   NVMe storage (SageMaker rejects VolumeKmsKeyId there), else it is checked only when present.
        def job_conditions(instance_types: Sequence[str], max_seconds: int, volume_key: bool) -> dict:
            required_flags = {k: "true" for k, on in (("sagemaker:NetworkIsolation", network_isolation),
                                                      ("sagemaker:InterContainerTrafficEncryption",
                                                       inter_container_encryption)) if on}
            return {
                "Null": {"sagemaker:VpcSubnets": "false", "sagemaker:VpcSecurityGroupIds": "false",
                         "sagemaker:InstanceTypes": "false"},
                "ForAllValues:StringEquals": {"sagemaker:VpcSubnets": subnet_ids,
                                              "sagemaker:VpcSecurityGroupIds": group_ids,
                                              "sagemaker:InstanceTypes": list(instance_types)},
                **({"Bool": required_flags} if required_flags else {}),
                "ArnEquals": {"sagemaker:OutputKmsKeyArn": key.key_arn,
                              **({"sagemaker:VolumeKmsKeyArn": key.key_arn} if volume_key else {})},
                **({} if volume_key else {"ArnEqualsIfExists": {"sagemaker:VolumeKmsKeyArn": key.key_arn}}),
                "NumericLessThanEquals": {"sagemaker:MaxRuntimeInSeconds": max_seconds},
            }

        statements = [
            iam.PolicyStatement(sid="CreateTrainingJobsInsideGuardrails", actions=["sagemaker:CreateTrainingJob"],
                                resources=[job_arn],
                                conditions=job_conditions(allowed_instance_types, max_run_seconds, volume_encryption)),
            iam.PolicyStatement(sid="FollowAndStopOwnTrainingJobs",
                                actions=["sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob",
                                         "sagemaker:AddTags"], resources=[job_arn]),
            iam.PolicyStatement(sid="PassOnlyTheTrainingRole", actions=["iam:PassRole"],
                                resources=[self.training_role.role_arn],
                                conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}),
        ]
        processing_arn = stack.format_arn(service="sagemaker", resource="processing-job",
                                          resource_name=PIPELINE_JOB_PATTERN)
        for sid, limits in (("Preparation", preparation), ("Evaluation", evaluation)):
            if limits is not None:
                statements.append(iam.PolicyStatement(
                    sid=f"Create{sid}JobsInsideGuardrails", actions=["sagemaker:CreateProcessingJob"],
                    resources=[processing_arn], conditions=job_conditions([limits.instance_type], limits.max_run_seconds,
                                                                          limits.volume_encryption)))
        if processing:
            statements.append(iam.PolicyStatement(sid="FollowAndStopOwnProcessingJobs",
                                                  actions=["sagemaker:DescribeProcessingJob",
                                                           "sagemaker:StopProcessingJob", "sagemaker:AddTags"],
                                                  resources=[processing_arn]))
        if model_package_group is not None:
            _, packages = model_package_arns(stack, model_package_group)
            statements += [
                # sagemaker:ModelApprovalStatus is CreateModelPackage's key for the request's status (Service
                # Authorization Reference for SageMaker AI); a request without one is denied too.
                iam.PolicyStatement(sid="RegisterPendingModelsOnly", actions=["sagemaker:CreateModelPackage"],
                                    resources=[packages],
                                    conditions={"StringEquals": {"sagemaker:ModelApprovalStatus": PENDING}}),
                iam.PolicyStatement(sid="DescribeOwnModelPackages", actions=["sagemaker:DescribeModelPackage"],
                                    resources=[packages]),
                # The gate's JsonGet: Pipelines reads a property file from S3 as the pipeline role.
                iam.PolicyStatement(sid="ReadEvaluationReports", actions=["s3:GetObject"],
                                    resources=[f"{bucket_arn}/{PREFIXES['evaluation']}*"]),
                iam.PolicyStatement(sid="DecryptEvaluationReportsThroughS3", actions=["kms:Decrypt"],
                                    resources=[key.key_arn],
                                    conditions={"StringEquals": {"kms:ViaService": f"s3.{stack.region}.amazonaws.com"}}),
            ]
        if volume_encryption or any(limits is not None and limits.volume_encryption
                                    for limits in (preparation, evaluation)):
            # kms:GrantIsForAWSResource is defined for CreateGrant only (Service Authorization Reference for AWS KMS;
            # the IAM simulation's dead-key check reports it on DescribeKey): two statements.
            statements += [
                iam.PolicyStatement(sid="EncryptJobVolumes", actions=["kms:CreateGrant"], resources=[key.key_arn],
                                    conditions={"Bool": {"kms:GrantIsForAWSResource": "true"}}),
                iam.PolicyStatement(sid="DescribeVolumeKey", actions=["kms:DescribeKey"], resources=[key.key_arn])]
        self.pipeline_policy = iam.ManagedPolicy(self, "PipelinePolicy", roles=[self.pipeline_role],
                                                 statements=statements)
        acknowledge(self.pipeline_policy, {
            f"AwsSolutions-IAM5[Resource::{arn_finding(self, 'sagemaker', f'training-job/{PIPELINE_JOB_PATTERN}')}]": "SageMaker Pipelines generate the training job names at run "
            "time (pipelines-<execution>-<step>); the prefix limits the role to jobs pipelines create, and "
            "CreateTrainingJob is further bound by subnet, security group, isolation, KMS, instance type and "
            "runtime conditions.",
            **({f"AwsSolutions-IAM5[Resource::{arn_finding(self, 'sagemaker', f'processing-job/{PIPELINE_JOB_PATTERN}')}]":
                "SageMaker Pipelines generate the processing job names at run time (pipelines-<execution>-<step>); "
                "CreateProcessingJob is further bound by subnet, security group, isolation, KMS, instance type and "
                "runtime conditions."} if processing else {}),
            **({f"AwsSolutions-IAM5[Resource::{arn_finding(self, 'sagemaker', f'model-package/{model_package_group.lower()}/*')}]":
                "Model package versions are numbered by SageMaker at registration; the pattern covers this one "
                "group, and CreateModelPackage is bound to PendingManualApproval.",
                f"AwsSolutions-IAM5[Resource::{bucket_ref}/{PREFIXES['evaluation']}*]": "The gate reads the "
                "evaluation report of each execution, under a key made at run time, in this one prefix."}
               if model_package_group is not None else {}),
        })

    def _training_statements(self, stack: cdk.Stack, bucket_arn: str, key: kms.IKey, image_uri: str,
                             subnets: Sequence[ec2.ISubnet], security_groups: Sequence[ec2.ISecurityGroup],
                             preparation: bool, evaluation: bool = False) -> list[iam.PolicyStatement]:
        def objects(kind: str) -> str:
            return f"{bucket_arn}/{PREFIXES[kind]}*"

        log_groups = [stack.format_arn(service="logs", resource="log-group", resource_name=f"/aws/sagemaker/{kind}",
                                       arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)
                      for kind in ("TrainingJobs", *(("ProcessingJobs",) if preparation or evaluation else ()))]
        eni, create_eni_resources = network_interface_arns(stack, subnets, security_groups)
        statements = [
            iam.PolicyStatement(sid="ReadInputs", actions=["s3:GetObject"],
                                resources=[objects("data"), objects("models"), *([objects("prepared")] if preparation
                                                                                 else []),
                                           *([objects("outputs")] if evaluation else [])]),
            iam.PolicyStatement(sid="ListOwnPrefixes", actions=["s3:ListBucket"], resources=[bucket_arn],
                                conditions={"StringLike": {"s3:prefix": [p + "*" for p in PREFIXES.values()]}}),
            iam.PolicyStatement(sid="SyncCheckpoints", actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                                                "s3:AbortMultipartUpload"],
                                resources=[objects("checkpoints")]),
            iam.PolicyStatement(sid="WriteOutputs", actions=["s3:PutObject", "s3:AbortMultipartUpload"],
                                resources=[objects("outputs"), *([objects("prepared")] if preparation else []),
                                           *([objects("evaluation")] if evaluation else [])]),
            iam.PolicyStatement(sid="UseKeyThroughS3Only", actions=["kms:Decrypt", "kms:GenerateDataKey"],
                                resources=[key.key_arn],
                                conditions={"StringEquals": {"kms:ViaService": f"s3.{stack.region}.amazonaws.com"}}),
            iam.PolicyStatement(sid="WriteJobLogs", actions=["logs:CreateLogGroup", "logs:CreateLogStream",
                                                             "logs:PutLogEvents", "logs:DescribeLogStreams"],
                                resources=[*log_groups, *[f"{group}:log-stream:*" for group in log_groups]]),
            iam.PolicyStatement(sid="PullTrainingImage", actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
                                                                  "ecr:BatchCheckLayerAvailability"],
                                resources=[ecr_repository_arn(image_uri)]),
            iam.PolicyStatement(sid="EcrLogin", actions=["ecr:GetAuthorizationToken"], resources=["*"]),
            iam.PolicyStatement(sid="PublishTrainingMetrics", actions=["cloudwatch:PutMetricData"], resources=["*"],
                                conditions={"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}}),
            *self._network_interface_statements(eni, create_eni_resources, preparation or evaluation),
            iam.PolicyStatement(sid="VpcModeDescribe",
                                actions=["ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeDhcpOptions",
                                         "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"], resources=["*"]),
        ]
        return statements

    @staticmethod
    def _network_interface_statements(eni: str, create_eni_resources: list[str],
                                      preparation: bool) -> list[iam.PolicyStatement]:
        """The ENI rights of VPC mode. A training job's may be scoped to our subnets, security groups and
        network interfaces. A processing job's may not: "Do not scope these permissions with conditions or resource
        filters; otherwise the validation checks that occur when creating the job fail" (SageMaker developer
        guide, "How to use SageMaker AI execution roles", CreateProcessingJob section). One role runs both, so
        with a preparation step the documented unscoped shape applies; subnets and security groups stay bound by
        the pipeline role's sagemaker:VpcSubnets/VpcSecurityGroupIds conditions on every job it creates."""
        actions = ["ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission", "ec2:DeleteNetworkInterface",
                   "ec2:DeleteNetworkInterfacePermission"]
        if preparation:
            return [iam.PolicyStatement(sid="VpcModeNetworkInterfacesUnscopedForProcessing", actions=actions,
                                        resources=["*"])]
        return [iam.PolicyStatement(sid="VpcModeNetworkInterfaces", actions=actions[:1], resources=create_eni_resources),
                iam.PolicyStatement(sid="VpcModeNetworkInterfacePermissions", actions=actions[1:], resources=[eni])]

    def _acknowledge_training_policy(self, bucket_ref: str, preparation: bool, evaluation: bool = False) -> None:
        """Acknowledge the execution role's scoped wildcards, each by its exact finding id."""
        processing = preparation or evaluation
        s3_reason = ("Object keys under this prefix are written at run time (dataset shards, checkpoint "
                     "step folders, model files); access is limited to the one prefix this role needs.")
        acknowledge(self.training_policy, {
            **{f"AwsSolutions-IAM5[Resource::{bucket_ref}/{PREFIXES[k]}*]": s3_reason
               for k in ("data", "models", "checkpoints", "outputs", *(("prepared",) if preparation else ()),
                         *(("evaluation",) if evaluation else ()))},
            **{f"AwsSolutions-IAM5[Resource::{arn_finding(self, 'logs', f'log-group:/aws/sagemaker/{kind}:log-stream:*')}]":
               "SageMaker creates one log stream per job instance at run time, inside its fixed log group."
               for kind in ("TrainingJobs", *(("ProcessingJobs",) if processing else ()))},
            "AwsSolutions-IAM5[Resource::*]": "ecr:GetAuthorizationToken, cloudwatch:PutMetricData (bound by a "
            "namespace condition) and the ec2:Describe* calls of VPC mode support no resource-level permissions."
            + (" " + UNSCOPED_ENI_REASON if processing else ""),
            **({} if processing else {
                f"AwsSolutions-IAM5[Resource::{arn_finding(self, 'ec2', 'network-interface/*')}]": "SageMaker creates "
                "the training ENIs at run time in VPC mode; their ids are not known in advance. Creation is tied to "
                "our subnets and security groups."}),
        })
