"""The run identity (the pipeline's ResolveRun step) and the capacity ladder's controller: Lambda functions in the
training VPC, their code the handlers of `monitor/capacity_ladder.py` bundled with `config/capacity.py`."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from constructs import Construct

from spot_training.cdk.alarms import EXECUTION_STATUS_EVENT
from spot_training.cdk.functions import vpc_function
from spot_training.cdk.nag import arn_finding
from spot_training.cdk.network import let_logs_use
from spot_training.cdk.roles import PIPELINE_JOB_PATTERN
from spot_training.config.capacity import Plan

_PACKAGE = Path(__file__).resolve().parents[1]
# The bundle: the handlers at its root, and the one module of the package they import, at its package path.
_BUNDLE = {"capacity_ladder.py": _PACKAGE / "cdk" / "monitor" / "capacity_ladder.py",
           "spot_training/config/capacity.py": _PACKAGE / "config" / "capacity.py"}
_PACKAGE_MARKERS = {"spot_training/__init__.py": '"""The part of spot_training the capacity ladder runs."""\n',
                    "spot_training/config/__init__.py": '"""config.capacity only."""\n'}


def ladder_code() -> lambda_.Code:
    """The functions' code: a folder whose path and bytes depend only on the bundled files' contents, so the
    asset hash changes only when they do."""
    files = {name: path.read_bytes() for name, path in _BUNDLE.items()}
    files.update({name: text.encode() for name, text in _PACKAGE_MARKERS.items()})
    digest = hashlib.sha256(b"".join(name.encode() + b"\0" + data for name, data in sorted(files.items())))
    folder = Path(tempfile.gettempdir()) / "spot-training-ladder" / digest.hexdigest()[:16]
    if folder.is_dir() and not _holds(folder, files):  # not what this synth would write: never ship it
        shutil.rmtree(folder)
    if not folder.is_dir():
        staging = folder.with_name(f"{folder.name}.{id(files)}.tmp")
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        try:
            staging.rename(folder)
        except OSError:  # another synth made it first
            pass
    return lambda_.Code.from_asset(str(folder))


def _holds(folder: Path, files: dict[str, bytes]) -> bool:
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return present == sorted(files) and all((folder / name).read_bytes() == data for name, data in files.items())


class RunIdentity(Construct):
    """The function of the pipeline's ResolveRun step: the run an execution belongs to (its RunId parameter, or
    else the execution's own id), which keys the checkpoints. It calls nothing; its key encrypts its logs, its
    environment and its dead letters, and those of a `CapacityController` given it."""

    def __init__(self, scope: Construct, id: str, *, vpc: ec2.IVpc, subnets: Sequence[ec2.ISubnet],
                 endpoint_security_group: ec2.ISecurityGroup | None) -> None:
        super().__init__(scope, id)
        self.key = kms.Key(self, "Key", enable_key_rotation=True,
                           description="Encrypts the run identity's and the capacity ladder's logs and dead letters")
        let_logs_use(self.key)
        # The controller's rule sends what it cannot deliver to a dead-letter queue encrypted with this key.
        self.key.grant_encrypt_decrypt(iam.ServicePrincipal("events.amazonaws.com"))
        self.function, _ = vpc_function(
            self, "ResolveRun", handler="capacity_ladder.resolve_run_handler", code=ladder_code(), vpc=vpc,
            subnets=subnets, endpoint_security_group=endpoint_security_group, key=self.key, statements=[],
            environment={}, purpose="Run identity", timeout=cdk.Duration.seconds(30),
            description="The training pipeline's ResolveRun step: RunId, or else the execution id")

    def invoke_policy(self, id: str, scope: Construct, roles: Sequence[iam.IRole]) -> iam.ManagedPolicy:
        """Let the pipeline roles run the ResolveRun step (Pipelines invokes the function as the pipeline role)."""
        return iam.ManagedPolicy(scope, id, roles=list(roles), statements=[iam.PolicyStatement(
            sid="RunTheResolveRunStep", actions=["lambda:InvokeFunction"], resources=[self.function.function_arn])])


class CapacityController(Construct):
    """When an execution of `plan`'s pipelines ends for capacity, start the next rung of its run while the
    deadline still allows it (`config.capacity.decide`), and say in `topic` what it did and why."""

    def __init__(self, scope: Construct, id: str, *, plan: Plan, pipeline_arns: Sequence[str], training_step: str,
                 vpc: ec2.IVpc, subnets: Sequence[ec2.ISubnet], endpoint_security_group: ec2.ISecurityGroup | None,
                 key: kms.IKey, topic: sns.ITopic | None, topic_key: kms.IKey | None) -> None:
        super().__init__(scope, id)
        stack = cdk.Stack.of(self)
        executions = [f"{arn}/execution/*" for arn in pipeline_arns]
        statements = [
            iam.PolicyStatement(sid="ReadEndedAndRunningExecutions",
                                actions=["sagemaker:DescribePipelineExecution", "sagemaker:ListPipelineExecutionSteps",
                                         "sagemaker:ListPipelineParametersForExecution"], resources=executions),
            iam.PolicyStatement(sid="ListAndStartExecutionsOfTheLadder",
                                actions=["sagemaker:ListPipelineExecutions", "sagemaker:StartPipelineExecution"],
                                resources=list(pipeline_arns)),
            iam.PolicyStatement(sid="ReadWhyTrainingEnded", actions=["sagemaker:DescribeTrainingJob"],
                                resources=[stack.format_arn(service="sagemaker", resource="training-job",
                                                            resource_name=PIPELINE_JOB_PATTERN)]),
        ]
        if topic is not None:
            statements.append(iam.PolicyStatement(sid="SayWhatItDid", actions=["sns:Publish"],
                                                  resources=[topic.topic_arn]))
            if topic_key is not None:  # publishing to an encrypted topic (SNS developer guide, "Key management")
                statements.append(iam.PolicyStatement(sid="EncryptTopicMessages",
                                                      actions=["kms:GenerateDataKey", "kms:Decrypt"],
                                                      resources=[topic_key.key_arn]))
        job_finding = arn_finding(self, "sagemaker", f"training-job/{PIPELINE_JOB_PATTERN}")
        self.function, dead_letters = vpc_function(
            self, "Controller", handler="capacity_ladder.on_execution_end", code=ladder_code(), vpc=vpc,
            subnets=subnets, endpoint_security_group=endpoint_security_group, key=key, statements=statements,
            environment={"LADDER": plan.to_json(), "TRAINING_STEP": training_step,
                         "TOPIC_ARN": topic.topic_arn if topic is not None else ""},
            purpose="Capacity ladder controller", timeout=cdk.Duration.seconds(120),
            description="Starts the next rung of a run whose execution ended for capacity",
            acknowledgments={
                **{f"AwsSolutions-IAM5[Resource::{arn_finding(self, 'sagemaker', f'pipeline/{p.lower()}')}"
                   "/execution/*]": "The ended execution and the run's other executions are created at run time; the "
                   "wildcard covers executions of the ladder's own pipelines only." for p in sorted(set(plan.pipelines.values()))},
                f"AwsSolutions-IAM5[Resource::{job_finding}]": "Pipelines name the training jobs they create "
                "pipelines-<execution>-<step>-<random>; the controller only describes them.",
            })
        self.rule = events.Rule(
            self, "ExecutionEnded", description="Executions of the capacity ladder's pipelines that end Failed or Stopped",
            event_pattern=events.EventPattern(source=["aws.sagemaker"], detail_type=[EXECUTION_STATUS_EVENT],
                                              detail={"pipelineArn": list(pipeline_arns),
                                                      "currentPipelineExecutionStatus": ["Failed", "Stopped"]}),
            targets=[targets.LambdaFunction(self.function, retry_attempts=4, dead_letter_queue=dead_letters)])
