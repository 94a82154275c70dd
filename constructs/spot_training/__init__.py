"""SageMaker spot training platform: the L3 CDK construct, its building blocks and the operating CLI.

    from spot_training import TrainingPipeline, TrainingConfig, add_checks

Exports are resolved on first use, so the command-line tool does not start the CDK's JavaScript runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
    from spot_training.cdk.alarms import PipelineAlarms
    from spot_training.config.settings import ConfigError, TeamConfig, TrainingConfig
    from spot_training.cdk.checks import add_checks
    from spot_training.cdk.network import TrainingNetwork, TrainingSecurityGroup
    from spot_training.cdk.pipeline import TrainingPipeline
    from spot_training.cdk.roles import TrainingRoles
    from spot_training.cdk.storage import ArtifactStore
    from spot_training.cdk.teams import TeamPipelines
    from spot_training.cdk.validation import DefinitionValidationPlugin

__version__ = "0.1.0"

_EXPORTS = {
    "TrainingPipeline": "spot_training.cdk.pipeline",
    "TrainingConfig": "spot_training.config.settings",
    "TeamConfig": "spot_training.config.settings",
    "ConfigError": "spot_training.config.settings",
    "TrainingNetwork": "spot_training.cdk.network",
    "TrainingSecurityGroup": "spot_training.cdk.network",
    "ArtifactStore": "spot_training.cdk.storage",
    "TrainingRoles": "spot_training.cdk.roles",
    "PipelineAlarms": "spot_training.cdk.alarms",
    "TeamPipelines": "spot_training.cdk.teams",
    "DefinitionValidationPlugin": "spot_training.cdk.validation",
    "add_checks": "spot_training.cdk.checks",
}
__all__ = ["ArtifactStore", "ConfigError", "DefinitionValidationPlugin", "PipelineAlarms", "TeamConfig",
           "TeamPipelines", "TrainingConfig", "TrainingNetwork", "TrainingPipeline", "TrainingRoles",
           "TrainingSecurityGroup", "add_checks"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spot_training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
