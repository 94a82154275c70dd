"""Team guardrails (own pipeline, own pipeline role, count cap) and the optional MLflow tracking server."""

from __future__ import annotations

import json

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2

from spot_training import TeamPipelines, TrainingPipeline
from spot_training.config.settings import ConfigError, TeamConfig, TrainingConfig
from tests.conftest import synth

TEAMS = {
    "nlp": {"instance_types": ["ml.p4d.24xlarge", "ml.p5.48xlarge"], "max_instance_count": 4,
            "max_run_seconds": 43200, "principals": ["arn:aws:iam::123456789012:role/nlp-scientists"]},
    "vision": {"instance_types": ["ml.g5.*"], "max_instance_count": 2, "max_run_seconds": 14400,
               "instance_type": "ml.g5.12xlarge"},
}


@pytest.fixture(scope="module")
def teams_app(tmp_path_factory):
    return synth(tmp_path_factory.getbasetemp(), teams=json.dumps(TEAMS))


def _pipelines(app):
    return {r["Properties"]["PipelineName"]: r for r in app.resources("pipeline", "AWS::SageMaker::Pipeline").values()}


def _body(pipeline):
    separator, parts = pipeline["Properties"]["PipelineDefinition"]["PipelineDefinitionBody"]["Fn::Join"]
    return json.loads(separator.join(p if isinstance(p, str) else "<token>" for p in parts))


def _create_condition(app, team_fragment):
    (policy,) = [r for k, r in app.resources("pipeline", "AWS::IAM::ManagedPolicy").items()
                 if team_fragment in k and "PipelinePolicy" in k]
    (statement,) = [s for s in policy["Properties"]["PolicyDocument"]["Statement"]
                    if s.get("Sid") == "CreateTrainingJobsInsideGuardrails"]
    return policy, statement["Condition"]


def test_each_team_gets_its_own_pipeline(teams_app):
    assert set(_pipelines(teams_app)) == {"distributed-training", "distributed-training-nlp",
                                          "distributed-training-vision"}


def test_each_team_pipeline_runs_as_its_own_role_with_its_instance_types_and_runtime(teams_app):
    pipelines = _pipelines(teams_app)
    roles = {name: json.dumps(p["Properties"]["RoleArn"]) for name, p in pipelines.items()}
    assert len(set(roles.values())) == 3
    _, nlp = _create_condition(teams_app, "TeamNlp")
    _, vision = _create_condition(teams_app, "TeamVision")
    assert nlp["ForAllValues:StringEquals"]["sagemaker:InstanceTypes"] == ["ml.p4d.24xlarge", "ml.p5.48xlarge"]
    assert nlp["NumericLessThanEquals"] == {"sagemaker:MaxRuntimeInSeconds": 43200}
    vision_types = vision["ForAllValues:StringEquals"]["sagemaker:InstanceTypes"]
    assert "ml.g5.12xlarge" in vision_types and all(t.startswith("ml.g5.") for t in vision_types)
    assert vision["NumericLessThanEquals"] == {"sagemaker:MaxRuntimeInSeconds": 14400}


def test_team_pipeline_refuses_a_run_above_its_instance_count_cap_before_any_job(teams_app):
    body = _body(_pipelines(teams_app)["distributed-training-vision"])
    (gate,) = body["Steps"]
    assert gate["Type"] == "Condition" and gate["Name"] == "CheckInstanceCount"
    (condition,) = gate["Arguments"]["Conditions"]
    assert condition == {"Type": "LessThanOrEqualTo", "LeftValue": {"Get": "Parameters.InstanceCount"},
                         "RightValue": 2}
    assert [s["Type"] for s in gate["Arguments"]["IfSteps"]] == ["Lambda", "Processing", "Training", "Processing",
                                                                "Condition"]  # refused: nothing runs
    (fail,) = gate["Arguments"]["ElseSteps"]
    assert fail["Type"] == "Fail"
    assert "above this pipeline's cap of 2 instances" in json.dumps(fail["Arguments"]["ErrorMessage"])
    training = gate["Arguments"]["IfSteps"][2]["Arguments"]
    assert training["StoppingCondition"]["MaxRuntimeInSeconds"] == 14400
    parameters = {p["Name"]: p["DefaultValue"] for p in body["Parameters"]}
    assert (parameters["InstanceType"], parameters["InstanceCount"]) == ("ml.g5.12xlarge", 2)


def test_main_pipeline_has_no_count_gate(teams_app):
    assert [s["Type"] for s in _body(_pipelines(teams_app)["distributed-training"])["Steps"]] == [
        "Lambda", "Processing", "Training", "Processing", "Condition"]


def test_team_principals_may_start_their_own_pipeline_only(teams_app):
    policies = [r["Properties"] for k, r in teams_app.resources("pipeline", "AWS::IAM::ManagedPolicy").items()
                if "StartPolicy" in k]
    (policy,) = policies
    assert policy["Roles"] == ["nlp-scientists"]
    statement, listing = policy["PolicyDocument"]["Statement"]
    assert "sagemaker:StartPipelineExecution" in statement["Action"]
    resources = json.dumps(statement["Resource"])
    assert ":pipeline/distributed-training-nlp" in resources and "vision" not in resources
    assert listing["Action"] == "s3:ListBucket"  # the data fingerprint of `spot-training start`; simulated in IAM


def test_team_outputs_name_their_pipelines(teams_app):
    outputs = teams_app.templates["pipeline"]["Outputs"]
    assert outputs["TeamNlpPipelineName"]["Value"] == "distributed-training-nlp"
    assert outputs["TeamVisionPipelineName"]["Value"] == "distributed-training-vision"


@pytest.mark.parametrize(("team", "message"), [
    ({**TEAMS["nlp"], "instance_type": "ml.g5.xlarge"}, "training.teams.nlp.instance_type=ml.g5.xlarge: not among "
                                                        "the team's instance_types (ml.p4d.24xlarge, ml.p5.48xlarge)"),
    ({**TEAMS["nlp"], "instance_count": 65}, "training.teams.nlp.instance_count=65: must be an integer from 0 to 64"),
    ({**TEAMS["nlp"], "instance_count": 5}, "training.teams.nlp.instance_count=5: above the team's "
                                            "max_instance_count (4)"),
    ({**TEAMS["nlp"], "max_run_seconds": 100000}, "training.teams.nlp.max_run_seconds=100000: above "
                                                  "training.max_wait_seconds (86400)"),
    ({**TEAMS["nlp"], "gpus": 8}, "training.teams.nlp.gpus: unknown team field"),
    ({"instance_types": ["ml.p4d.24xlarge"]}, "training.teams.nlp.max_instance_count: required"),
    ({**TEAMS["nlp"], "principals": ["nlp-scientists"]}, "training.teams.nlp.principals=nlp-scientists: must be a "
                                                         "list of IAM role ARNs"),
])
def test_team_defaults_or_settings_that_break_its_limits_are_refused(team, message):
    with pytest.raises(ConfigError) as caught:
        TrainingConfig.from_mapping({"teams": {"nlp": team}})
    assert str(caught.value).startswith(message)


@pytest.fixture(scope="module")
def mlflow_app(tmp_path_factory):
    return synth(tmp_path_factory.getbasetemp(), mlflow="true", network_isolation="false",
                 image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/train-with-mlflow:1")


def test_mlflow_adds_a_tracking_server_its_endpoint_and_the_trainer_hyperparameter(mlflow_app):
    (server,) = mlflow_app.resources("pipeline", "AWS::SageMaker::MlflowTrackingServer").values()
    assert server["Properties"]["TrackingServerName"] == "distributed-training-tracking"
    assert "/mlflow/" in json.dumps(server["Properties"]["ArtifactStoreUri"])
    endpoints = mlflow_app.resources("networking", "AWS::EC2::VPCEndpoint").values()
    assert any("experiments" in json.dumps(e["Properties"]["ServiceName"]) for e in endpoints)
    (pipeline,) = [p for p in _pipelines(mlflow_app).values()]
    body = json.dumps(pipeline["Properties"]["PipelineDefinition"]["PipelineDefinitionBody"])
    assert "mlflow_tracking_uri" in body and "TrackingServerArn" in body


def test_mlflow_with_network_isolation_is_refused_at_synth():
    with pytest.raises(ConfigError, match="training.mlflow=true: needs training.network_isolation=false"):
        TrainingConfig.from_mapping({"mlflow": True})


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "NLP"}, "TeamConfig.name='NLP': team name must be 1 to 20 lowercase letters"),
    ({"instance_types": "ml.g5.*"}, "TeamConfig.instance_types='ml.g5.*': must be a non-empty list"),
    ({"instance_types": ()}, "TeamConfig.instance_types=(): must be a non-empty list"),
    ({"instance_types": ("ml.zz.*",)}, "TeamConfig.instance_types: ml.zz.* is neither a SageMaker training"),
    ({"max_instance_count": "4"}, "TeamConfig.max_instance_count='4': must be an integer from 1 to 64"),
    ({"max_run_seconds": 30}, "TeamConfig.max_run_seconds=30: must be an integer from 60 to 2419200"),
    ({"principals": ("nlp-scientists",)}, "TeamConfig.principals=('nlp-scientists',): must be a list of IAM role"),
])
def test_a_team_built_in_python_is_validated_on_construction_naming_the_python_field(kwargs, message):
    with pytest.raises(ConfigError) as caught:
        TeamConfig(**{"name": "nlp", "instance_types": ("ml.g5.*",), "max_instance_count": 2,
                      "max_run_seconds": 3600, **kwargs})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def _isolated_stack(app: cdk.App, name: str) -> tuple[cdk.Stack, ec2.Vpc]:
    stack = cdk.Stack(app, name, env=cdk.Environment(region="eu-west-1"))
    vpc = ec2.Vpc(stack, "Vpc", nat_gateways=0, subnet_configuration=[
        ec2.SubnetConfiguration(name="iso", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)])
    return stack, vpc


PYTHON_TEAMS = (
    TeamConfig(name="speech", instance_types=("ml.g5.12xlarge", "ml.g5.24xlarge"), max_instance_count=2,
               max_run_seconds=7200, principals=("arn:aws:iam::111122223333:role/speech-scientists",)),
    TeamConfig(name="ranking-ml", instance_types=("ml.p4d.24xlarge",), max_instance_count=4, max_run_seconds=3600),
)


@pytest.fixture(scope="module")
def team_pipelines(tmp_path_factory):
    """Another team's app: a TrainingPipeline and TeamPipelines beside it, both built in Python."""
    app = cdk.App(outdir=str(tmp_path_factory.mktemp("team-pipelines")))
    stack, vpc = _isolated_stack(app, "Shared")
    shared = TrainingPipeline(stack, "Training", config=TrainingConfig(instance_type="ml.p4d.24xlarge",
                                                                         instance_count=2), vpc=vpc)
    teams = TeamPipelines(stack, "Teams", shared=shared, teams=PYTHON_TEAMS)
    return shared, teams, app.synth().get_stack_by_name("Shared").template


def test_team_pipelines_share_the_network_storage_and_execution_role_with_their_own_pipeline_roles(team_pipelines):
    shared, teams, template = team_pipelines
    assert set(teams.pipelines) == {"speech", "ranking-ml"}
    pipelines = {r["Properties"]["PipelineName"]: r for r in template["Resources"].values()
                 if r["Type"] == "AWS::SageMaker::Pipeline"}
    assert set(pipelines) == {"distributed-training", "distributed-training-speech", "distributed-training-ranking-ml"}
    assert len({json.dumps(p["Properties"]["RoleArn"]) for p in pipelines.values()}) == 3
    for team in teams.pipelines.values():
        assert team.training_role is shared.training_role and team.bucket is shared.bucket
        assert team.security_group is shared.security_group and team.subnets == shared.subnets
        assert team.pipeline_role is not shared.pipeline_role
    speech = teams.pipelines["speech"].config
    assert (speech.instance_type, speech.instance_count, speech.max_run_seconds) == ("ml.g5.12xlarge", 2, 7200)
    assert teams.pipelines["ranking-ml"].config.instance_type == "ml.p4d.24xlarge"


def test_team_pipelines_let_each_teams_principals_start_their_own_pipeline_only(team_pipelines):
    _, _, template = team_pipelines
    starts = [r for r in template["Resources"].values() if r["Type"] == "AWS::IAM::ManagedPolicy"
              and "sagemaker:StartPipelineExecution" in json.dumps(r)]
    (speech,) = starts
    assert speech["Properties"]["Roles"] == ["speech-scientists"]
    assert "pipeline/distributed-training-speech" in json.dumps(speech["Properties"]["PolicyDocument"])
    outputs = {k: o["Value"] for k, o in template["Outputs"].items() if k.startswith("TeamsTeam")}
    assert sorted(outputs.values()) == ["distributed-training-ranking-ml", "distributed-training-speech"]


@pytest.mark.parametrize("teams, message", [
    ((), "teams=(): must be a non-empty list of TeamConfig"),
    ((PYTHON_TEAMS[0], PYTHON_TEAMS[0]), "teams: team names must be unique, got speech, speech"),
    ((TeamConfig(name="big", instance_types=("ml.g5.*",), max_instance_count=1, max_run_seconds=3600,
                 instance_count=2),), "TrainingConfig.teams.big.instance_count=2: above the team's "
                                      "max_instance_count (1)"),
])
def test_team_pipelines_refuse_no_teams_duplicates_and_a_team_beyond_its_limits(teams, message):
    app = cdk.App()
    stack, vpc = _isolated_stack(app, "S")
    shared = TrainingPipeline(stack, "Training", config=TrainingConfig(), vpc=vpc, alarms=False)
    with pytest.raises(ConfigError) as caught:
        TeamPipelines(stack, "Teams", shared=shared, teams=teams)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
