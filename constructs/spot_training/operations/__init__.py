"""Operations: what a person runs against a deployed pipeline. `runs` starts, watches and reports on
executions through boto3 clients passed in (the command line is `spot_training.cli`).

May import `spot_training.config` and `spot_training.definition`; never the constructs.
"""
