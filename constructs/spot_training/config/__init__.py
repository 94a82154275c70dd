"""The settings and the facts they are checked against: `TrainingConfig` (`settings`), the instance types,
the sizing model and its prices, the VPC endpoints the platform needs, the S3 layout.

May import only the standard library and the trainer's memory planner: everything else in `spot_training`
builds on this.
"""
