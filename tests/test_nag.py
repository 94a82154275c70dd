"""cdk-nag: three packs on the whole app, zero unacknowledged findings, a reviewed acknowledgment list."""

from __future__ import annotations

import aws_cdk as cdk
import pytest
from aws_cdk import aws_s3 as s3

from app import build_app
from spot_training.config.settings import TrainingConfig
from tests.conftest import ROOT, cdk_json_context

REVIEWED = ROOT / "tests" / "acknowledgments.txt"


def acknowledgments(app: cdk.App) -> list[tuple[str, str, str]]:
    key = cdk.Validations.ACKNOWLEDGED_RULES_METADATA_KEY
    return sorted((c.node.path, finding, reason) for c in app.node.find_all()
                  for entry in c.node.metadata if entry.type == key
                  for finding, reason in entry.data.items())


def test_the_app_synthesizes_with_all_three_packs_and_no_unacknowledged_finding(default_app):
    # app.synth() raises on any unacknowledged nag finding or definition violation.
    assert {s.stack_name for s in default_app.assembly.stacks} == {
        "DistributedTrainingNetworking", "DistributedTrainingSecurity", "DistributedTrainingPipeline"}


def test_a_non_compliant_resource_fails_synth(tmp_path):
    context = cdk_json_context()
    app = cdk.App(context=context, outdir=str(tmp_path))
    stacks = build_app(app, TrainingConfig.from_context(context))
    s3.Bucket(stacks["security"], "Careless")
    with pytest.raises(Exception, match="AwsSolutions-S1|S3BucketLoggingEnabled"):
        app.synth()


def test_acknowledgments_match_the_reviewed_list(default_app):
    """Adding an acknowledgment means adding its line to tests/acknowledgments.txt, in review."""
    found = [f"{path} {finding}" for path, finding, _ in acknowledgments(default_app.app)]
    reviewed = [line for line in REVIEWED.read_text().splitlines() if line and not line.startswith("#")]
    assert found == reviewed
    assert len(found) == 49


def test_every_acknowledgment_of_ours_gives_a_reason(default_app):
    ours = [(p, f, r) for p, f, r in acknowledgments(default_app.app) if not f.startswith("CloudFormation-Validate")]
    assert all(len(reason) >= 60 for _, _, reason in ours), [(p, f) for p, f, r in ours if len(r) < 60]
    assert not any(path.count("/") == 0 for path, _, _ in ours), "no blanket stack-level acknowledgments"
