#!/usr/bin/env python3
"""Another team's CDK app: its own VPC built the usual way (public subnets and private subnets behind a NAT
gateway), the construct with minimal arguments, and cdk-nag's AwsSolutions pack.

    pip install ./constructs   # from the spot-training repository (or its git subdirectory)
    cdk synth --app "python examples/team_app/app.py"
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam

from spot_training import TrainingConfig, TrainingPipeline, add_checks


def build(app: cdk.App) -> cdk.Stack:
    stack = cdk.Stack(app, "VisionTraining", env=cdk.Environment(region="eu-west-1"))
    vpc = ec2.Vpc(stack, "Vpc", max_azs=2, nat_gateways=1, subnet_configuration=[
        ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC),
        ec2.SubnetConfiguration(name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)])
    vpc.add_flow_log("FlowLog")
    # Region from the stack, subnets: the VPC's private ones, everything else created with secure defaults.
    training = TrainingPipeline(stack, "Training", config=TrainingConfig(instance_type="ml.g5.12xlarge",
                                                                           instance_count=2), vpc=vpc)
    scientists = iam.Role.from_role_name(stack, "Scientists", "vision-scientists")
    training.start_execution_policy("ScientistsMayStart", [scientists])
    cdk.CfnOutput(stack, "PipelineName", value=training.pipeline_name)
    return stack


def main() -> None:
    app = cdk.App()
    build(app)
    add_checks(app, packs=["AwsSolutions"])
    app.synth()


if __name__ == "__main__":
    main()
