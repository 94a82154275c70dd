"""cdk-nag 3 registration: the packs and the pipeline-definition rules an app is checked against."""

from __future__ import annotations

from collections.abc import Sequence

import aws_cdk as cdk
import cdk_nag

from spot_training.cdk.validation import DefinitionValidationPlugin

PACKS = {"AwsSolutions": cdk_nag.AwsSolutionsChecks, "NIST.800.53.R5": cdk_nag.NIST80053R5Checks,
         "HIPAA.Security": cdk_nag.HIPAASecurityChecks}


def nag_packs(app: cdk.App, packs: Sequence[str] = tuple(PACKS)) -> list[cdk_nag.NagPack]:
    unknown = [p for p in packs if p not in PACKS]
    if unknown:
        raise ValueError(f"packs: {', '.join(unknown)} unknown; allowed: {', '.join(PACKS)}")
    return [PACKS[p](app) for p in packs]


def add_checks(app: cdk.App, *, packs: Sequence[str] = tuple(PACKS), definition_rules: bool = True) -> None:
    """Register the cdk-nag `packs` (@default all three: AwsSolutions, NIST.800.53.R5, HIPAA.Security) and the
    pipeline-definition rules for the app: any unacknowledged finding or definition violation fails
    `app.synth()`."""
    plugins = [*nag_packs(app, packs), *([DefinitionValidationPlugin()] if definition_rules else [])]
    cdk.Validations.of(app).add_plugins(*plugins)
