"""The package's public names: static for type checkers, resolvable at run time, no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys

import aws_cdk as cdk
import pytest

import spot_training
from spot_training.cdk.checks import add_checks
from tests.conftest import ROOT

INIT = ROOT / "constructs" / "spot_training" / "__init__.py"


def test_every_export_is_declared_for_type_checkers_and_resolves():
    tree = ast.parse(INIT.read_text())
    guarded = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.If)
               for statement in node.body if isinstance(statement, ast.ImportFrom) for alias in statement.names}
    assert set(spot_training.__all__) == guarded == set(spot_training._EXPORTS)
    assert all(getattr(spot_training, name) is not None for name in spot_training.__all__)


@pytest.mark.parametrize("first", ["spot_training.cdk.validation", "spot_training.cdk.nag", "spot_training.cdk.pipeline"])
def test_modules_import_in_any_order_without_a_cycle(first):
    done = subprocess.run([sys.executable, "-c", f"import {first}; import spot_training.cdk.validation, "
                           "spot_training.cdk.nag, spot_training.cdk.pipeline"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_add_checks_takes_the_packs_to_run():
    app = cdk.App()
    add_checks(app, packs=["AwsSolutions"], definition_rules=False)
    with pytest.raises(ValueError, match=r"^packs: PCI.DSS unknown; allowed: AwsSolutions, NIST.800.53.R5, HIPAA.Security$"):
        add_checks(cdk.App(), packs=["PCI.DSS"])
