"""Importing the package and building the construct leave the caller's process as it was."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

PROBE = r"""
import json, logging, os, sys, time
logging.getLogger("their.app").setLevel(logging.DEBUG)
def state():
    loggers = {n: l.level for n, l in logging.root.manager.loggerDict.items() if isinstance(l, logging.Logger)}
    return {"hook": repr(sys.excepthook), "environ": dict(os.environ), "root": [logging.root.level, len(logging.root.handlers)],
            "their": logging.getLogger("their.app").level, "loggers": loggers}
before = state()
started = time.perf_counter()
from spot_training import TrainingConfig, TrainingPipeline
import_seconds = time.perf_counter() - started
after_import = state()
sdk_after_import = "sagemaker" in sys.modules
import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
app = cdk.App()
stack = cdk.Stack(app, "S", env=cdk.Environment(region="us-east-1"))
vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
    ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
TrainingPipeline(stack, "T", config=TrainingConfig(), vpc=vpc, alarms=False)
after_build = state()
after_build["loggers"] = {n: v for n, v in after_build["loggers"].items() if n in before["loggers"]}
print(json.dumps({"before": before, "after_import": after_import, "after_build": after_build,
                  "sdk_after_import": sdk_after_import, "sdk_after_build": "sagemaker" in sys.modules,
                  "import_seconds": import_seconds}))
"""


def test_import_and_construction_leave_excepthook_environment_and_logging_alone():
    env = {k: v for k, v in __import__("os").environ.items() if k != "SAGEMAKER_SUPPRESS_V2_WARNING"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    before = report["before"]
    assert report["sdk_after_import"] is False, "the SageMaker SDK is imported only when a definition is generated"
    assert report["sdk_after_build"] is True
    for moment in ("after_import", "after_build"):
        state = report[moment]
        assert state["hook"] == before["hook"], moment
        assert state["environ"] == before["environ"], moment
        assert state["root"] == before["root"] and state["their"] == before["their"], moment
        assert state["loggers"] == {n: v for n, v in state["loggers"].items()}, moment
        assert {n: v for n, v in state["loggers"].items() if n in before["loggers"]} == before["loggers"], moment
    print(f"import spot_training + TrainingPipeline: {report['import_seconds']:.2f} s")
