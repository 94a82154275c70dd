from __future__ import annotations

import dataclasses

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from spot_training.config.settings import TrainingConfig
from spot_training.cdk.pipeline import TrainingPipeline
from spot_training.cdk.teams import TeamPipelines


class PipelineStack(cdk.Stack):
    """The SageMaker pipeline (the L3 construct) wired to the networking and security stacks."""

    def __init__(self, scope: Construct, id: str, *, config: TrainingConfig, vpc: ec2.IVpc,
                 subnets: list[ec2.ISubnet], security_group: ec2.ISecurityGroup, bucket: s3.IBucket,
                 key: kms.IKey, training_role: iam.IRole, pipeline_role: iam.IRole,
                 endpoint_security_group: ec2.ISecurityGroup, **kwargs) -> None:
        super().__init__(scope, id, **kwargs)
        self.training = TrainingPipeline(self, "Training", config=dataclasses.replace(config, teams=()), vpc=vpc,
                                         subnets=subnets,
                                         security_group=security_group, bucket=bucket, key=key,
                                         training_role=training_role, pipeline_role=pipeline_role,
                                         grant_roles=False,  # the security stack's TrainingRoles granted them
                                         endpoint_security_group=endpoint_security_group)
        # "Default" is left out of logical IDs (aws-cdk-lib core/lib/private/uniqueid.ts, HIDDEN_ID): the team
        # resources keep the IDs they had when this stack built them itself.
        self.teams = TeamPipelines(self, "Default", shared=self.training, teams=config.teams).pipelines \
            if config.teams else {}
        cdk.CfnOutput(self, "PipelineName", value=self.training.pipeline_name,
                      description="SageMaker pipeline that runs one training per execution")
        if self.training.model_package_group_name:
            cdk.CfnOutput(self, "ModelPackageGroupName", value=self.training.model_package_group_name,
                          description="Model registry group: each run's model, PendingManualApproval, once it beats "
                          "its base (spot-training models)")
        cdk.CfnOutput(self, "AlarmTopicArn", value=self.training.alarm_topic.topic_arn,
                      description="SNS topic of failed, stopped and overlong executions")
        # `spot-training start`, not `aws sagemaker start-pipeline-execution`: it lists the data and passes its
        # DataFingerprint, without which the preparation step's cache serves old shards of rewritten data.
        cdk.CfnOutput(self, "StartExecutionCommand", description="Starts one training run (pip install ./constructs "
                      "for the command; it fingerprints the data so that rewritten data is prepared again)",
                      value=f"spot-training start --region {self.region} --pipeline-name {self.training.pipeline_name}")
