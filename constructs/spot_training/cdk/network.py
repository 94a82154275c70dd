"""Private networking for training: isolated subnets, VPC endpoints, and the training security group."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import custom_resources as cr
from constructs import Construct

from spot_training.config.settings import LOG_RETENTION_DAYS
from spot_training.config.endpoints import interface_endpoints
from spot_training.cdk.nag import acknowledge

HTTPS = ec2.Port.tcp(443)
# CDK's placeholder for "no egress" (ICMP type 252 code 86 to 255.255.255.255/32 matches no packet).
MATCH_NO_TRAFFIC = {"CidrIp": "255.255.255.255/32", "Description": "Disallow all traffic", "IpProtocol": "icmp",
                    "FromPort": 252, "ToPort": 86}
AWS_CUSTOM_RESOURCE_FUNCTION_ID = "AWS679f53fac002430cb0da5b7982bd2287"
LOOKUP_LOG_REASON = ("The provider function's own log lines about one public AWS-managed prefix list lookup, no "
                     "customer data; CloudWatch Logs encrypts them at rest with its own key.")


def keep_default_egress_closed(security_group: ec2.SecurityGroup) -> None:
    """Egress rules to security groups and token peers are separate resources, which leaves the group's
    inline egress list empty, and an empty list makes EC2 add its default allow-all egress rule. Keeping
    CDK's match-nothing rule inline means that default is never created."""
    cfn_group: ec2.CfnSecurityGroup = security_group.node.default_child
    cfn_group.add_property_override("SecurityGroupEgress", [MATCH_NO_TRAFFIC])


def https_between(scope: Construct, id: str, source: ec2.ISecurityGroup, target: ec2.ISecurityGroup,
                  description: str) -> None:
    """HTTPS from `source` to `target` as two rules in `scope`'s stack: `source`'s egress and `target`'s
    ingress. CDK would put a rule on another stack's group into that stack, and cycle the dependencies."""
    ec2.CfnSecurityGroupEgress(scope, f"{id}Egress", group_id=source.security_group_id, ip_protocol="tcp",
                               from_port=443, to_port=443, destination_security_group_id=target.security_group_id,
                               description=description)
    ec2.CfnSecurityGroupIngress(scope, f"{id}Ingress", group_id=target.security_group_id, ip_protocol="tcp",
                                from_port=443, to_port=443, source_security_group_id=source.security_group_id,
                                description=description)


def let_logs_use(key: kms.IKey) -> None:
    """What CloudWatch Logs needs on the key of an encrypted log group (CloudWatch Logs user guide, "Encrypt log
    data in CloudWatch Logs using AWS KMS": Encrypt*, Decrypt*, ReEncrypt*, GenerateDataKey* and Describe*)."""
    logs_service = iam.ServicePrincipal(f"logs.{cdk.Stack.of(key).region}.amazonaws.com")
    key.grant_encrypt_decrypt(logs_service)
    key.grant(logs_service, "kms:DescribeKey")


def retention(days: int) -> logs.RetentionDays:
    """CloudWatch retention in days -> the CDK enum (same order as the allowed values)."""
    return list(logs.RetentionDays)[LOG_RETENTION_DAYS.index(days)]


class TrainingNetwork(Construct):
    """A VPC with isolated subnets only (no internet gateway, no NAT), the S3 gateway endpoint, interface
    endpoints with private DNS, the training security group, and KMS-encrypted VPC flow logs."""

    def __init__(self, scope: Construct, id: str, *, az_count: int = 2, cidr: str = "10.80.0.0/16",
                 flow_log_retention_days: int = 365, mlflow_endpoint: bool = False,
                 sns_endpoint: bool = False) -> None:
        """
        :param az_count: availability zones, one isolated subnet each (@default 2).
        :param cidr: the VPC's CIDR block (@default 10.80.0.0/16).
        :param flow_log_retention_days: retention of the flow log group, a CloudWatch Logs value (@default 365).
        :param mlflow_endpoint: add the interface endpoint of SageMaker managed MLflow (@default False).
        :param sns_endpoint: add the SNS interface endpoint, for the capacity ladder's controller (@default False).
        """
        super().__init__(scope, id)
        self.vpc = ec2.Vpc(
            self, "Vpc", ip_addresses=ec2.IpAddresses.cidr(cidr), nat_gateways=0,
            # The region's first AZs, resolved at deploy time: an account-agnostic stack would get only two.
            availability_zones=[cdk.Fn.select(i, cdk.Fn.get_azs()) for i in range(az_count)],
            create_internet_gateway=False, restrict_default_security_group=True,
            subnet_configuration=[ec2.SubnetConfiguration(name="training", cidr_mask=20,
                                                          subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
        self.subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)
        self.s3_endpoint = self.vpc.add_gateway_endpoint(
            "S3", service=ec2.GatewayVpcEndpointAwsService.S3, subnets=[self.subnets])
        self.endpoint_security_group = ec2.SecurityGroup(
            self, "EndpointSecurityGroup", vpc=self.vpc, allow_all_outbound=False,
            description="VPC interface endpoints: HTTPS from the training security group only")
        self.training_security_group = TrainingSecurityGroup(
            self, "TrainingSecurityGroup", vpc=self.vpc, endpoint_security_group=self.endpoint_security_group)
        # Only what a caller inside the VPC needs; each reason is in spot_training/config/endpoints.py.
        self.interface_endpoints = {
            name: self.vpc.add_interface_endpoint(
                name, service=ec2.InterfaceVpcEndpointAwsService(service, prefix), private_dns_enabled=True,
                open=False, subnets=self.subnets, security_groups=[self.endpoint_security_group])
            for name, (service, prefix, _reason) in interface_endpoints(mlflow_endpoint, sns_endpoint).items()}
        self.flow_log_key = kms.Key(self, "FlowLogKey", enable_key_rotation=True,
                                    description="Encrypts the training VPC's flow log group")
        let_logs_use(self.flow_log_key)
        self.flow_log_group = logs.LogGroup(self, "FlowLogGroup", encryption_key=self.flow_log_key,
                                            retention=retention(flow_log_retention_days),
                                            removal_policy=cdk.RemovalPolicy.RETAIN)
        self.flow_log = self.vpc.add_flow_log(
            "FlowLog", traffic_type=ec2.FlowLogTrafficType.ALL,
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(self.flow_log_group,
                                                                   self._flow_log_role()))

    def _flow_log_role(self) -> iam.IRole:
        # A managed policy instead of the inline default policy CDK would attach (NIST/HIPAA: no inline).
        role = iam.Role(self, "FlowLogRole", assumed_by=iam.ServicePrincipal("vpc-flow-logs.amazonaws.com"))
        # Streams are authorized on `log-group:<name>:log-stream:<stream>`, DescribeLogStreams on the log group
        # itself, `log-group:<name>` (Service Authorization Reference for CloudWatch Logs); the group's Arn
        # attribute ends in `:*` and covers only the former.
        group = self.flow_log_group.log_group_arn
        iam.ManagedPolicy(self, "FlowLogPolicy", roles=[role], statements=[
            iam.PolicyStatement(actions=["logs:CreateLogStream", "logs:PutLogEvents"], resources=[group]),
            iam.PolicyStatement(actions=["logs:DescribeLogStreams"], resources=[cdk.Stack.of(self).format_arn(
                service="logs", resource="log-group", resource_name=self.flow_log_group.log_group_name,
                arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)])])
        # Immutable: CDK's flow log would otherwise add the same grant again as an inline policy.
        return role.without_policy_updates()


class TrainingSecurityGroup(Construct):
    """The training instances' security group: all traffic from and to itself (NCCL and EFA need both
    directions; an egress to 0.0.0.0/0 does not cover EFA, awslabs/awsome-distributed-ai#546), HTTPS to
    the interface endpoints and to S3 through its gateway endpoint, and nothing else."""

    def __init__(self, scope: Construct, id: str, *, vpc: ec2.IVpc,
                 endpoint_security_group: ec2.ISecurityGroup | None = None) -> None:
        """
        :param endpoint_security_group: the interface endpoints' group; HTTPS egress goes there, and the group
            gets the matching ingress from this one.
            @default - HTTPS egress to the VPC's CIDR block, where interface endpoints live.
        """
        super().__init__(scope, id)
        # allow_all_outbound=True would silently drop the egress rules added below.
        self.security_group = ec2.SecurityGroup(
            self, "Resource", vpc=vpc, allow_all_outbound=False,
            description="SageMaker training instances: all traffic among themselves, HTTPS to endpoints and S3")
        self.security_group.add_ingress_rule(self.security_group, ec2.Port.all_traffic(),
                                             "Multi-node NCCL/EFA traffic between training instances")
        self.security_group.add_egress_rule(self.security_group, ec2.Port.all_traffic(),
                                            "Multi-node NCCL/EFA traffic between training instances")
        endpoints = endpoint_security_group or ec2.Peer.ipv4(vpc.vpc_cidr_block)
        self.security_group.add_egress_rule(endpoints, HTTPS, "HTTPS to the VPC interface endpoints")
        if endpoint_security_group is not None:  # and the endpoints admit this group
            endpoint_security_group.add_ingress_rule(self.security_group, HTTPS, "HTTPS from training instances")
        self.security_group.add_egress_rule(ec2.Peer.prefix_list(self._s3_prefix_list_id()), HTTPS,
                                            "HTTPS to S3 through the gateway endpoint")
        keep_default_egress_closed(self.security_group)
        acknowledge(self.security_group, {
            rule: "The all-traffic ingress comes only from this security group itself (the other training "
            "instances of the same job), never from a CIDR range; NCCL and EFA use dynamic ports."
            for rule in ("NIST.800.53.R5-EC2RestrictedCommonPorts", "HIPAA.Security-EC2RestrictedCommonPorts")})

    def _s3_prefix_list_id(self) -> str:
        """The region's S3 managed prefix list id; CloudFormation has no intrinsic that returns it."""
        name = f"com.amazonaws.{cdk.Stack.of(self).region}.s3"
        lookup = cr.AwsCustomResource(
            self, "S3PrefixListLookup",
            on_update=cr.AwsSdkCall(
                service="EC2", action="describeManagedPrefixLists",
                parameters={"Filters": [{"Name": "prefix-list-name", "Values": [name]}]},
                physical_resource_id=cr.PhysicalResourceId.of(name),
                output_paths=["PrefixLists.0.PrefixListId"]),
            policy=cr.AwsCustomResourcePolicy.from_sdk_calls(resources=cr.AwsCustomResourcePolicy.ANY_RESOURCE),
            install_latest_aws_sdk=False)
        acknowledge(lookup, {
            "AwsSolutions-IAM5[Resource::*]": "ec2:DescribeManagedPrefixLists supports no resource-level "
            "permissions; the lookup reads one public AWS-managed prefix list.",
            "NIST.800.53.R5-IAMNoInlinePolicy": "CDK's AwsCustomResource attaches its one-action policy inline; "
            "it grants only ec2:DescribeManagedPrefixLists.",
            "HIPAA.Security-IAMNoInlinePolicy": "CDK's AwsCustomResource attaches its one-action policy inline; "
            "it grants only ec2:DescribeManagedPrefixLists.",
        })
        self._acknowledge_lookup_function()
        return lookup.get_response_field("PrefixLists.0.PrefixListId")

    def _acknowledge_lookup_function(self) -> None:
        # AwsCustomResource runs on one CDK-managed function per stack, created beside the stack's root.
        function = cdk.Stack.of(self).node.try_find_child(AWS_CUSTOM_RESOURCE_FUNCTION_ID)
        reason = ("CDK's AwsCustomResource provider function runs once per deployment to read the S3 "
                  "prefix list id; it handles no data and is not reachable by training traffic.")
        acknowledge(function, {
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AWSLambdaBasicExecutionRole]": "The CDK-managed provider function needs only to write its own "
            "logs; the AWS managed basic execution policy grants exactly that.",
            **{f"{pack}-{rule}": reason for pack in ("NIST.800.53.R5", "HIPAA.Security")
               for rule in ("LambdaConcurrency", "LambdaDLQ", "LambdaInsideVPC")},
            # The log group CDK creates for it (@aws-cdk/aws-lambda:useCdkManagedLogGroup).
            **{f"{pack}-CloudWatchLogGroupEncrypted": LOOKUP_LOG_REASON for pack in ("NIST.800.53.R5", "HIPAA.Security")},
        })
        log_group = function.node.try_find_child("LogGroup")
        if log_group is not None:  # the same finding for checkov, on the resource itself
            log_group.node.default_child.add_metadata("checkov", {"skip": [
                {"id": "CKV_AWS_158", "comment": LOOKUP_LOG_REASON}]})
