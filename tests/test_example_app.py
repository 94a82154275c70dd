"""examples/team_app: another team's app (own NAT VPC, minimal arguments, cdk-nag AwsSolutions) synthesizes
clean against the installed package (the wheel `make` builds, not the source tree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import spot_training
from tests.conftest import ROOT


def test_the_team_app_synthesizes_clean_with_its_private_subnets_and_its_region(tmp_path):
    assert "site-packages" in spot_training.__file__, "the suite runs the installed package"
    env = {**os.environ, "CDK_OUTDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "team_app" / "app.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    template = json.loads((tmp_path / "VisionTraining.template.json").read_text())
    resources = template["Resources"]
    (pipeline,) = [r for r in resources.values() if r["Type"] == "AWS::SageMaker::Pipeline"]
    body = json.dumps(pipeline["Properties"]["PipelineDefinition"])
    private = [k for k, r in resources.items() if r["Type"] == "AWS::EC2::Subnet" and "private" in k.lower()]
    public = [k for k, r in resources.items() if r["Type"] == "AWS::EC2::Subnet" and "public" in k.lower()]
    assert len(private) == 2 and all(k in body for k in private) and not any(k in body for k in public)
    assert ".dkr.ecr.eu-west-1.amazonaws.com/huggingface-pytorch-training" in body
