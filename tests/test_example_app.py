"""examples/team_app: another team's app (own NAT VPC, minimal arguments, cdk-nag AwsSolutions) synthesizes
clean from the built wheel in a fresh environment: `.venv-wheel`, which `make test` creates from nothing with
the wheel and only what its declared dependency ranges resolve to (no pins of this repository, no torch)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT

TEAM_VENV = ROOT / ".venv-wheel"
TEAM_PYTHON = TEAM_VENV / "bin" / "python"


def _team(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(kwargs.pop("env", {}))
    return subprocess.run([str(TEAM_PYTHON), *args], env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def team_environment():
    if not TEAM_PYTHON.exists():
        pytest.fail("no .venv-wheel: run `make test` (its test-setup builds the team's environment)")
    return TEAM_PYTHON


def test_the_team_environment_holds_the_wheel_and_its_declared_dependencies_only(team_environment):
    probe = _team("-c", "import json, importlib.metadata as m, spot_training; d = m.distribution('spot-training');"
                  "print(json.dumps({'file': spot_training.__file__, 'license': d.metadata['License-Expression'],"
                  "'readme': d.metadata['Description-Content-Type'], 'files': [str(f) for f in d.files],"
                  "'packages': sorted(x.metadata['Name'].lower() for x in m.distributions())}))", cwd="/")
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout)
    assert found["file"].startswith(str(TEAM_VENV)) and "site-packages" in found["file"]
    assert found["license"] == "Apache-2.0" and found["readme"] == "text/markdown"
    assert any(f.endswith("licenses/LICENSE") for f in found["files"]), found["files"]
    assert {"aws-cdk-lib", "cdk-nag", "constructs", "sagemaker", "boto3"} <= set(found["packages"])
    assert "torch" not in found["packages"] and "pytest" not in found["packages"]
    check = _team("-m", "pip", "check")
    assert check.returncode == 0, check.stdout


def test_the_team_app_synthesizes_clean_with_its_private_subnets_and_its_region(team_environment, tmp_path):
    done = _team(str(ROOT / "examples" / "team_app" / "app.py"), cwd=tmp_path, env={"CDK_OUTDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    # cdk-nag reports findings as errors on the stderr of synthesis; a clean app prints none.
    assert "AwsSolutions-" not in done.stderr, done.stderr[-3000:]
    template = json.loads((tmp_path / "VisionTraining.template.json").read_text())
    resources = template["Resources"]
    (pipeline,) = [r for r in resources.values() if r["Type"] == "AWS::SageMaker::Pipeline"]
    body = json.dumps(pipeline["Properties"]["PipelineDefinition"])
    private = [k for k, r in resources.items() if r["Type"] == "AWS::EC2::Subnet" and "private" in k.lower()]
    public = [k for k, r in resources.items() if r["Type"] == "AWS::EC2::Subnet" and "public" in k.lower()]
    assert len(private) == 2 and all(k in body for k in private) and not any(k in body for k in public)
    assert ".dkr.ecr.eu-west-1.amazonaws.com/huggingface-pytorch-training" in body
