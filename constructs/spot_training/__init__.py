"""SageMaker spot training platform: the L3 CDK construct, its building blocks and the operating CLI.

    from spot_training import TrainingPipeline, TrainingConfig, add_checks

Exports are resolved on first use, so the command-line tool does not start the CDK's JavaScript runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
    from spot_training.alarms import PipelineAlarms
    from spot_training.config import ConfigError, TeamConfig, TrainingConfig
    from spot_training.nag import add_checks
    from spot_training.network import TrainingNetwork, TrainingSecurityGroup
    from spot_training.pipeline import TrainingPipeline
    from spot_training.roles import TrainingRoles
    from spot_training.storage import ArtifactStore
    from spot_training.teams import TeamPipelines
    from spot_training.validation import DefinitionValidationPlugin

__version__ = "0.1.0"

_EXPORTS = {
    "TrainingPipeline": "spot_training.pipeline",
    "TrainingConfig": "spot_training.config",
    "TeamConfig": "spot_training.config",
    "ConfigError": "spot_training.config",
    "TrainingNetwork": "spot_training.network",
    "TrainingSecurityGroup": "spot_training.network",
    "ArtifactStore": "spot_training.storage",
    "TrainingRoles": "spot_training.roles",
    "PipelineAlarms": "spot_training.alarms",
    "TeamPipelines": "spot_training.teams",
    "DefinitionValidationPlugin": "spot_training.validation",
    "add_checks": "spot_training.nag",
}
__all__ = ["ArtifactStore", "ConfigError", "DefinitionValidationPlugin", "PipelineAlarms", "TeamConfig",
           "TeamPipelines", "TrainingConfig", "TrainingNetwork", "TrainingPipeline", "TrainingRoles",
           "TrainingSecurityGroup", "add_checks"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spot_training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
