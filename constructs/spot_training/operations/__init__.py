"""Operations: what a person runs against a deployed pipeline. `runs` starts, watches and reports on
executions and `models` lists, compares, approves and rejects registered models, through boto3 clients passed
in (the command line is `spot_training.cli`); `errors` holds their one-line error.

May import `spot_training.config` and `spot_training.definition`; never the constructs.
"""
