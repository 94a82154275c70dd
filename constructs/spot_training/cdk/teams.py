"""Teams beside a shared pipeline: each team its own pipeline and pipeline role within its own limits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from constructs import Construct

from spot_training.config.settings import ConfigError, TeamConfig
from spot_training.cdk.pipeline import TrainingPipeline


class TeamPipelines(Construct):
    """One `TrainingPipeline` per team, sharing `shared`'s VPC, subnets, security group, bucket, key and
    execution role. Each team's pipeline runs as a pipeline role of its own whose guarded CreateTrainingJob
    allows only the team's instance types, instance count and runtime; the team's principals get a managed
    policy to start that pipeline and no other.

        training = TrainingPipeline(stack, "Training", config=config, vpc=vpc)
        teams = TeamPipelines(stack, "Teams", shared=training, teams=[
            TeamConfig(name="nlp", instance_types=("ml.p4d.24xlarge",), max_instance_count=4,
                       max_run_seconds=43200, principals=("arn:aws:iam::111122223333:role/nlp",))])
        teams.pipelines["nlp"].pipeline_name   # "<config.pipeline_name>-nlp"
    """

    def __init__(self, scope: Construct, id: str, *, shared: TrainingPipeline, teams: Sequence[TeamConfig],
                 trainer_source_dir: str | Path | None = None,
                 hyperparameters: Mapping[str, str | int | float | bool] | None = None,
                 environment: Mapping[str, str] | None = None, outputs: bool = True) -> None:
        """
        :param shared: the pipeline whose network, storage and execution role the teams share; each team's
            config is `shared.config.for_team(team)` (its defaults, within the team's limits).
        :param teams: at least one `TeamConfig`, names unique.
        :param trainer_source_dir: the teams' trainer code folder (@default - the trainer shipped with this
            package); `hyperparameters` and `environment` as in `TrainingPipeline`.
        :param outputs: a `Team<Name>PipelineName` stack output per team (@default True).
        """
        super().__init__(scope, id)
        teams = tuple(teams) if isinstance(teams, (list, tuple)) else teams
        if not isinstance(teams, tuple) or not teams or not all(isinstance(t, TeamConfig) for t in teams):
            raise ConfigError(f"teams={teams!r}: must be a non-empty list of TeamConfig")
        names = [team.name for team in teams]
        if len(set(names)) != len(names):
            raise ConfigError(f"teams: team names must be unique, got {', '.join(names)}")
        self.pipelines: dict[str, TrainingPipeline] = {}
        for team in teams:
            name = "".join(part.capitalize() for part in team.name.split("-"))
            # The execution role is shared and already granted (by `shared`, or by whoever granted it there);
            # the team's pipeline role is created and granted by its TrainingPipeline.
            pipeline = TrainingPipeline(
                self, f"Team{name}", config=shared.config.for_team(team), vpc=shared.vpc, subnets=shared.subnets,
                security_group=shared.security_group, bucket=shared.bucket, key=shared.key,
                training_role=shared.training_role, grant_roles=False, trainer_source_dir=trainer_source_dir,
                hyperparameters=hyperparameters, environment=environment,
                endpoint_security_group=shared.endpoint_security_group, run_identity=shared.run_identity)
            if team.principals:
                roles = [iam.Role.from_role_arn(self, f"Team{name}Principal{i}", arn, mutable=False)
                         for i, arn in enumerate(team.principals)]
                pipeline.start_execution_policy("StartPolicy", roles)
            if outputs:
                cdk.CfnOutput(self, f"Team{name}PipelineName", value=pipeline.pipeline_name,
                              description=f"Pipeline of team {team.name}")
            self.pipelines[team.name] = pipeline
