"""The platform's own Lambda functions (the alarm monitor, the run identity, the capacity controller): each in
the training VPC behind a security group that reaches only the interface endpoints, with a role of its own, an
encrypted log group and environment, and a dead-letter queue."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from spot_training.cdk.nag import acknowledge, arn_finding
from spot_training.cdk.network import https_between, keep_default_egress_closed
from spot_training.cdk.roles import network_interface_arns


def vpc_function(scope: Construct, name: str, *, handler: str, code: lambda_.Code, vpc: ec2.IVpc,
                 subnets: Sequence[ec2.ISubnet], endpoint_security_group: ec2.ISecurityGroup | None, key: kms.IKey,
                 statements: Sequence[iam.PolicyStatement], environment: Mapping[str, str], description: str,
                 purpose: str, timeout: cdk.Duration = cdk.Duration.seconds(60),
                 reserved_concurrency: int | None = None,
                 acknowledgments: Mapping[str, str] | None = None) -> tuple[lambda_.Function, sqs.Queue]:
    """A function `<name>` in `scope` with `<name>SecurityGroup`, `<name>Logs`, `<name>Role`,
    `<name>DeadLetters` and `<name>Policy` beside it (`statements` plus logs, VPC network interfaces, dead
    letters and the key). `purpose` names it in descriptions; `acknowledgments` are its policy's reviewed
    findings beyond the VPC ones."""
    group = ec2.SecurityGroup(scope, f"{name}SecurityGroup", vpc=vpc, allow_all_outbound=False,
                              description=f"{purpose}: HTTPS to the VPC interface endpoints only")
    if endpoint_security_group is not None:
        https_between(scope, f"{name}ToEndpoints", group, endpoint_security_group,
                      f"{purpose} to the VPC interface endpoints")
        keep_default_egress_closed(group)
    else:
        group.add_egress_rule(ec2.Peer.ipv4(vpc.vpc_cidr_block), ec2.Port.tcp(443), "HTTPS to the VPC interface endpoints")
    log_group = logs.LogGroup(scope, f"{name}Logs", encryption_key=key, retention=logs.RetentionDays.ONE_YEAR,
                              removal_policy=cdk.RemovalPolicy.DESTROY)
    role = iam.Role(scope, f"{name}Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"), description=purpose)
    dead_letters = sqs.Queue(scope, f"{name}DeadLetters", encryption=sqs.QueueEncryption.KMS, encryption_master_key=key,
                             enforce_ssl=True, retention_period=cdk.Duration.days(14))
    eni, create_eni_resources = network_interface_arns(cdk.Stack.of(scope), subnets, [group])
    policy = iam.ManagedPolicy(scope, f"{name}Policy", roles=[role], statements=[
        *statements,
        iam.PolicyStatement(sid="WriteOwnLogs", actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                            resources=[log_group.log_group_arn]),
        iam.PolicyStatement(sid="CreateVpcNetworkInterfaces", actions=["ec2:CreateNetworkInterface"],
                            resources=create_eni_resources),
        iam.PolicyStatement(sid="ManageVpcNetworkInterfaces",
                            actions=["ec2:DeleteNetworkInterface", "ec2:AssignPrivateIpAddresses",
                                     "ec2:UnassignPrivateIpAddresses"], resources=[eni]),
        # The EC2 rights of AWSLambdaVPCAccessExecutionRole (v3), which a VPC function needs (Lambda developer
        # guide, "Giving Lambda functions access to resources in an Amazon VPC"); Describe* take no resource.
        iam.PolicyStatement(sid="DescribeVpcNetworkInterfaces",
                            actions=["ec2:DescribeNetworkInterfaces", "ec2:DescribeSubnets"], resources=["*"]),
        iam.PolicyStatement(sid="DeadLetters", actions=["sqs:SendMessage"], resources=[dead_letters.queue_arn]),
        iam.PolicyStatement(sid="EncryptDeadLettersAndLogs", actions=["kms:GenerateDataKey", "kms:Decrypt"],
                            resources=[key.key_arn]),
    ])
    function = lambda_.Function(
        scope, name, runtime=lambda_.Runtime.PYTHON_3_14, handler=handler, code=code,
        role=role.without_policy_updates(), timeout=timeout, memory_size=256, dead_letter_queue=dead_letters,
        log_group=log_group, reserved_concurrent_executions=reserved_concurrency, environment_encryption=key,
        vpc=vpc, vpc_subnets=ec2.SubnetSelection(subnets=list(subnets)), security_groups=[group],
        environment=dict(environment), description=description)
    function.node.add_dependency(policy)
    acknowledge(policy, {
        "AwsSolutions-IAM5[Resource::*]": "ec2:DescribeNetworkInterfaces and ec2:DescribeSubnets (and any other "
        "action here on '*', named in its statement) support no resource-level permissions.",
        f"AwsSolutions-IAM5[Resource::{arn_finding(scope, 'ec2', 'network-interface/*')}]": "Lambda creates the "
        "function's VPC network interfaces at run time, so their ids are unknown; creation is tied to this "
        "function's subnets and security group.",
        **(acknowledgments or {}),
    })
    if reserved_concurrency is None:
        reason = ("No reserved concurrency by default: accounts at the default Lambda concurrency quota of 10 "
                  f"reject any reservation (the unreserved pool must stay >= 10) and the stack would roll back. The "
                  f"{purpose.lower()} runs for seconds at a time.")
        acknowledge(function, {"NIST.800.53.R5-LambdaConcurrency": reason, "HIPAA.Security-LambdaConcurrency": reason})
    acknowledge(dead_letters, {
        "AwsSolutions-SQS3": f"This queue is itself the dead-letter queue of the {purpose.lower()}; a dead-letter "
        "queue for it would only move the same messages again.",
    })
    return function, dead_letters
