from __future__ import annotations

import aws_cdk as cdk
from constructs import Construct

from spot_training.config.settings import TrainingConfig
from spot_training.cdk.network import TrainingNetwork


class NetworkingStack(cdk.Stack):
    """Isolated VPC, endpoints, security groups and flow logs for training."""

    def __init__(self, scope: Construct, id: str, *, config: TrainingConfig, **kwargs) -> None:
        super().__init__(scope, id, **kwargs)
        self.network = TrainingNetwork(self, "Network", az_count=config.az_count, cidr=config.vpc_cidr,
                                       flow_log_retention_days=config.log_retention_days,
                                       mlflow_endpoint=config.mlflow,
                                       sns_endpoint=config.capacity_ladder)
