"""The README's promises that code can check: set-up commands, the configuration reference."""

from __future__ import annotations

from spot_training.config.settings import TrainingConfig
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_quick_start_holds_the_two_set_up_commands():
    assert "make synth" in README and "make test" in README


def test_configuration_reference_lists_every_field_with_its_default():
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip(" `")
            for line in README.splitlines() if line.startswith("| `")}
    for name, default, _ in TrainingConfig.field_docs():
        shown = str(default).lower() if isinstance(default, bool) else default
        assert name in rows, f"README misses training.{name}"
        assert rows[name] == ("(empty)" if shown in ("", ()) else str(shown)), name


RUNBOOK = (ROOT / "docs" / "incidents" / "sagemaker-distributed-training.md").read_text()


def test_runbook_covers_every_scenario_with_the_five_parts():
    scenarios = ["Spot capacity unavailable, MaxWaitTimeExceeded", "Job stuck in Starting",
                 "One node lost, NCCL timeout", "Checkpoint not restored, or corrupt", "Out of memory",
                 "KMS access denied", "Quota: ResourceLimitExceeded", "Runaway cost",
                 "Model refused at the gate, or not registered"]
    sections = RUNBOOK.split("\n## ")[1:]
    assert len(sections) == len(scenarios)
    for scenario, section in zip(scenarios, sections):
        assert scenario in section.splitlines()[0]
        for part in ("**Symptoms.**", "**Confirm.**", "**Mitigate.**", "**Prevent.**", "**Simulate.**"):
            assert part in section, f"{scenario}: missing {part}"


def test_the_construct_example_synthesizes_with_all_checks(tmp_path):
    """The README's "use the construct in your own CDK app" block, run as written (output to tmp)."""
    start = README.index("```python\nimport aws_cdk as cdk")
    code = README[start + len("```python\n"):README.index("```", start + 10)]
    assert "app = cdk.App()" in code
    code = code.replace("app = cdk.App()", f"app = cdk.App(outdir={str(tmp_path)!r})")
    exec(compile(code, "README.md", "exec"), {})
    template = (tmp_path / "TeamTraining.template.json").read_text()
    assert "AWS::SageMaker::Pipeline" in template and "ml-scientists" in template
