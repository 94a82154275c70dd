"""The pipeline stack and the L3 construct: every training-step setting, as synthesized."""

from __future__ import annotations

import json
import tarfile

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms

from spot_training.config.settings import TeamConfig, TrainingConfig
from spot_training.cdk.pipeline import TrainingPipeline, deterministic_tarball, load_metric_definitions
from tests.conftest import ROOT, pipeline_body, synth, training_step


@pytest.fixture(scope="module")
def step(default_app):
    return training_step(default_app)


@pytest.fixture(scope="module")
def arguments(step):
    return step["Arguments"]


def test_training_runs_on_managed_spot_with_runtime_and_wait_limits(arguments):
    assert arguments["EnableManagedSpotTraining"] is True
    assert arguments["StoppingCondition"] == {"MaxRuntimeInSeconds": 43200, "MaxWaitTimeInSeconds": 86400}


def test_checkpoints_go_to_a_prefix_keyed_on_the_run_with_trailing_slash(arguments, default_app):
    checkpoint = arguments["CheckpointConfig"]
    assert checkpoint["LocalPath"] == "/opt/ml/checkpoints"
    join = checkpoint["S3Uri"]["Std:Join"]
    assert join["On"] == "/"
    assert join["Values"][0].startswith("s3://<importvalue:") and join["Values"][0].endswith("/checkpoints")
    assert join["Values"][1:] == [{"Get": "Steps.ResolveRun.OutputParameters['RunId']"}, ""]
    # The run: the first step's answer from RunId (empty: a new run) and the execution id, by the construct's function.
    definition = pipeline_body(default_app)
    resolve = definition["Steps"][0]
    assert (resolve["Name"], resolve["Type"]) == ("ResolveRun", "Lambda")
    assert resolve["Arguments"] == {"run_id": {"Get": "Parameters.RunId"},
                                    "execution_id": {"Get": "Execution.PipelineExecutionId"},
                                    "run_started_at": {"Get": "Parameters.RunStartedAt"}}
    assert resolve["OutputParameters"] == [{"OutputName": "RunId", "OutputType": "String"}]
    assert "RunIdentityResolveRun" in json.dumps(resolve["FunctionArn"])
    assert {p["Name"]: p["DefaultValue"] for p in definition["Parameters"] if p["Name"].startswith("Run")} == {
        "RunId": "", "RunStartedAt": ""}


def test_training_runs_in_our_subnets_and_training_security_group(arguments):
    vpc = arguments["VpcConfig"]
    assert [s.split("ExportsOutputRef")[1][:24] for s in vpc["Subnets"]] == [
        "NetworkVpctrainingSubnet", "NetworkVpctrainingSubnet"]
    assert len(vpc["SecurityGroupIds"]) == 1 and "TrainingSecurityGroup" in vpc["SecurityGroupIds"][0]


def test_network_isolation_and_inter_container_encryption_are_on(arguments):
    assert arguments["EnableNetworkIsolation"] is True
    assert arguments["EnableInterContainerTrafficEncryption"] is True


def test_outputs_are_kms_encrypted_and_p4d_volumes_use_the_instance_hardware_key(arguments):
    assert "StoreKey" in arguments["OutputDataConfig"]["KmsKeyId"]
    assert arguments["OutputDataConfig"]["S3OutputPath"].endswith("/outputs/")
    assert arguments["OutputDataConfig"]["CompressionType"] == "NONE"  # no gzip of the weights on the GPU bill
    assert "VolumeKmsKeyId" not in arguments["ResourceConfig"], "p4d has local NVMe: SageMaker refuses a volume key"


def test_volume_key_is_set_for_instance_types_without_local_storage(tmp_path_factory):
    p3 = synth(tmp_path_factory.getbasetemp(), instance_type="ml.p3.16xlarge")
    assert "StoreKey" in training_step(p3)["Arguments"]["ResourceConfig"]["VolumeKmsKeyId"]


def test_step_retries_capacity_limit_and_internal_errors(step):
    retried = [set(p["ExceptionType"]) for p in step["RetryPolicies"]]
    assert {"SageMaker.CAPACITY_ERROR", "SageMaker.RESOURCE_LIMIT", "SageMaker.JOB_INTERNAL_ERROR"} in retried
    assert {"Step.SERVICE_FAULT", "Step.THROTTLING"} in retried
    assert all(p["MaxAttempts"] == 3 for p in step["RetryPolicies"])


def test_metric_definitions_are_the_trainers_own(arguments):
    assert arguments["AlgorithmSpecification"]["MetricDefinitions"] == load_metric_definitions(ROOT / "trainer")


def test_distributed_pytorch_runs_the_trainer_from_the_code_asset(arguments):
    hyper = arguments["HyperParameters"]
    assert hyper["sagemaker_torch_distributed_enabled"] == "true"
    assert hyper["sagemaker_program"] == '"train.py"'
    (code,) = [c for c in arguments["InputDataConfig"] if c["ChannelName"] == "code"]
    key = code["DataSource"]["S3DataSource"]["S3Uri"].split("/", 3)[-1]
    assert hyper["sagemaker_submit_directory"] == json.dumps(f"/opt/ml/input/data/code/{key}")
    assert "huggingface-pytorch-training:2.8.0-transformers4.56.2-gpu" in arguments["AlgorithmSpecification"]["TrainingImage"]


def test_per_run_values_are_pipeline_parameters_with_defaults(default_app, arguments):
    parameters = {p["Name"]: p["DefaultValue"] for p in pipeline_body(default_app)["Parameters"]}
    assert parameters["InstanceType"] == "ml.p4d.24xlarge"
    assert parameters["InstanceCount"] == 2
    assert parameters["TrainingDataUri"].endswith("/data/train/")
    assert parameters["BaseModelUri"].endswith("/models/base/")
    assert {"MaxSteps", "LearningRate", "PerDeviceBatchSize", "GradientAccumulationSteps", "SequenceLength",
            "CheckpointIntervalMinutes", "CheckpointEverySteps"} <= set(parameters)
    assert arguments["ResourceConfig"]["InstanceType"] == {"Get": "Parameters.InstanceType"}
    assert arguments["ResourceConfig"]["InstanceCount"] == {"Get": "Parameters.InstanceCount"}
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in arguments["InputDataConfig"]}
    # The training channel reads what the preparation step wrote (tests/test_preparation_step.py).
    assert channels["train"] == {"Std:Join": {"On": "/", "Values": [
        {"Get": "Steps.PrepareData.ProcessingOutputConfig.Outputs['prepared'].S3Output.S3Uri"}, "train", ""]}}
    assert channels["model"] == {"Get": "Parameters.BaseModelUri"}
    # The base model streams (FastFile): a restart would otherwise copy all of it to every instance again.
    modes = {c["ChannelName"]: c.get("InputMode") for c in arguments["InputDataConfig"]}
    assert modes["model"] == "FastFile" and modes["train"] == "File"


def test_nothing_starts_a_run_on_deploy(default_app):
    resources = default_app.templates["pipeline"]["Resources"].values()
    assert not [r for r in resources if r["Type"].startswith("Custom::") or r["Type"] == "AWS::CloudFormation::CustomResource"]
    targets = [t for r in resources if r["Type"] == "AWS::Events::Rule" for t in r["Properties"]["Targets"]]
    assert targets and not [t for t in targets if "SageMakerPipelineParameters" in t]
    assert "StartPipelineExecution" not in json.dumps(default_app.templates["pipeline"])


def test_outputs_give_the_pipeline_name_and_a_ready_start_command(default_app):
    outputs = default_app.templates["pipeline"]["Outputs"]
    assert outputs["PipelineName"]["Value"] == "distributed-training"
    # spot-training start passes the data fingerprint; a bare start-pipeline-execution would not.
    assert outputs["StartExecutionCommand"]["Value"] == (
        "spot-training start --region us-east-1 --pipeline-name distributed-training")


def test_trainer_archive_is_byte_identical_across_builds():
    first = deterministic_tarball(ROOT / "trainer").read_bytes()
    second = deterministic_tarball(ROOT / "trainer").read_bytes()
    assert first == second
    with tarfile.open(deterministic_tarball(ROOT / "trainer")) as tar:
        names = tar.getnames()
        assert "train.py" in names and not any("__pycache__" in n for n in names)
        assert {m.mtime for m in tar.getmembers()} == {0}


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """The construct alone in a stack, bringing only a VPC, as another team's app would use it."""
    app = cdk.App(outdir=str(tmp_path_factory.mktemp("standalone")))
    stack = cdk.Stack(app, "TeamStack", env=cdk.Environment(region="eu-west-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    pipeline = TrainingPipeline(stack, "Training", config=TrainingConfig(region="eu-west-1"), vpc=vpc)
    starter = iam.Role(stack, "Starter", assumed_by=iam.AccountRootPrincipal())
    pipeline.grant_start_execution(starter)
    return pipeline, app.synth().get_stack_by_name("TeamStack").template


def test_construct_creates_what_it_is_not_given(standalone):
    pipeline, template = standalone
    types = [r["Type"] for r in template["Resources"].values()]
    assert types.count("AWS::S3::Bucket") == 2 and types.count("AWS::IAM::Role") >= 3
    assert pipeline.bucket is not None and pipeline.training_role is not None and pipeline.security_group is not None


def test_grant_start_execution_allows_starting_and_following_this_pipeline_only(standalone):
    _, template = standalone
    (policy,) = [r for k, r in template["Resources"].items() if r["Type"] == "AWS::IAM::Policy" and "Starter" in k]
    statement, listing = policy["Properties"]["PolicyDocument"]["Statement"]
    assert "sagemaker:StartPipelineExecution" in statement["Action"]
    resources = json.dumps(statement["Resource"])
    assert ":pipeline/distributed-training" in resources and ":pipeline/distributed-training/execution/*" in resources
    # `spot-training start` lists the data prefix for the fingerprint: keys under data/ only, nothing read
    assert listing["Action"] == "s3:ListBucket" and listing["Condition"] == {"StringLike": {"s3:prefix": ["data/*"]}}


def test_a_bring_your_own_pipeline_role_alone_is_granted_and_an_execution_role_is_created():
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    role = iam.Role(stack, "R", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"))
    pipeline = TrainingPipeline(stack, "T", config=TrainingConfig(), vpc=vpc, pipeline_role=role)
    assert pipeline.pipeline_role is role and pipeline.training_role is not role
    template = app.synth().get_stack_by_name("S").template
    attached = [json.dumps(r["Properties"]) for r in template["Resources"].values()
                if r["Type"] == "AWS::IAM::ManagedPolicy" and "sagemaker:CreateTrainingJob" in json.dumps(r)]
    assert len(attached) == 1 and stack.get_logical_id(role.node.default_child) in attached[0]


def _vpc_with_egress(stack):
    """A VPC built the usual way: public subnets and PRIVATE_WITH_EGRESS behind a NAT gateway."""
    return ec2.Vpc(stack, "Vpc", max_azs=2, nat_gateways=1, subnet_configuration=[
        ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC),
        ec2.SubnetConfiguration(name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)])


def test_a_vpc_with_private_subnets_with_egress_defaults_to_them():
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = _vpc_with_egress(stack)
    pipeline = TrainingPipeline(stack, "T", config=TrainingConfig(), vpc=vpc, alarms=False)
    assert [s.subnet_id for s in pipeline.subnets] == [s.subnet_id for s in vpc.private_subnets]


def test_subnets_that_are_public_or_of_another_vpc_are_refused_in_one_line():
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = _vpc_with_egress(stack)
    other = ec2.Vpc(stack, "Other", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    with pytest.raises(ValueError, match=r"^subnets: .* not among the vpc's 4 subnets$"):
        TrainingPipeline(stack, "A", config=TrainingConfig(), vpc=vpc, subnets=other.isolated_subnets, alarms=False)
    with pytest.raises(ValueError, match=r"^subnets: .* are public subnets of the vpc; pass private subnets$"):
        TrainingPipeline(stack, "B", config=TrainingConfig(), vpc=vpc, subnets=vpc.public_subnets, alarms=False)


def test_a_vpc_with_only_public_subnets_says_what_it_looked_for():
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC)])
    with pytest.raises(ValueError) as caught:
        TrainingPipeline(stack, "T", config=TrainingConfig(), vpc=vpc, alarms=False)
    assert str(caught.value) == ("subnets: none given, and the vpc has no isolated or private subnets to default to "
                                 "(it has 2 public); pass subnets=[...] of private subnets")


def test_the_created_security_group_gets_the_networking_stacks_rules_and_the_endpoints_admit_it():
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = _vpc_with_egress(stack)
    endpoints = ec2.SecurityGroup(stack, "Endpoints", vpc=vpc, allow_all_outbound=False)
    pipeline = TrainingPipeline(stack, "T", config=TrainingConfig(), vpc=vpc, endpoint_security_group=endpoints,
                                alarms=False)
    template = app.synth().get_stack_by_name("S").template
    group_id = stack.get_logical_id(pipeline.security_group.node.default_child)
    endpoints_id = stack.get_logical_id(endpoints.node.default_child)
    rules = [r["Properties"] for r in template["Resources"].values()
             if r["Type"] in ("AWS::EC2::SecurityGroupIngress", "AWS::EC2::SecurityGroupEgress")]
    egress = [r for r in rules if r.get("GroupId") == {"Fn::GetAtt": [group_id, "GroupId"]} and "FromPort" in r]
    assert any(r.get("DestinationSecurityGroupId") == {"Fn::GetAtt": [endpoints_id, "GroupId"]} and r["FromPort"] == 443
               for r in egress)
    assert any("DestinationPrefixListId" in r and r["FromPort"] == 443 for r in egress)
    assert any(r.get("GroupId") == {"Fn::GetAtt": [endpoints_id, "GroupId"]} and
               r.get("SourceSecurityGroupId") == {"Fn::GetAtt": [group_id, "GroupId"]} and r["FromPort"] == 443
               for r in rules)


def test_the_construct_takes_its_stacks_region_for_the_image_and_the_definition():
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="eu-west-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    pipeline = TrainingPipeline(stack, "T", config=TrainingConfig(), vpc=vpc, alarms=False)
    assert pipeline.config.region == "eu-west-1"
    assert ".dkr.ecr.eu-west-1.amazonaws.com/" in pipeline.image_uri
    body = json.dumps(pipeline.definition)
    assert '"sagemaker_region": "\\"eu-west-1\\""' in body and ".dkr.ecr.eu-west-1.amazonaws.com/" in body


@pytest.mark.parametrize(("stack_region", "config_region", "message"), [
    ("eu-west-1", "us-east-1", "TrainingConfig.region=us-east-1: the stack deploys to eu-west-1; leave region empty "
                               "to follow the stack, or make them match"),
    (None, "", "TrainingConfig.region: empty, and the stack is environment-agnostic; the training image and the "
               "pipeline definition are per region: give the stack env=cdk.Environment(region=...) or set "
               "TrainingConfig(region=...)"),
])
def test_a_region_that_contradicts_the_stack_or_is_unknowable_is_refused(stack_region, config_region, message):
    app = cdk.App()
    env = cdk.Environment(region=stack_region) if stack_region else None
    stack = cdk.Stack(app, "S", env=env)
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, max_azs=2, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    with pytest.raises(ValueError) as caught:
        TrainingPipeline(stack, "T", config=TrainingConfig(region=config_region), vpc=vpc, alarms=False)
    assert str(caught.value) == message


def test_a_config_with_teams_given_to_one_pipeline_is_refused_in_one_line():
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    team = TeamConfig(name="nlp", instance_types=("ml.p4d.24xlarge",), max_instance_count=2, max_run_seconds=3600)
    with pytest.raises(ValueError, match=r"^config.teams: 1 team\(s\) given; a TrainingPipeline is one pipeline"):
        TrainingPipeline(stack, "T", config=TrainingConfig(teams=(team,)), vpc=vpc, alarms=False)


def test_alarms_use_an_existing_key_and_topic_when_given():
    from aws_cdk import aws_sns as sns

    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    key = kms.Key(stack, "TheirKey", enable_key_rotation=True)
    topic = sns.Topic(stack, "TheirTopic", master_key=key)
    pipeline = TrainingPipeline(stack, "T", config=TrainingConfig(), vpc=vpc, alarm_key=key, alarm_topic=topic)
    assert pipeline.alarm_topic is topic and pipeline.alarms.key is key
    template = app.synth().get_stack_by_name("S").template
    assert [k for k, r in template["Resources"].items() if r["Type"] == "AWS::SNS::Topic"] == [
        stack.get_logical_id(topic.node.default_child)]


def test_imported_immutable_roles_get_the_managed_policies_attached_by_name():
    # A managed policy attaches through its own Roles list, so even `mutable=False` imports get the grants.
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    training = iam.Role.from_role_arn(stack, "Training", "arn:aws:iam::111122223333:role/their-training", mutable=False)
    pipeline = iam.Role.from_role_arn(stack, "Pipeline", "arn:aws:iam::111122223333:role/their-pipeline", mutable=False)
    TrainingPipeline(stack, "T", config=TrainingConfig(), vpc=vpc, training_role=training, pipeline_role=pipeline,
                     alarms=False)
    template = app.synth().get_stack_by_name("S").template
    attached = sorted((json.dumps(r["Properties"]["Roles"]), "sagemaker:CreateTrainingJob" in json.dumps(r))
                      for r in template["Resources"].values() if r["Type"] == "AWS::IAM::ManagedPolicy")
    attached = [a for a in attached if "RunIdentity" not in a[0]]  # the ResolveRun function's own role
    assert attached == [('["their-pipeline"]', False), ('["their-pipeline"]', True), ('["their-training"]', False),
                        ('["their-training"]', False)]  # the pipeline role's second one invokes the ResolveRun step


def test_an_existing_model_package_group_is_used_not_created_again():
    # The group is kept on delete, so after `cdk destroy` a redeployment must register in it, not create it.
    app = cdk.App()
    stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    config = TrainingConfig(model_package_group="kept-models", create_model_package_group=False)
    pipeline = TrainingPipeline(stack, "T", config=config, vpc=vpc, alarms=False)
    template = app.synth().get_stack_by_name("S").template
    assert pipeline.model_package_group is None and pipeline.model_package_group_name == "kept-models"
    assert not [r for r in template["Resources"].values() if r["Type"] == "AWS::SageMaker::ModelPackageGroup"]
    assert "model-package/kept-models/*" in json.dumps(template)  # the pipeline role still registers there
