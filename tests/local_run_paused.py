"""`spot-training local-run` held inside one phase, so that a test can stop it there for certain: PAUSE_IN names
the phase (definition, preparation, set-up, upload, evaluation), PAUSE_FLAG the file touched once local-run is inside it.
Training needs no hold: a test waits for a step in the trainer's log."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from spot_training import cli
from spot_training.definition import build as definition
from spot_training.local import instances, processing, run


def _inside(original, *, hold: bool = True):
    def held(*args, **kwargs):
        result = original(*args, **kwargs)
        Path(os.environ["PAUSE_FLAG"]).touch()
        if hold:
            time.sleep(120)
        return result
    return held


phase = os.environ["PAUSE_IN"]
if phase == "definition":
    definition.generate = _inside(lambda *args, **kwargs: None)
elif phase == "preparation":  # the step's container runs (a few seconds of tokenizer start-up and tokenizing)
    processing.start_container = _inside(processing.start_container, hold=False)
elif phase == "set-up":
    instances.Instances.fresh = _inside(instances.Instances.fresh)
elif phase == "upload":
    run.LocalRun._upload_outputs = _inside(run.LocalRun._upload_outputs)
elif phase == "evaluation":  # training finished; held before the Evaluate step's container starts
    def _held_evaluation(*args, **kwargs):
        Path(os.environ["PAUSE_FLAG"]).touch()
        time.sleep(120)
        raise SystemExit("held evaluation was not stopped")
    run.evaluate_and_gate = _held_evaluation
else:
    raise SystemExit(f"PAUSE_IN={phase}: not a phase this wrapper holds")
sys.exit(cli.main(["local-run", *sys.argv[1:]]))
