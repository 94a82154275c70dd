"""The pipeline-definition rules as a CDK policy-validation plugin, reported beside cdk-nag's findings."""

from __future__ import annotations

import os

import aws_cdk as cdk
import jsii
from constructs import IConstruct

from spot_training.cdk.pipeline import TrainingPipeline
from spot_training.definition.rules import check

RULE_NAME = "SpotTraining-PipelineDefinition"


@jsii.implements(cdk.IPolicyValidationPluginBeta1)
class DefinitionValidationPlugin:
    """Checks every `TrainingPipeline` definition in the app against botocore's CreateTrainingJob shape
    and the platform's rules; any violation fails synth with the field it concerns."""

    @property
    def name(self) -> str:
        return "spot-training-definition"

    @property
    def version(self) -> str:
        return "1"

    @property
    def rule_ids(self) -> list[str]:
        return [RULE_NAME]

    def validate(self, context: cdk.IPolicyValidationContextBeta1) -> cdk.PolicyValidationPluginReportBeta1:
        violations = []
        for pipeline in _pipelines(context.app_construct):
            stack = cdk.Stack.of(pipeline)
            template = os.path.join(_outdir(stack), stack.template_file)
            for resource, definition, expectations in pipeline.checked_definitions:
                for violation in check(definition, expectations):
                    violations.append(cdk.PolicyViolationBeta1(
                        rule_name=RULE_NAME, description=str(violation), severity="error",
                        fix="Correct the training setting named in the message (cdk.json `training` context).",
                        violating_resources=[cdk.PolicyViolatingResourceBeta1(
                            resource_logical_id=stack.resolve(resource.logical_id),
                            template_path=template, locations=[violation.field])]))
        return cdk.PolicyValidationPluginReportBeta1(success=not violations, violations=violations)


def _pipelines(root: IConstruct) -> list[TrainingPipeline]:
    return [c for c in root.node.find_all() if isinstance(c, TrainingPipeline)]


def _outdir(stack: cdk.Stack) -> str:
    stage = cdk.Stage.of(stack)
    return stage.outdir if stage is not None else ""
