#!/usr/bin/env python3
"""CDK app: networking -> security -> pipeline, with cdk-nag and the definition rules enforced.

Settings come from the `training` context in cdk.json; override any field with
`cdk synth -c training.<field>=<value>`. A bad value stops synth with one line and exit code 2.
"""

from __future__ import annotations

import sys

import aws_cdk as cdk

from spot_training.config.settings import ConfigError, TrainingConfig
from spot_training.definition.build import check_default_image
from spot_training.cdk.checks import add_checks


def require_region(config: TrainingConfig) -> None:
    if not config.region:
        raise ConfigError("training.region: empty; the app needs the region its stacks deploy to (cdk.json, or "
                          "-c training.region=...)")


def build_app(app: cdk.App, config: TrainingConfig) -> dict[str, cdk.Stack]:
    from stacks.networking import NetworkingStack
    from stacks.pipeline import PipelineStack
    from stacks.security import SecurityStack

    # Account-agnostic on purpose: synth needs no credentials, and templates are the same for everyone.
    require_region(config)
    env = cdk.Environment(region=config.region)
    prefix = "".join(part.capitalize() for part in config.pipeline_name.split("-"))
    networking = NetworkingStack(app, f"{prefix}Networking", config=config, env=env)
    network = networking.network
    subnets = network.vpc.isolated_subnets
    security_group = network.training_security_group.security_group
    security = SecurityStack(app, f"{prefix}Security", config=config, subnets=subnets,
                             security_group=security_group, env=env)
    pipeline = PipelineStack(app, f"{prefix}Pipeline", config=config, vpc=network.vpc, subnets=subnets,
                             security_group=security_group, bucket=security.store.bucket,
                             key=security.store.key, training_role=security.roles.training_role,
                             pipeline_role=security.roles.pipeline_role,
                             endpoint_security_group=network.endpoint_security_group, env=env)
    add_checks(app)
    for finding in config.guardrail_findings():  # with guardrails=refuse, main() stopped before this
        cdk.Annotations.of(pipeline).add_warning_v2("spot-training:guardrail", finding)
    return {"networking": networking, "security": security, "pipeline": pipeline}


def main() -> None:
    app = cdk.App()
    try:
        config = TrainingConfig.from_context(app.node.get_all_context())
        require_region(config)
        check_default_image(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    findings = config.guardrail_findings()
    if findings and config.guardrails == "refuse":
        for finding in findings:
            print(f"error: guardrail: {finding} (training.guardrails=refuse)", file=sys.stderr)
        sys.exit(2)
    build_app(app, config)
    app.synth()


if __name__ == "__main__":
    main()
