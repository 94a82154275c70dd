"""Evaluate, gate and register: the steps the definition adds after training, the evaluation script on real
tiny models (a worse model included), and the gate as Pipelines evaluates it on the script's file."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spot_training.config.settings import ConfigError, TrainingConfig
from spot_training.definition import build as sdk
from spot_training.definition.rules import Expectations, all_steps, check, evaluate_conditions, resolve
from spot_training.definition.trainer_code import load_metric_definitions
from tests.conftest import ROOT, pipeline_body

EXPECT = Expectations(use_spot=True, network_isolation=True, inter_container_encryption=True, volume_encryption=False,
                      preparation_volume_encryption=True, evaluation_volume_encryption=False)


def generate(config: TrainingConfig, **kwargs) -> dict:
    return sdk.generate(config, metric_definitions=load_metric_definitions(ROOT / "trainer"),
                        placeholders=sdk.Placeholders.for_counts(2, 1), **kwargs)


@pytest.fixture(scope="module")
def steps(default_app):
    return {s["Name"]: s for s in all_steps(pipeline_body(default_app))}


def test_evaluation_runs_isolated_in_the_training_subnets_on_the_trained_model(steps):
    args, train = steps["Evaluate"]["Arguments"], steps["Train"]["Arguments"]
    network = args["NetworkConfig"]
    assert network["EnableNetworkIsolation"] is True and network["EnableInterContainerTrafficEncryption"] is True
    assert network["VpcConfig"] == {"SecurityGroupIds": train["VpcConfig"]["SecurityGroupIds"],
                                    "Subnets": train["VpcConfig"]["Subnets"]}
    cluster = args["ProcessingResources"]["ClusterConfig"]
    assert cluster["InstanceType"] == "ml.g5.2xlarge" and "VolumeKmsKeyId" not in cluster  # local NVMe
    assert cluster["VolumeSizeInGB"] == 100  # its own setting: two models and the data, not the training volume
    assert args["ProcessingOutputConfig"]["KmsKeyId"] == train["OutputDataConfig"]["KmsKeyId"]
    assert args["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200}
    inputs = {i["InputName"]: i["S3Input"]["S3Uri"] for i in args["ProcessingInputs"]}
    assert inputs["base"] == {"Get": "Parameters.BaseModelUri"}
    assert inputs["model"] == {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}
    prepared = "Steps.PrepareData.ProcessingOutputConfig.Outputs['prepared'].S3Output.S3Uri"
    assert inputs["data"] == {"Std:Join": {"On": "/", "Values": [{"Get": prepared}, "train", ""]}}
    arguments = args["AppSpecification"]["ContainerArguments"]
    assert arguments[arguments.index("--holdout_fraction") + 1] == "0.02"
    assert "python3 /tmp/prepare-code/evaluate.py" in args["AppSpecification"]["ContainerEntrypoint"][2]
    assert steps["Evaluate"]["PropertyFiles"] == [{"PropertyFileName": "EvaluationReport", "OutputName": "evaluation",
                                                   "FilePath": "evaluation.json"}]


def test_the_gate_registers_only_a_model_that_beats_its_base_by_the_margin(steps):
    (condition,) = steps["CheckEvaluation"]["Arguments"]["Conditions"]
    report = {"Get": "Steps.Evaluate.PropertyFiles.EvaluationReport"}
    assert condition == {"Type": "GreaterThan", "LeftValue": {"Std:JsonGet": {"PropertyFile": report,
                                                                              "Path": "improvement"}},
                         "RightValue": {"Get": "Parameters.EvaluationMinImprovement"}}
    assert [s["Name"] for s in steps["CheckEvaluation"]["Arguments"]["IfSteps"]] == ["Register-RegisterModel"]
    message = json.dumps(steps["RefuseModelNotBetterThanBase"]["Arguments"]["ErrorMessage"])
    assert "metrics.fine_tuned.loss" in message and "metrics.base.loss" in message


def test_the_registration_is_pending_with_metrics_lineage_and_the_uncompressed_model(steps, default_app):
    args = steps["Register-RegisterModel"]["Arguments"]
    assert args["ModelApprovalStatus"] == "PendingManualApproval"
    assert args["ModelPackageGroupName"] == "distributed-training-models"
    (container,) = args["InferenceSpecification"]["Containers"]
    assert container["ModelDataSource"]["S3DataSource"] == {
        "S3Uri": {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}, "S3DataType": "S3Prefix",
        "CompressionType": "None"}
    assert container["Image"].endswith("/huggingface-pytorch-inference:2.6.0-transformers4.51.3-gpu-py312-cu124-"
                                       "ubuntu22.04")
    # The serving image's PyTorch (the training image runs 2.8.0).
    assert (container.get("Framework"), container.get("FrameworkVersion")) == ("PYTORCH", "2.6.0")
    assert set(args["CustomerMetadataProperties"]) == {
        "base_model", "data_fingerprint", "trainer_code", "training_image", "training_job", "method",
        "pipeline_execution", "training_seconds", "billable_seconds"}
    assert "evaluation" in json.dumps(args["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"])
    (group,) = default_app.resources("pipeline", "AWS::SageMaker::ModelPackageGroup").values()
    assert group["DeletionPolicy"] == "Retain" and group["UpdateReplacePolicy"] == "Retain"
    assert group["Properties"]["ModelPackageGroupName"] == "distributed-training-models"


def test_the_definition_rules_pass_and_catch_a_registration_that_approves_itself():
    definition = generate(TrainingConfig(region="us-east-1"))
    assert check(definition, EXPECT) == []
    register = next(s for s in all_steps(definition) if s["Type"] == "RegisterModel")
    register["Arguments"]["ModelApprovalStatus"] = "Approved"
    assert [str(v) for v in check(definition, EXPECT)] == [
        "Steps[Register-RegisterModel].Arguments.ModelApprovalStatus: is 'Approved': a pipeline registers "
        "PendingManualApproval only; a reviewer approves"]
    assert [str(v) for v in check(generate(TrainingConfig(region="us-east-1"), evaluation=False), EXPECT)] == [
        "Steps: no Evaluate step and registration (the evaluation is configured)"]
    # The evaluation is a Processing step too: it does not stand in for a missing preparation.
    unprepared = generate(TrainingConfig(region="us-east-1", prepare_data=False))
    assert [str(v) for v in check(unprepared, EXPECT)] == [
        "Steps: no PrepareData Processing step (the data preparation is configured)"]


def test_a_validation_channel_is_what_the_evaluation_reads():
    definition = generate(TrainingConfig(region="us-east-1", validation_data=True))
    args = next(s for s in all_steps(definition) if s["Name"] == "Evaluate")["Arguments"]
    data = next(i for i in args["ProcessingInputs"] if i["InputName"] == "data")["S3Input"]["S3Uri"]
    assert data["Std:Join"]["Values"][1] == "validation"
    arguments = args["AppSpecification"]["ContainerArguments"]
    assert arguments[arguments.index("--holdout_fraction") + 1] == "0"


def test_a_custom_trainer_or_evaluate_model_false_ends_the_pipeline_at_the_model():
    for definition in (generate(TrainingConfig(region="us-east-1"), hyperparameters={"epochs": 1}),
                       generate(TrainingConfig(region="us-east-1", evaluate_model=False))):
        assert [s["Name"] for s in all_steps(definition)] == ["ResolveRun", "PrepareData", "Train"]
        assert "EvaluationMinImprovement" not in {p["Name"] for p in definition["Parameters"]}


@pytest.mark.parametrize("field, value, message", [
    ("evaluation_instance_type", "ml.x9.huge", "training.evaluation_instance_type=ml.x9.huge: not an instance type "
     "SageMaker offers for processing (botocore ProcessingInstanceType)"),
    ("inference_instance_type", "ml.x9.huge", "training.inference_instance_type=ml.x9.huge: not an instance type "
     "SageMaker offers for real-time inference (botocore ProductionVariantInstanceType)"),
    ("model_package_group", "-bad-", "training.model_package_group=-bad-: must be 1 to 63 letters, digits and "
     "hyphens, not starting or ending with a hyphen, or empty"),
])
def test_bad_evaluation_settings_are_refused_in_one_line(field, value, message):
    with pytest.raises(ConfigError) as raised:
        TrainingConfig.from_context({"training": {"region": "us-east-1", field: value}})
    assert str(raised.value).startswith(message)


def test_each_team_registers_in_its_own_group_and_a_name_over_63_characters_is_refused():
    from spot_training.config.settings import TeamConfig

    team = TeamConfig(name="nlp", instance_types=("ml.p4d.24xlarge",), max_instance_count=2, max_run_seconds=3600)
    other = dataclasses.replace(team, name="vision")
    for group, names in (("", ["distributed-training-nlp-models", "distributed-training-vision-models"]),
                         ("shared", ["shared-nlp", "shared-vision"])):
        config = TrainingConfig(model_package_group=group, teams=(team, other))
        assert [config.for_team(t).model_package_group_name for t in (team, other)] == names
    with pytest.raises(ConfigError) as raised:
        TrainingConfig.from_context({"training": {"region": "us-east-1", "pipeline_name": "p" * 48,
                                                  "model_package_group": "g" * 60,
                                                  "teams": {"vision": {"instance_types": ["ml.p4d.24xlarge"],
                                                                       "max_instance_count": 2,
                                                                       "max_run_seconds": 3600}}}})
    assert str(raised.value) == (f"training.teams.vision.name=vision: the team's model package group {'g' * 60}-vision "
                                 "is 67 characters, SageMaker allows at most 63; use a shorter team name or "
                                 "model_package_group")
    # Without evaluation nothing is registered, so no group name needs to fit.
    TrainingConfig(model_package_group="g" * 60, evaluate_model=False,
                   teams=(dataclasses.replace(team, name="vision"),))


def test_the_steps_use_the_trainers_own_holdout_and_seed():
    sys.path.insert(0, str(ROOT / "trainer"))
    try:
        from settings import TrainSettings
    finally:
        sys.path.remove(str(ROOT / "trainer"))
    fields = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    assert (fields["validation_holdout_fraction"], fields["seed"]) == (sdk.TRAINER_HOLDOUT_FRACTION, sdk.TRAINER_SEED)


# ---- the evaluation script on real models -------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama base with real weights, and a better one: the same weights after a few optimizer steps on the
    evaluation text itself (what fine-tuning on in-domain data does, quickly)."""
    import torch
    from transformers import AutoModelForCausalLM

    from spot_training.local.tiny import corpus, make_llama_model_dir, make_model_dir, make_text_channel

    root = tmp_path_factory.mktemp("evaluation")
    texts = corpus(200)
    tokenizer = make_model_dir(root / "tokenizer", text_corpus=texts)
    base = make_llama_model_dir(root / "base", tokenizer_dir=tokenizer)
    data = make_text_channel(root / "data", texts[:60])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(base)(" ".join(texts[:60]))["input_ids"][:33 * 16]]).view(16, 33)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids[:, :-1]).logits.reshape(-1, model.config.vocab_size),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned = root / "tuned"
    model.save_pretrained(tuned)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tuned / name).write_bytes((base / name).read_bytes())
    return {"base": base, "tuned": tuned, "data": data, "root": root}


def run_evaluation(base: Path, model: Path, data: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "trainer" / "evaluate.py"), "--base_model_dir", str(base),
                           "--model_dir", str(model), "--data_dir", str(data), "--sequence_length", "32",
                           "--holdout_fraction", "0", "--data_fingerprint", "abc", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=300, env={"PREPARE_EXIT_MESSAGE": str(out / "msg"),
                                                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "evaluation.json").read_text())


def gate(report: dict, margin: float = 0.0) -> tuple[bool, str]:
    """The default definition's gate, resolved as Pipelines would with this property file."""
    definition = generate(TrainingConfig(region="us-east-1"))
    for parameter in definition["Parameters"]:
        if parameter["Name"] == "EvaluationMinImprovement":
            parameter["DefaultValue"] = margin
    steps = {s["Name"]: s for s in all_steps(resolve(definition, property_files={
        "Steps.Evaluate.PropertyFiles.EvaluationReport": report}))}
    return (evaluate_conditions(steps["CheckEvaluation"]["Arguments"]["Conditions"]),
            steps["RefuseModelNotBetterThanBase"]["Arguments"]["ErrorMessage"])


def test_local_runs_resolve_only_the_branch_the_gate_takes():
    """A JsonGet in the branch not taken is never read: a report without the losses the FailStep's message
    quotes still registers when the gate passes, as in Pipelines (resolving every step would fail on it)."""
    from spot_training.definition.rules import PropertyFileError
    from spot_training.local.evaluation import gate_branch, training_properties

    definition = generate(TrainingConfig(region="us-east-1"))
    properties = training_properties("s3://b/outputs/x/output/model/", 60)
    report = {"improvement": 0.5, "metrics": {"fine_tuned": {"loss": 1.0}}}
    with pytest.raises(PropertyFileError):
        resolve(definition, properties=properties, property_files={
            "Steps.Evaluate.PropertyFiles.EvaluationReport": report})
    passed, resolved = gate_branch(definition, {}, properties, report)
    names = [s["Name"] for s in all_steps(resolved)]
    assert passed is True and "Register-RegisterModel" in names and "RefuseModelNotBetterThanBase" not in names
    passed, resolved = gate_branch(definition, {}, properties, {**report, "improvement": -0.1,
                                                                 "metrics": {"base": {"loss": 0.9}, "fine_tuned": {"loss": 1.0}}})
    assert passed is False and "Register-RegisterModel" not in [s["Name"] for s in all_steps(resolved)]


def test_a_better_model_passes_the_gate_and_a_worse_one_stops_there_with_both_losses(models):
    """The real script on real weights: the tuned model beats its base; with the two swapped (the "fine-tuned"
    model is now the worse one) the improvement is exactly the negative and the gate's FailStep names both."""
    better = run_evaluation(models["base"], models["tuned"], models["data"], models["root"] / "better")
    worse = run_evaluation(models["tuned"], models["base"], models["data"], models["root"] / "worse")
    assert better["improvement"] > 0.1
    assert worse["metrics"]["fine_tuned"] == better["metrics"]["base"]
    assert worse["improvement"] == -better["improvement"]
    assert better["tokens"] == better["sequences"] * 32 and better["data"] == {"source": "the validation channel",
                                                                                "fingerprint": "abc"}
    assert gate(better)[0] is True
    assert gate(better, margin=better["improvement"] + 0.01)[0] is False
    passed, message = gate(worse)
    assert passed is False
    assert message == (f"the fine-tuned model's validation loss {worse['metrics']['fine_tuned']['loss']} is not below "
                       f"the base model's {worse['metrics']['base']['loss']} by more than EvaluationMinImprovement=0.0; "
                       "nothing was registered")


def test_the_loss_is_the_token_weighted_mean_the_model_computes_itself(models):
    """evaluate.py's figure is Hugging Face's own mean next-token loss over the same blocks (one batch of all)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = run_evaluation(models["base"], models["tuned"], models["data"], models["root"] / "again")
    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    ids = []
    for line in (models["data"] / "part-000.jsonl").read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = torch.from_numpy(np.asarray(ids[:len(ids) // 33 * 33], dtype=np.int64).reshape(-1, 33))
    model = AutoModelForCausalLM.from_pretrained(models["tuned"], dtype=torch.float32).eval()
    with torch.no_grad():
        # Hugging Face shifts the labels itself: positions 0..31 of each 33-token block predict tokens 1..32, as in
        # evaluate.py (causal attention: the 33rd input changes none of those logits).
        expected = model(input_ids=blocks, labels=blocks).loss
    assert report["sequences"] == len(blocks)
    assert report["metrics"]["fine_tuned"]["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_the_loss_in_chunks_of_positions_is_the_loss_of_the_whole_sequence(models, monkeypatch):
    """The fp32 cast happens LOSS_CHUNK_TOKENS positions at a time (memory); chunks of 5 over 32 positions, with
    a batch of 3 over blocks that do not divide by it, sum to the same token-weighted mean."""
    import torch

    sys.path.insert(0, str(ROOT / "trainer"))
    try:
        import evaluate
    finally:
        sys.path.remove(str(ROOT / "trainer"))
    device = torch.device("cpu")
    blocks, _ = evaluate.evaluation_blocks(str(models["data"]), str(models["base"]), 32, 0.0, 0, 1234)
    model = evaluate.load_model(str(models["tuned"]), 1234, device)
    whole, tokens = evaluate.mean_loss(model, blocks, 1, device)
    monkeypatch.setattr(evaluate, "LOSS_CHUNK_TOKENS", 5)
    chunked, same = evaluate.mean_loss(model, blocks, 3, device)
    assert same == tokens == blocks.num_blocks * 32 and chunked == pytest.approx(whole, rel=1e-6)


def test_an_unreadable_model_stops_the_evaluation_in_one_line(models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in models["tuned"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    done = subprocess.run([sys.executable, str(ROOT / "trainer" / "evaluate.py"), "--base_model_dir", str(models["base"]),
                           "--model_dir", str(broken), "--data_dir", str(models["data"]), "--sequence_length", "32",
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={"PREPARE_EXIT_MESSAGE": str(tmp_path / "message"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")
    assert (tmp_path / "message").read_text() == done.stderr.strip()


def test_bad_input_stops_the_evaluation_in_one_line(models, tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "trainer" / "evaluate.py"), "--base_model_dir", str(models["base"]),
                           "--model_dir", str(models["tuned"]), "--data_dir", str(tmp_path / "empty"),
                           "--sequence_length", "32", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env={"PREPARE_EXIT_MESSAGE": str(tmp_path / "message"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {tmp_path / 'empty'}: no prepared shards (manifest.json), *.jsonl or *.npy files"
    assert (tmp_path / "message").read_text() == done.stderr.strip()
    assert not (tmp_path / "out").exists()


def test_compare_with_approved_adds_a_limit_from_the_latest_approved_model():
    definition = generate(TrainingConfig(region="us-east-1", compare_with_approved=True))
    parameters = {p["Name"]: p["DefaultValue"] for p in definition["Parameters"]}
    assert parameters["ApprovedModelLoss"] == 1e9  # none known: no limit
    report = {"metrics": {"base": {"loss": 2.5}, "fine_tuned": {"loss": 2.2}}, "improvement": 0.3}

    def decide(approved: float) -> tuple[bool, str]:
        copy = json.loads(json.dumps(definition))
        for parameter in copy["Parameters"]:
            if parameter["Name"] == "ApprovedModelLoss":
                parameter["DefaultValue"] = approved
        steps = {s["Name"]: s for s in all_steps(resolve(copy, property_files={
            "Steps.Evaluate.PropertyFiles.EvaluationReport": report}))}
        return (evaluate_conditions(steps["CheckEvaluation"]["Arguments"]["Conditions"]),
                steps["RefuseModelNotBetterThanBase"]["Arguments"]["ErrorMessage"])

    assert decide(1e9)[0] is True and decide(2.2)[0] is True
    passed, message = decide(2.1)  # better than its base, worse than what is approved
    assert passed is False
    assert message == ("the fine-tuned model's validation loss 2.2 is not below the base model's 2.5 by more than "
                       "EvaluationMinImprovement=0.0, or is above the latest approved model's ApprovedModelLoss=2.1; "
                       "nothing was registered")
    assert check(definition, EXPECT) == []
