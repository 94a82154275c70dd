from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from constructs import Construct

from spot_training.config.settings import TrainingConfig
from spot_training.definition.build import default_image_uri
from spot_training.cdk.pipeline import evaluation_limits, preparation_limits
from spot_training.cdk.roles import TrainingRoles
from spot_training.cdk.storage import ArtifactStore


class SecurityStack(cdk.Stack):
    """KMS key, artifact and access-log buckets, and the training and pipeline roles."""

    def __init__(self, scope: Construct, id: str, *, config: TrainingConfig, subnets: list[ec2.ISubnet],
                 security_group: ec2.ISecurityGroup, **kwargs) -> None:
        super().__init__(scope, id, **kwargs)
        self.store = ArtifactStore.for_config(self, "Store", config)
        self.roles = TrainingRoles(
            self, "Roles", bucket=self.store.bucket, key=self.store.key, image_uri=default_image_uri(config),
            subnets=subnets, security_groups=[security_group],
            allowed_instance_types=config.instance_type_allow_list, max_run_seconds=config.max_run_seconds,
            network_isolation=config.network_isolation,
            inter_container_encryption=config.inter_container_encryption,
            volume_encryption=config.volume_encryption_allowed, preparation=preparation_limits(config),
            evaluation=evaluation_limits(config),
            model_package_group=config.model_package_group_name if evaluation_limits(config) else None)
        cdk.CfnOutput(self, "SageMakerExecutionRoleArn", value=self.roles.training_role.role_arn,
                      description="Execution role of the training jobs")
        cdk.CfnOutput(self, "ArtifactBucketName", value=self.store.bucket.bucket_name,
                      description="Bucket for data/, models/, code/, prepared/, checkpoints/, outputs/ and evaluation/")
