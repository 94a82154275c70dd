"""A synthesized cloud assembly as CloudFormation would deploy it into one fake account and region: every
resource gets a physical id, and every intrinsic (Ref, Fn::GetAtt, Fn::Join, Fn::Sub, Fn::Select, Fn::Split,
Fn::GetAZs, Fn::ImportValue) is evaluated, so IAM policies become concrete documents.

Return values follow the CloudFormation resource reference (each resource type's "Return values" section):
Ref of a role, bucket, log group, function or policy is its name; of a managed policy or topic, its ARN; of a
key, its key id; of a queue, its URL; Fn::GetAtt Arn gives the ARN.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

ACCOUNT = "111122223333"
PARTITION = "aws"
NO_VALUE = object()


def _hex(seed: str, length: int) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:length]


class Deployment:
    """The stacks of one cloud assembly, deployed (on paper) to `ACCOUNT` in `region`."""

    def __init__(self, assembly_dir: str | Path, region: str) -> None:
        self.directory, self.region, self.account = Path(assembly_dir), region, ACCOUNT
        manifest = json.loads((self.directory / "manifest.json").read_text())
        self.templates: dict[str, dict[str, Any]] = {}
        for name, artifact in manifest["artifacts"].items():
            if artifact["type"] == "aws:cloudformation:stack":
                stack_name = artifact.get("properties", {}).get("stackName", name)
                template = artifact["properties"]["templateFile"]
                self.templates[stack_name] = json.loads((self.directory / template).read_text())
        self._exports: dict[str, Any] | None = None

    # ---- resources --------------------------------------------------------------------------------
    def resources(self, resource_type: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(stack, logical id, resolved properties) of every resource of `resource_type`."""
        found = []
        for stack, template in self.templates.items():
            for logical, resource in template["Resources"].items():
                if resource["Type"] == resource_type:
                    found.append((stack, logical, self.resolve(resource.get("Properties", {}), stack)))
        return found

    def _resource(self, stack: str, logical: str) -> dict[str, Any]:
        return self.templates[stack]["Resources"][logical]

    def _name(self, stack: str, logical: str, name_property: str | None, lower: bool = False,
              limit: int = 64) -> str:
        props = self._resource(stack, logical).get("Properties", {})
        if name_property and name_property in props:
            return self.resolve(props[name_property], stack)
        name = f"{stack}-{logical}"[: limit - 9] + "-" + _hex(stack + logical, 8)
        return name.lower() if lower else name

    def ref(self, stack: str, logical: str) -> str:
        resource_type = self._resource(stack, logical)["Type"]
        arn = f"arn:{PARTITION}"
        if resource_type == "AWS::IAM::Role":
            return self._name(stack, logical, "RoleName")
        if resource_type == "AWS::IAM::ManagedPolicy":
            return f"{arn}:iam::{ACCOUNT}:policy/{self._name(stack, logical, 'ManagedPolicyName')}"
        if resource_type == "AWS::IAM::Policy":
            return self._name(stack, logical, "PolicyName")
        if resource_type == "AWS::S3::Bucket":
            return self._name(stack, logical, "BucketName", lower=True, limit=63)
        if resource_type == "AWS::KMS::Key":
            h = _hex(stack + logical, 32)
            return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
        if resource_type == "AWS::Logs::LogGroup":
            return self._name(stack, logical, "LogGroupName")
        if resource_type == "AWS::Lambda::Function":
            return self._name(stack, logical, "FunctionName")
        if resource_type == "AWS::SNS::Topic":
            return f"{arn}:sns:{self.region}:{ACCOUNT}:{self._name(stack, logical, 'TopicName')}"
        if resource_type == "AWS::SQS::Queue":
            return f"https://sqs.{self.region}.amazonaws.com/{ACCOUNT}/{self._name(stack, logical, 'QueueName')}"
        if resource_type == "AWS::SageMaker::Pipeline":
            return self._name(stack, logical, "PipelineName")
        prefixes = {"AWS::EC2::VPC": "vpc", "AWS::EC2::Subnet": "subnet", "AWS::EC2::SecurityGroup": "sg",
                    "AWS::EC2::VPCEndpoint": "vpce", "AWS::EC2::RouteTable": "rtb"}
        if resource_type in prefixes:
            return f"{prefixes[resource_type]}-{_hex(stack + logical, 17)}"
        return f"{logical.lower()}-{_hex(stack + logical, 8)}"

    def get_att(self, stack: str, logical: str, attribute: str) -> Any:
        resource_type = self._resource(stack, logical)["Type"]
        ref = self.ref(stack, logical)
        arn = f"arn:{PARTITION}"
        if attribute == "Arn":
            return {
                "AWS::IAM::Role": f"{arn}:iam::{ACCOUNT}:role/{ref}",
                "AWS::S3::Bucket": f"{arn}:s3:::{ref}",
                "AWS::KMS::Key": f"{arn}:kms:{self.region}:{ACCOUNT}:key/{ref}",
                "AWS::Logs::LogGroup": f"{arn}:logs:{self.region}:{ACCOUNT}:log-group:{ref}:*",
                "AWS::Lambda::Function": f"{arn}:lambda:{self.region}:{ACCOUNT}:function:{ref}",
                "AWS::SQS::Queue": f"{arn}:sqs:{self.region}:{ACCOUNT}:{ref.rsplit('/', 1)[-1]}",
                "AWS::CloudWatch::Alarm": f"{arn}:cloudwatch:{self.region}:{ACCOUNT}:alarm:{ref}",
                "AWS::Events::Rule": f"{arn}:events:{self.region}:{ACCOUNT}:rule/{ref}",
            }.get(resource_type, f"{arn}:unknown:{self.region}:{ACCOUNT}:{ref}")
        if resource_type == "AWS::EC2::SecurityGroup" and attribute == "GroupId":
            return ref
        if resource_type == "AWS::EC2::VPC" and attribute == "DefaultSecurityGroup":
            return f"sg-{_hex(stack + logical + 'default', 17)}"
        if resource_type == "AWS::EC2::VPC" and attribute == "CidrBlock":
            return self.resolve(self._resource(stack, logical)["Properties"]["CidrBlock"], stack)
        if resource_type == "AWS::IAM::Role" and attribute == "RoleId":
            return f"AROA{_hex(ref, 16).upper()}"
        if resource_type == "AWS::SQS::Queue" and attribute == "QueueName":
            return ref.rsplit("/", 1)[-1]
        if resource_type == "AWS::SageMaker::MlflowTrackingServer" and attribute == "TrackingServerArn":
            name = self._name(stack, logical, "TrackingServerName")
            return f"{arn}:sagemaker:{self.region}:{ACCOUNT}:mlflow-tracking-server/{name}"
        if resource_type == "Custom::AWS" and "PrefixListId" in attribute:
            return "pl-63a5400a"  # the S3 prefix list id in us-east-1 (looked up at deploy by the custom resource)
        return f"{logical}.{attribute}-{_hex(stack + logical + attribute, 8)}"

    # ---- intrinsics -------------------------------------------------------------------------------
    def _pseudo(self, name: str, stack: str) -> Any:
        return {"AWS::AccountId": ACCOUNT, "AWS::Region": self.region, "AWS::Partition": PARTITION,
                "AWS::URLSuffix": "amazonaws.com", "AWS::StackName": stack, "AWS::NoValue": NO_VALUE}[name]

    def _ref(self, name: str, stack: str) -> Any:
        if name.startswith("AWS::"):
            return self._pseudo(name, stack)
        parameters = self.templates[stack].get("Parameters", {})
        if name in parameters:
            return parameters[name].get("Default")
        return self.ref(stack, name)

    def exports(self) -> dict[str, Any]:
        if self._exports is None:
            self._exports = {}
            for stack, template in self.templates.items():
                for output in template.get("Outputs", {}).values():
                    if "Export" in output:
                        self._exports[self.resolve(output["Export"]["Name"], stack)] = self.resolve(
                            output["Value"], stack)
        return self._exports

    def resolve(self, node: Any, stack: str) -> Any:
        if isinstance(node, list):
            return [v for v in (self.resolve(x, stack) for x in node) if v is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, value), = node.items()
            if key == "Ref":
                return self._ref(value, stack)
            if key == "Fn::GetAtt":
                logical, attribute = value if isinstance(value, list) else value.split(".", 1)
                return self.get_att(stack, logical, attribute)
            if key == "Fn::Join":
                separator, parts = value
                return separator.join(str(p) for p in self.resolve(parts, stack))
            if key == "Fn::Sub":
                template, variables = (value, {}) if isinstance(value, str) else value
                return self._sub(template, self.resolve(variables, stack), stack)
            if key == "Fn::Select":
                index, items = value
                return self.resolve(items, stack)[int(self.resolve(index, stack))]
            if key == "Fn::Split":
                separator, text = value
                return self.resolve(text, stack).split(separator)
            if key == "Fn::GetAZs":
                return [f"{self.region}{letter}" for letter in "abcdef"]
            if key == "Fn::ImportValue":
                name = self.resolve(value, stack)
                if name not in self.exports():
                    raise KeyError(f"Fn::ImportValue {name}: no stack exports it")
                return self.exports()[name]
            if key.startswith("Fn::"):
                raise NotImplementedError(f"{key} in {stack}")
        resolved = {k: self.resolve(v, stack) for k, v in node.items()}
        return {k: v for k, v in resolved.items() if v is not NO_VALUE}

    def _sub(self, template: str, variables: dict[str, Any], stack: str) -> str:
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name and not name.startswith("AWS::"):
                logical, attribute = name.split(".", 1)
                return str(self.get_att(stack, logical, attribute))
            return str(self._ref(name, stack))

        return re.sub(r"\$\{([^}]+)\}", replace, template)
