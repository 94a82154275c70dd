"""Shared fixtures: the app is synthesized once per configuration for the whole session."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
# Node 22 from node_modules for jsii, as `make` and the CDK CLI use it.
os.environ["PATH"] = f"{ROOT / 'node_modules' / '.bin'}{os.pathsep}{os.environ['PATH']}"


def cdk_json_context() -> dict[str, Any]:
    return json.loads((ROOT / "cdk.json").read_text())["context"]


class Synthesized:
    """One synthesized app: its stacks' templates and the live construct tree."""

    def __init__(self, app, stacks: dict[str, Any], assembly) -> None:
        self.app, self.stacks, self.assembly = app, stacks, assembly
        self.templates = {name: assembly.get_stack_by_name(stack.stack_name).template
                          for name, stack in stacks.items()}

    def resources(self, name: str, resource_type: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.templates[name]["Resources"].items() if v["Type"] == resource_type}


@functools.cache
def _synth(overrides_json: str, outdir: str) -> Synthesized:
    import aws_cdk as cdk

    from app import build_app
    from spot_training.config.settings import TrainingConfig

    context = {**cdk_json_context(), **json.loads(overrides_json)}
    app = cdk.App(context=context, outdir=outdir)
    config = TrainingConfig.from_context(app.node.get_all_context())
    stacks = build_app(app, config)
    return Synthesized(app, stacks, app.synth())


def synth(tmp_root: Path, **overrides: Any) -> Synthesized:
    key = json.dumps({f"training.{k}": v for k, v in sorted(overrides.items())})
    outdir = tmp_root / f"cdk-{abs(hash(key))}"
    return _synth(key, str(outdir))


@pytest.fixture(scope="session")
def default_app(tmp_path_factory) -> Synthesized:
    """The app as `make synth` builds it from cdk.json (checks included)."""
    return synth(tmp_path_factory.getbasetemp())


def pipeline_body(synthesized: Synthesized) -> dict[str, Any]:
    """The pipeline stack's definition body, each deploy-time value shown as a `<kind:name>` marker."""
    (pipeline,) = synthesized.resources("pipeline", "AWS::SageMaker::Pipeline").values()
    body = pipeline["Properties"]["PipelineDefinition"]["PipelineDefinitionBody"]
    if isinstance(body, dict):
        separator, parts = body["Fn::Join"]
        body = separator.join(p if isinstance(p, str) else _describe_token(p) for p in parts)
    return json.loads(body)


def _describe_token(intrinsic: dict[str, Any]) -> str:
    """A CloudFormation intrinsic as a short readable marker: `<import:Name>`, `<ref:Id>`, `<sub:...>`."""
    (kind, value), = intrinsic.items()
    if kind == "Fn::GetAtt":
        value = ".".join(value)
    return f"<{kind.removeprefix('Fn::').lower()}:{value}>"


def training_step(synthesized: Synthesized) -> dict[str, Any]:
    return next(s for s in pipeline_body(synthesized)["Steps"] if s["Type"] == "Training")
