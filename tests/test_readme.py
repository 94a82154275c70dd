"""The README's promises that code can check: set-up commands, the configuration reference."""

from __future__ import annotations

from spot_training.config import TrainingConfig
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_quick_start_holds_the_two_set_up_commands():
    assert "make synth" in README and "make test" in README


def test_configuration_reference_lists_every_field_with_its_default():
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip(" `")
            for line in README.splitlines() if line.startswith("| `")}
    for name, default, _ in TrainingConfig.field_docs():
        shown = {True: "true", False: "false"}.get(default, default)
        assert name in rows, f"README misses training.{name}"
        assert rows[name] == ("(empty)" if shown in ("", ()) else str(shown)), name
