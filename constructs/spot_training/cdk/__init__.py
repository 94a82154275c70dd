"""The CDK constructs: what `cdk deploy` creates. The L3 `TrainingPipeline` (`pipeline`) and `TeamPipelines`
(`teams`), and the parts they are made of: network, storage, roles, alarms (with the monitor Lambda's code in
`monitor/`), the cdk-nag helpers (`nag`), their registration (`checks`) and the definition rules as a policy
validation plugin (`validation`).

May import `spot_training.config` and `spot_training.definition`; nothing outside this folder imports it but
the package's public API (`spot_training/__init__.py`) and the apps.
"""
