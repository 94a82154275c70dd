"""The security stack: KMS key, artifact and log buckets, and least-privilege roles."""

from __future__ import annotations

import json

import pytest


def _bucket(synthesized, fragment):
    (bucket,) = [v for k, v in synthesized.resources("security", "AWS::S3::Bucket").items() if fragment in k]
    return bucket


def _policy(synthesized, fragment):
    (policy,) = [v["Properties"]["PolicyDocument"]["Statement"]
                 for k, v in synthesized.resources("security", "AWS::IAM::ManagedPolicy").items() if fragment in k]
    return {s["Sid"]: s for s in policy}


def test_key_is_customer_managed_with_rotation_and_retained(default_app):
    (key,) = default_app.resources("security", "AWS::KMS::Key").values()
    assert key["Properties"]["EnableKeyRotation"] is True
    assert key["DeletionPolicy"] == "Retain"


def test_artifact_bucket_is_kms_encrypted_versioned_private_logged_and_retained(default_app):
    bucket = _bucket(default_app, "ArtifactBucket")
    props = bucket["Properties"]
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert "KMSMasterKeyID" in rule["ServerSideEncryptionByDefault"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
    assert props["LoggingConfiguration"]["LogFilePrefix"] == "artifact-bucket/"
    assert bucket["DeletionPolicy"] == "Retain"


def test_artifact_bucket_lifecycle_expires_checkpoints_old_versions_and_stale_uploads(default_app):
    rules = {r["Id"]: r for r in _bucket(default_app, "ArtifactBucket")["Properties"]["LifecycleConfiguration"]["Rules"]}
    assert rules["ExpireOldCheckpoints"]["Prefix"] == "checkpoints/"
    assert rules["ExpireOldCheckpoints"]["ExpirationInDays"] == 30
    assert rules["ExpireNoncurrentVersions"]["NoncurrentVersionExpiration"] == {"NoncurrentDays": 30}
    assert rules["AbortIncompleteUploads"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}


def test_lifecycle_days_come_from_config(tmp_path_factory):
    from tests.conftest import synth

    custom = synth(tmp_path_factory.getbasetemp(), checkpoint_expiration_days=5)
    rules = {r["Id"]: r for r in _bucket(custom, "ArtifactBucket")["Properties"]["LifecycleConfiguration"]["Rules"]}
    assert rules["ExpireOldCheckpoints"]["ExpirationInDays"] == 5


@pytest.mark.parametrize("fragment", ["ArtifactBucket", "AccessLogBucket"])
def test_buckets_refuse_plain_http(default_app, fragment):
    policies = default_app.resources("security", "AWS::S3::BucketPolicy").values()
    bucket_id = [k for k in default_app.resources("security", "AWS::S3::Bucket") if fragment in k][0]
    (policy,) = [p for p in policies if p["Properties"]["Bucket"] == {"Ref": bucket_id}]
    deny = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_roles_carry_managed_policies_only(default_app):
    assert default_app.resources("security", "AWS::IAM::Policy") == {}
    roles = default_app.resources("security", "AWS::IAM::Role").values()
    assert all("Policies" not in r["Properties"] for r in roles)
    assert all(r["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] ==
               {"Service": "sagemaker.amazonaws.com"} for r in roles)


def test_pipeline_role_creates_jobs_only_inside_the_guardrails(default_app):
    statement = _policy(default_app, "PipelinePolicy")["CreateTrainingJobsInsideGuardrails"]
    assert statement["Action"] == "sagemaker:CreateTrainingJob"
    assert statement["Resource"]["Fn::Join"][1][-1] == ":training-job/pipelines-*"
    condition = statement["Condition"]
    assert condition["Null"] == {"sagemaker:VpcSubnets": "false", "sagemaker:VpcSecurityGroupIds": "false",
                                 "sagemaker:InstanceTypes": "false"}
    equals = condition["ForAllValues:StringEquals"]
    assert equals["sagemaker:InstanceTypes"] == ["ml.p4d.24xlarge"]
    assert len(equals["sagemaker:VpcSubnets"]) == 2
    assert all("Fn::ImportValue" in s for s in equals["sagemaker:VpcSubnets"])
    assert "TrainingSecurityGroup" in equals["sagemaker:VpcSecurityGroupIds"][0]["Fn::ImportValue"]
    assert condition["Bool"] == {"sagemaker:NetworkIsolation": "true",
                                 "sagemaker:InterContainerTrafficEncryption": "true"}
    assert "sagemaker:OutputKmsKeyArn" in condition["ArnEquals"]
    assert "sagemaker:VolumeKmsKeyArn" in condition["ArnEqualsIfExists"]  # p4d has local NVMe: no volume key
    assert condition["NumericLessThanEquals"] == {"sagemaker:MaxRuntimeInSeconds": 43200}


def test_pipeline_role_passes_only_the_training_role_only_to_sagemaker(default_app):
    statement = _policy(default_app, "PipelinePolicy")["PassOnlyTheTrainingRole"]
    assert statement["Action"] == "iam:PassRole"
    assert "TrainingRole" in statement["Resource"]["Fn::GetAtt"][0]
    assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}


def test_training_role_reaches_only_its_prefixes_and_the_key_through_s3(default_app):
    statements = _policy(default_app, "TrainingPolicy")
    prefixes = {sid: [r["Fn::Join"][1][-1] for r in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])]
                for sid, s in statements.items() if sid in ("ReadInputs", "SyncCheckpoints", "WriteOutputs")}
    # prepared/: the preparation step writes the token shards there, the training step reads them; the evaluation
    # step reads the fine-tuned model from outputs/ and writes its report to evaluation/.
    assert prefixes == {"ReadInputs": ["/data/*", "/models/*", "/outputs/*", "/prepared/*"],
                        "SyncCheckpoints": ["/checkpoints/*"],
                        "WriteOutputs": ["/evaluation/*", "/outputs/*", "/prepared/*"]}
    assert statements["UseKeyThroughS3Only"]["Condition"] == {
        "StringEquals": {"kms:ViaService": "s3.us-east-1.amazonaws.com"}}
    wildcard = {sid for sid, s in statements.items() if s["Resource"] == "*"}
    assert wildcard == {"EcrLogin", "PublishTrainingMetrics", "VpcModeDescribe",
                        "VpcModeNetworkInterfacesUnscopedForProcessing"}


def test_processing_jobs_get_the_documented_unscoped_eni_rights_and_training_alone_keeps_them_scoped(
        default_app, tmp_path_factory):
    """The developer guide's processing section of "How to use SageMaker AI execution roles": no conditions or
    resource filters on the ENI permissions of a processing job in a VPC, or its creation-time validation fails."""
    eni = _policy(default_app, "TrainingPolicy")["VpcModeNetworkInterfacesUnscopedForProcessing"]
    assert sorted(eni["Action"]) == ["ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission",
                                     "ec2:DeleteNetworkInterface", "ec2:DeleteNetworkInterfacePermission"]
    assert eni["Resource"] == "*" and "Condition" not in eni
    training_only = _training_only_policy()  # neither a preparation nor an evaluation step
    assert "VpcModeNetworkInterfacesUnscopedForProcessing" not in training_only
    assert "network-interface/*" in json.dumps(training_only["VpcModeNetworkInterfacePermissions"]["Resource"])
    assert len(training_only["VpcModeNetworkInterfaces"]["Resource"]) > 1  # the ENI pattern, subnets, groups


def _training_only_policy() -> dict:
    """The execution role's statements for a pipeline without processing steps (TrainingRoles on its own)."""
    import aws_cdk as cdk
    from aws_cdk import assertions
    from aws_cdk import aws_ec2 as ec2

    from spot_training.cdk.roles import TrainingRoles
    from spot_training.cdk.storage import ArtifactStore
    from spot_training.config.settings import TrainingConfig

    stack = cdk.Stack(cdk.App(), "TrainingOnly", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    store = ArtifactStore.for_config(stack, "Store", TrainingConfig())
    TrainingRoles(stack, "Roles", bucket=store.bucket, key=store.key, image_uri="123456789012.dkr.ecr.us-east-1."
                  "amazonaws.com/train:1", subnets=vpc.isolated_subnets,
                  security_groups=[ec2.SecurityGroup(stack, "Group", vpc=vpc)],
                  allowed_instance_types=["ml.p4d.24xlarge"], max_run_seconds=3600)
    policies = assertions.Template.from_stack(stack).find_resources("AWS::IAM::ManagedPolicy")
    (statements,) = [p["Properties"]["PolicyDocument"]["Statement"] for k, p in policies.items() if "TrainingPolicy" in k]
    return {s["Sid"]: s for s in statements}


def test_training_role_pulls_only_the_training_image_repository(default_app):
    statement = _policy(default_app, "TrainingPolicy")["PullTrainingImage"]
    assert statement["Resource"]["Fn::Join"][1][-1] == ":ecr:us-east-1:763104351884:repository/huggingface-pytorch-training"


def test_instance_type_allow_list_follows_config(tmp_path_factory):
    from tests.conftest import synth

    custom = synth(tmp_path_factory.getbasetemp(), allowed_instance_types="ml.p4d.24xlarge,ml.p5.48xlarge")
    equals = _policy(custom, "PipelinePolicy")["CreateTrainingJobsInsideGuardrails"]["Condition"]["ForAllValues:StringEquals"]
    assert equals["sagemaker:InstanceTypes"] == ["ml.p4d.24xlarge", "ml.p5.48xlarge"]


def test_outputs_name_the_role_and_the_bucket(default_app):
    assert set(default_app.templates["security"]["Outputs"]) >= {"SageMakerExecutionRoleArn", "ArtifactBucketName"}
