"""The pipeline definition: what SageMaker runs. `build` generates it offline with the SageMaker Python SDK,
`rules` checks it (against botocore's shapes and the platform's guardrails), `trainer_code` packs the code
archive, and `container_entry` is the training container's first process, shipped in that archive.

May import `spot_training.config` and the SageMaker SDK; never the constructs, operations or the local run.
"""
