"""The artifact store: a customer-managed KMS key, the artifact bucket and its access-log bucket."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from spot_training.config.settings import TrainingConfig
from spot_training.config.layout import PREFIXES
from spot_training.cdk.nag import acknowledge


class ArtifactStore(Construct):
    """KMS key with rotation; an artifact bucket (KMS, versioned, SSL-only, no public access, access
    logs, lifecycle rules, retained on deletion) holding `data/`, `models/`, `code/`, `checkpoints/` and
    `outputs/`; and the bucket that receives its server access logs."""

    def __init__(self, scope: Construct, id: str, *, checkpoint_expiration_days: int = 30,
                 noncurrent_version_expiration_days: int = 30, abort_incomplete_upload_days: int = 7) -> None:
        """
        :param checkpoint_expiration_days: delete objects under `checkpoints/` after this many days (@default 30).
        :param noncurrent_version_expiration_days: delete overwritten versions after this many days (@default 30).
        :param abort_incomplete_upload_days: abort unfinished multipart uploads after this many days (@default 7).
        """
        super().__init__(scope, id)
        # Deliver access logs through a bucket policy, not ACLs, whatever the app's feature flags say.
        self.node.set_context("@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy", True)
        self.key = kms.Key(self, "Key", enable_key_rotation=True, removal_policy=cdk.RemovalPolicy.RETAIN,
                           description="Encrypts training data, checkpoints, model outputs and volumes")
        self.log_bucket = s3.Bucket(
            self, "AccessLogBucket", encryption=s3.BucketEncryption.S3_MANAGED, enforce_ssl=True,
            versioned=True, block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED, removal_policy=cdk.RemovalPolicy.RETAIN,
            lifecycle_rules=[s3.LifecycleRule(id="ExpireOldAccessLogs", expiration=cdk.Duration.days(365),
                                              noncurrent_version_expiration=cdk.Duration.days(30))])
        acknowledge(self.log_bucket, {
            "AwsSolutions-S1": "This bucket is the server access log destination; logging it to itself "
            "would loop.",
            "NIST.800.53.R5-S3BucketLoggingEnabled": "This bucket is the server access log destination; "
            "logging it to itself would loop.",
            "HIPAA.Security-S3BucketLoggingEnabled": "This bucket is the server access log destination; "
            "logging it to itself would loop.",
            "NIST.800.53.R5-S3DefaultEncryptionKMS": "S3 server access logging delivers only to buckets "
            "with SSE-S3 default encryption, not SSE-KMS.",
            "HIPAA.Security-S3DefaultEncryptionKMS": "S3 server access logging delivers only to buckets "
            "with SSE-S3 default encryption, not SSE-KMS.",
            "NIST.800.53.R5-S3BucketReplicationEnabled": "Access logs are kept in one region for audit; "
            "cross-region replication is a deployment choice outside this platform.",
            "HIPAA.Security-S3BucketReplicationEnabled": "Access logs are kept in one region for audit; "
            "cross-region replication is a deployment choice outside this platform.",
        })
        self.bucket = s3.Bucket(
            self, "ArtifactBucket", encryption=s3.BucketEncryption.KMS, encryption_key=self.key,
            bucket_key_enabled=True, enforce_ssl=True, versioned=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=self.log_bucket, server_access_logs_prefix="artifact-bucket/",
            removal_policy=cdk.RemovalPolicy.RETAIN,
            lifecycle_rules=[
                s3.LifecycleRule(id="ExpireOldCheckpoints", prefix=PREFIXES["checkpoints"],
                                 expiration=cdk.Duration.days(checkpoint_expiration_days)),
                s3.LifecycleRule(id="ExpireNoncurrentVersions",
                                 noncurrent_version_expiration=cdk.Duration.days(noncurrent_version_expiration_days)),
                s3.LifecycleRule(id="AbortIncompleteUploads",
                                 abort_incomplete_multipart_upload_after=cdk.Duration.days(abort_incomplete_upload_days)),
            ])
        acknowledge(self.bucket, {
            "NIST.800.53.R5-S3BucketReplicationEnabled": "Training data and checkpoints are reproducible "
            "working copies; versioning protects them and cross-region replication would double storage "
            "of multi-GB checkpoints.",
            "HIPAA.Security-S3BucketReplicationEnabled": "Training data and checkpoints are reproducible "
            "working copies; versioning protects them and cross-region replication would double storage "
            "of multi-GB checkpoints.",
        })

    @classmethod
    def for_config(cls, scope: Construct, id: str, config: TrainingConfig) -> ArtifactStore:
        """An ArtifactStore with the lifecycle days of `config`."""
        return cls(scope, id, checkpoint_expiration_days=config.checkpoint_expiration_days,
                   noncurrent_version_expiration_days=config.noncurrent_version_expiration_days,
                   abort_incomplete_upload_days=config.abort_incomplete_upload_days)
