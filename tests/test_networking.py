"""The networking stack: isolated subnets, endpoints, security groups, flow logs."""

from __future__ import annotations

from spot_training.config.endpoints import INTERFACE_ENDPOINTS


def _one(resources):
    (item,) = resources.values()
    return item


def _id(synthesized, resource_type, fragment):
    (logical_id,) = [k for k in synthesized.resources("networking", resource_type) if fragment in k]
    return logical_id


def test_vpc_has_no_internet_gateway_and_no_nat(default_app):
    for resource_type in ("AWS::EC2::InternetGateway", "AWS::EC2::NatGateway", "AWS::EC2::EIP",
                          "AWS::EC2::VPCGatewayAttachment"):
        assert default_app.resources("networking", resource_type) == {}


def test_subnets_are_isolated_across_two_availability_zones(default_app):
    subnets = default_app.resources("networking", "AWS::EC2::Subnet")
    assert len(subnets) == 2
    zones = {str(s["Properties"]["AvailabilityZone"]) for s in subnets.values()}
    assert len(zones) == 2
    assert all(s["Properties"]["MapPublicIpOnLaunch"] is False for s in subnets.values())
    routes = default_app.resources("networking", "AWS::EC2::Route")
    assert routes == {}, "isolated subnets have no default route"


def test_az_count_is_configurable(tmp_path_factory):
    from tests.conftest import synth

    three = synth(tmp_path_factory.getbasetemp(), az_count=3)
    assert len(three.resources("networking", "AWS::EC2::Subnet")) == 3


def test_s3_gateway_endpoint_serves_every_subnet_route_table(default_app):
    endpoints = default_app.resources("networking", "AWS::EC2::VPCEndpoint")
    gateways = [e for e in endpoints.values() if e["Properties"].get("VpcEndpointType") == "Gateway"]
    assert len(gateways) == 1
    assert "s3" in str(gateways[0]["Properties"]["ServiceName"])
    assert len(gateways[0]["Properties"]["RouteTableIds"]) == 2


def test_interface_endpoints_are_only_those_a_caller_inside_the_vpc_needs_with_private_dns(default_app):
    # A training job needs the S3 gateway endpoint only; the alarm monitor calls SageMaker and CloudWatch.
    endpoints = default_app.resources("networking", "AWS::EC2::VPCEndpoint")
    interfaces = [e["Properties"] for e in endpoints.values()
                  if e["Properties"].get("VpcEndpointType") == "Interface"]
    names = sorted(str(p["ServiceName"]).split(".", 3)[-1] for p in interfaces)
    assert names == ["monitoring", "sagemaker.api"]
    assert len(interfaces) == len(INTERFACE_ENDPOINTS)
    assert all(reason for _, _, reason in INTERFACE_ENDPOINTS.values())
    assert all(p["PrivateDnsEnabled"] is True for p in interfaces)
    endpoint_sg = _id(default_app, "AWS::EC2::SecurityGroup", "EndpointSecurityGroup")
    assert all(p["SecurityGroupIds"] == [{"Fn::GetAtt": [endpoint_sg, "GroupId"]}] for p in interfaces)


def test_endpoint_security_group_admits_https_only_from_the_training_group(default_app):
    endpoint_sg = _id(default_app, "AWS::EC2::SecurityGroup", "EndpointSecurityGroup")
    training_sg = _id(default_app, "AWS::EC2::SecurityGroup", "TrainingSecurityGroup")
    group = default_app.resources("networking", "AWS::EC2::SecurityGroup")[endpoint_sg]["Properties"]
    assert "SecurityGroupIngress" not in group
    ingress = [r["Properties"] for r in default_app.resources("networking", "AWS::EC2::SecurityGroupIngress").values()
               if r["Properties"]["GroupId"] == {"Fn::GetAtt": [endpoint_sg, "GroupId"]}]
    assert ingress == [{"Description": "HTTPS from training instances", "FromPort": 443, "ToPort": 443,
                        "IpProtocol": "tcp", "GroupId": {"Fn::GetAtt": [endpoint_sg, "GroupId"]},
                        "SourceSecurityGroupId": {"Fn::GetAtt": [training_sg, "GroupId"]}}]


def test_training_security_group_allows_itself_both_ways_and_https_to_endpoints_and_s3_only(default_app):
    training_sg = _id(default_app, "AWS::EC2::SecurityGroup", "TrainingSecurityGroup")
    endpoint_sg = _id(default_app, "AWS::EC2::SecurityGroup", "EndpointSecurityGroup")
    me = {"Fn::GetAtt": [training_sg, "GroupId"]}
    group = default_app.resources("networking", "AWS::EC2::SecurityGroup")[training_sg]["Properties"]
    # An inline match-nothing rule keeps EC2 from adding its default allow-all egress.
    assert group["SecurityGroupEgress"] == [{"CidrIp": "255.255.255.255/32", "Description": "Disallow all traffic",
                                             "FromPort": 252, "IpProtocol": "icmp", "ToPort": 86}]
    ingress = [r["Properties"] for r in default_app.resources("networking", "AWS::EC2::SecurityGroupIngress").values()
               if r["Properties"]["GroupId"] == me]
    assert [(r["IpProtocol"], r["SourceSecurityGroupId"]) for r in ingress] == [("-1", me)]
    egress = sorted((r["Properties"] for r in default_app.resources("networking", "AWS::EC2::SecurityGroupEgress").values()
                     if r["Properties"]["GroupId"] == me), key=lambda r: r["Description"])
    assert [(r["IpProtocol"], r.get("FromPort"), r.get("ToPort")) for r in egress] == [
        ("tcp", 443, 443), ("tcp", 443, 443), ("-1", None, None)]
    assert egress[0]["DestinationPrefixListId"]["Fn::GetAtt"][1] == "PrefixLists.0.PrefixListId"
    assert egress[1]["DestinationSecurityGroupId"] == {"Fn::GetAtt": [endpoint_sg, "GroupId"]}
    assert egress[2]["DestinationSecurityGroupId"] == me


def test_s3_prefix_list_is_looked_up_by_the_regions_name(default_app):
    (lookup,) = [r for r in default_app.templates["networking"]["Resources"].values()
                 if r["Type"] == "Custom::AWS" and "describeManagedPrefixLists" in r["Properties"]["Update"]]
    assert "com.amazonaws.us-east-1.s3" in str(lookup["Properties"]["Update"])


def test_flow_logs_capture_all_traffic_into_an_encrypted_retained_log_group(default_app):
    (flow_log,) = default_app.resources("networking", "AWS::EC2::FlowLog").values()
    assert flow_log["Properties"]["TrafficType"] == "ALL"
    assert flow_log["Properties"]["LogDestinationType"] == "cloud-watch-logs"
    (group,) = [g for g in default_app.resources("networking", "AWS::Logs::LogGroup").values()
                if g["Properties"].get("LogGroupName") is None]  # the other is CDK's, for the prefix list lookup
    assert group["Properties"]["RetentionInDays"] == 365
    assert "KmsKeyId" in group["Properties"]
    assert group["DeletionPolicy"] == "Retain"
    keys = default_app.resources("networking", "AWS::KMS::Key")
    assert all(k["Properties"]["EnableKeyRotation"] is True for k in keys.values())


def test_default_security_group_is_closed(default_app):
    restrict = [r for r in default_app.templates["networking"]["Resources"].values()
                if r["Type"] == "Custom::VpcRestrictDefaultSG"]
    assert len(restrict) == 1
