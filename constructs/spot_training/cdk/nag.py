"""The one way this project acknowledges a cdk-nag finding, and how cdk-nag spells the ARNs in finding ids.
(Registering the packs is `checks.add_checks`.)"""

from __future__ import annotations

from collections.abc import Mapping

import aws_cdk as cdk
from constructs import IConstruct


def acknowledge(construct: IConstruct, findings: Mapping[str, str]) -> None:
    """Acknowledge each exact finding id (e.g. `AwsSolutions-IAM5[Resource::*]`) on `construct`, with the
    reason a security reviewer reads."""
    for finding, reason in findings.items():
        cdk.Validations.of(construct).acknowledge(cdk.Acknowledgment(id=finding, reason=reason))


def arn_finding(scope: IConstruct, service: str, resource: str) -> str:
    """An ARN as cdk-nag spells it in a finding id: unresolved parts as `<AWS::Region>`-style names."""
    stack = cdk.Stack.of(scope)
    region = "<AWS::Region>" if cdk.Token.is_unresolved(stack.region) else stack.region
    account = "<AWS::AccountId>" if cdk.Token.is_unresolved(stack.account) else stack.account
    # With a concrete region, CDK writes the partition literally (feature flags of cdk init 2.27x).
    partition = "<AWS::Partition>" if cdk.Token.is_unresolved(stack.partition) else stack.partition
    return f"arn:{partition}:{service}:{region}:{account}:{resource}"


def bucket_arn_and_finding(scope: IConstruct, bucket) -> tuple[str, str]:
    """The bucket's ARN to use in `scope`'s policies, and how cdk-nag will spell it in a finding id.
    A bucket of another stack is exported under an explicit name, so the finding id is predictable."""
    cfn_bucket = bucket.node.default_child
    if not isinstance(cfn_bucket, cdk.CfnElement):
        return bucket.bucket_arn, bucket.bucket_arn
    owner = cdk.Stack.of(bucket)
    if owner is cdk.Stack.of(scope):
        return bucket.bucket_arn, f"<{owner.get_logical_id(cfn_bucket)}.Arn>"
    name = f"{owner.stack_name}-{owner.get_logical_id(cfn_bucket)}-Arn"
    if owner.node.try_find_child(f"Export{name}") is None:  # one export, however many policies use it
        owner.export_value(bucket.bucket_arn, name=name)
    return cdk.Fn.import_value(name), name
