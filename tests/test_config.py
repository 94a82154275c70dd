"""Configuration: every bad value is refused with one line naming the field, the value and what is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spot_training.config.settings import ConfigError, TrainingConfig
from tests.conftest import ROOT, cdk_json_context


def parse(**overrides):
    context = {**cdk_json_context(), **{f"training.{k}": v for k, v in overrides.items()}}
    return TrainingConfig.from_context(context)


def test_cdk_json_gives_the_documented_defaults():
    config = parse()
    assert (config.instance_type, config.instance_count, config.use_spot) == ("ml.p4d.24xlarge", 2, True)
    assert config.max_run_seconds <= config.max_wait_seconds


def test_command_line_strings_are_parsed_into_typed_values():
    config = parse(instance_count="4", use_spot="false", learning_rate="3e-4",
                   allowed_instance_types="ml.p4d.24xlarge, ml.p5.48xlarge")
    assert config.instance_count == 4 and config.use_spot is False and config.learning_rate == 3e-4
    assert config.allowed_instance_types == ("ml.p4d.24xlarge", "ml.p5.48xlarge")


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        parse().instance_count = 3


@pytest.mark.parametrize(("overrides", "message"), [
    ({"instance_count": "two"}, "training.instance_count=two: must be an integer from 1 to 64"),
    ({"instance_count": 0}, "training.instance_count=0: must be from 1 to 64"),
    ({"instance_count": 2.5}, "training.instance_count=2.5: must be an integer from 1 to 64"),
    ({"use_spot": "maybe"}, "training.use_spot=maybe: must be true or false"),
    ({"max_run_seconds": 30}, "training.max_run_seconds=30: must be from 60 to 2419200"),
    ({"max_run_seconds": 3_000_000}, "training.max_run_seconds=3000000: must be from 60 to 2419200"),
    ({"instance_cout": 3}, "training.instance_cout=3: unknown field (did you mean instance_count?); allowed: "),
    ({"max_wait_seconds": 3600}, "training.max_wait_seconds=3600: must be >= training.max_run_seconds "
                                 "(43200) when training.use_spot=true"),
    ({"instance_type": "ml.p9.huge"}, "training.instance_type=ml.p9.huge: not an instance type SageMaker offers "
                                      "for training (botocore TrainingInstanceType)"),
    ({"instance_type": "ml.m5.xlarge"}, "training.instance_type=ml.m5.xlarge: has no NVIDIA GPU, so it cannot run "
                                        "distributed GPU training; use a GPU type such as ml.p4d.24xlarge, "
                                        "ml.p5.48xlarge or ml.g5.12xlarge, or set training.require_gpu=false"),
    ({"allowed_instance_types": "ml.p5.48xlarge"}, "training.allowed_instance_types=ml.p5.48xlarge: must include "
                                                   "training.instance_type (ml.p4d.24xlarge)"),
    ({"allowed_instance_types": "ml.p4d.24xlarge,ml.t3.nano"},
     "training.allowed_instance_types[1]=ml.t3.nano: not an instance type SageMaker offers for training"),
    ({"strategy": "zero3"}, "training.strategy=zero3: must be one of auto, ddp, fsdp"),
    ({"data_format": "sharegpt"}, "training.data_format=sharegpt: must be one of auto, text, chat, prompt_completion"),
    ({"data_format": "chat", "prepare_data": "false"}, "training.data_format=chat: needs training.prepare_data=true"),
    ({"data_max_truncated_fraction": 2}, "training.data_max_truncated_fraction=2.0: must be from 0.0 to 1.0"),
    ({"capacity_ladder": "true", "use_spot": "false"}, "training.capacity_ladder=true: needs training.use_spot=true"),
    ({"learning_rate": "nan"}, "training.learning_rate=nan: must be a finite number above 0.0 to 1.0"),
    ({"learning_rate": float("nan")}, "training.learning_rate=nan: must be a finite number above 0.0 to 1.0"),
    ({"slo_hours": "inf"}, "training.slo_hours=inf: must be a finite number above 0.0 to 8760.0"),
    ({"checkpoint_save_seconds": "-inf"},
     "training.checkpoint_save_seconds=-inf: must be a finite number from 0.0 to 3600.0"),
    ({"log_retention_days": 42}, "training.log_retention_days=42: must be one of 1, 3, 5, 7, 14, 30, 60"),
    ({"region": "Mars"}, "training.region=Mars: must be an AWS region such as us-east-1"),
    ({"learning_rate": 0}, "training.learning_rate=0.0: must be above 0.0 to 1.0"),
    ({"az_count": 1}, "training.az_count=1: must be from 2 to 6"),
    ({"pipeline_name": "has_underscore"}, "training.pipeline_name=has_underscore: must be 1 to 48 letters, "
                                          "digits and hyphens, starting with a letter"),
    ({"alarm_email": "nope"}, "training.alarm_email=nope: must be an e-mail address, or empty"),
    ({"guardrails": "maybe"}, "training.guardrails=maybe: must be one of warn, refuse, off"),
    ({"image_uri": "my-image:latest"}, "training.image_uri=my-image:latest: must be an ECR image URI "
                                       "<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>, or empty"),
])
def test_bad_values_are_refused_with_one_line_naming_field_value_and_rule(overrides, message):
    with pytest.raises(ConfigError) as caught:
        parse(**overrides)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_spot_off_lifts_the_max_wait_rule():
    assert parse(use_spot="false", max_wait_seconds=3600).max_wait_seconds == 3600


def test_cpu_types_are_allowed_when_gpu_is_not_required():
    assert parse(instance_type="ml.m5.xlarge", require_gpu="false").instance_type == "ml.m5.xlarge"


def test_training_context_must_be_an_object():
    with pytest.raises(ConfigError, match="training=3: must be an object of settings"):
        TrainingConfig.from_context({"training": 3})


def _run_app(overrides: dict[str, str]) -> subprocess.CompletedProcess:
    """`app.py` as `cdk synth` runs it, with cdk.json's context plus `overrides` (it must stop before writing)."""
    context = {**cdk_json_context(), **overrides}
    env = {**os.environ, "CDK_CONTEXT_JSON": json.dumps(context), "CDK_OUTDIR": "/tmp/never-written"}
    return subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_synth_with_a_bad_value_exits_nonzero_with_one_line_and_no_traceback():
    done = _run_app({"training.max_wait_seconds": "60"})
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: training.max_wait_seconds=60: must be >= training.max_run_seconds "
                                   "(43200) when training.use_spot=true")
    assert "Traceback" not in done.stdout + done.stderr


def test_defaults_pass_the_sizing_guardrails():
    assert parse().guardrail_findings() == []


@pytest.mark.parametrize(("overrides", "finding"), [
    ({"checkpoint_interval_minutes": 30}, "checkpoint_interval_minutes=30 can lose up to 30 minutes of work per "
                                          "interruption, more than max_lost_work_minutes=10"),
    ({"retry_attempts": 5}, "retry_attempts=5 x expected_run_hours=6 = 30 h exceeds slo_hours=24"),
    ({"expected_run_hours": 11, "max_wait_seconds": 43200}, "max_wait_seconds=43200 does not cover the "
                                                             "90th-percentile completion time with interruptions"),
    ({"expected_run_hours": 11.9}, "max_run_seconds=43200 does not cover the 90th-percentile training time"),
])
def test_guardrails_find_limits_the_sizing_model_says_will_not_hold(overrides, finding):
    findings = parse(**overrides).guardrail_findings()
    assert any(f.startswith(finding) for f in findings), findings


def test_guardrails_refuse_stops_synth_with_one_line_per_finding():
    done = _run_app({"training.guardrails": "refuse", "training.retry_attempts": "5"})
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: guardrail: retry_attempts=5 x expected_run_hours=6 = 30 h exceeds "
                                   "slo_hours=24 (training.guardrails=refuse)")


def test_guardrails_warn_annotates_the_pipeline_stack(tmp_path_factory):
    import aws_cdk as cdk

    from app import build_app

    context = {**cdk_json_context(), "training.retry_attempts": "5"}
    app = cdk.App(context=context, outdir=str(tmp_path_factory.mktemp("warn")))
    stacks = build_app(app, TrainingConfig.from_context(context))
    messages = [m for m in stacks["pipeline"].node.metadata if m.type == "aws:cdk:warning"]
    assert any("retry_attempts=5" in str(m.data) for m in messages)


@pytest.mark.parametrize("override", ["training.transformers_version=4.99.0", "training.region=xx-foo-9"])
def test_a_default_image_the_sdk_does_not_know_stops_synth_in_one_line(override):
    name, value = override.split("=")
    done = _run_app({name: value})
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: training.transformers_version=") and "no AWS Hugging Face training image" in line
    assert f"{name.split('.')[1]}={value}" in line


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"instance_count": "4"}, "TrainingConfig.instance_count='4': must be an integer from 1 to 64"),
    ({"use_spot": "false"}, "TrainingConfig.use_spot='false': must be True or False"),
    ({"max_run_seconds": 3600.5}, "TrainingConfig.max_run_seconds=3600.5: must be an integer from 60 to 2419200"),
    ({"learning_rate": float("nan")}, "TrainingConfig.learning_rate=nan: must be a finite number above 0.0 to 1.0"),
    ({"instance_count": 0}, "TrainingConfig.instance_count=0: must be from 1 to 64"),
    ({"allowed_instance_types": "ml.p4d.24xlarge"},
     "TrainingConfig.allowed_instance_types='ml.p4d.24xlarge': must be a tuple of strings"),
    ({"region": 1}, "TrainingConfig.region=1: must be a string"),
])
def test_a_config_built_in_python_is_validated_on_construction_naming_the_python_field(kwargs, message):
    with pytest.raises(ConfigError) as caught:
        TrainingConfig(**kwargs)
    assert str(caught.value) == message


def test_python_numbers_and_lists_are_normalized_to_the_field_types():
    config = TrainingConfig(learning_rate=1, allowed_instance_types=["ml.p4d.24xlarge"])
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.allowed_instance_types == ("ml.p4d.24xlarge",)


def test_the_app_without_a_region_stops_in_one_line():
    done = _run_app({"training.region": ""})
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: training.region: empty; the app needs the region its stacks deploy to "
                                   "(cdk.json, or -c training.region=...)")
