"""One snapshot per stack, asset hashes normalized so a trainer edit does not churn them.

Update after an intended change: `make test PYTEST_ARGS=--snapshot-update`, then review the diff."""

from __future__ import annotations

import json
import re

import pytest
from syrupy.extensions.json import JSONSnapshotExtension

_HASH = re.compile(r"\b[0-9a-f]{64}\b")


def normalized(template: dict) -> dict:
    text = _HASH.sub("<asset-hash>", json.dumps(template, sort_keys=True))
    clean = json.loads(text)
    clean.get("Resources", {}).pop("CDKMetadata", None)
    clean.get("Conditions", {}).pop("CDKMetadataAvailable", None)
    return clean


@pytest.fixture
def snapshot_json(snapshot):
    return snapshot.use_extension(JSONSnapshotExtension)


@pytest.mark.parametrize("stack", ["networking", "security", "pipeline"])
def test_stack_matches_snapshot(default_app, snapshot_json, stack):
    assert normalized(default_app.templates[stack]) == snapshot_json
