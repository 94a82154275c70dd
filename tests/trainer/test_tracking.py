"""The trainer's MLflow logging, against a local file-based MLflow store."""

from __future__ import annotations

import pytest

from spot_training.local.tiny import make_job
from tests.trainer.harness import Run


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this test's local store; SageMaker tracking servers need none
    root = tmp_path_factory.mktemp("mlflow")
    store = f"file://{root / 'mlruns'}"
    run = Run(make_job(root / "job"), root / "run", max_steps=8, mlflow_tracking_uri=store)
    env = {"MLFLOW_ALLOW_FILE_STORE": "true", "TRAINING_JOB_NAME": "pipelines-test-Train-1"}
    run.kill_at_step(run.start(env=env), 5)
    run.run_with_env(env)
    yield store, run
    mp.undo()


def test_one_mlflow_run_per_training_job_across_an_interruption(tracked):
    import mlflow

    store, _ = tracked
    client = mlflow.MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "spot-training"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    (mlflow_run,) = runs
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["spot_training.job"] == "pipelines-test-Train-1"
    assert mlflow_run.data.params["max_steps"] == "8" and mlflow_run.data.params["strategy"] == "auto"


def test_metrics_and_checkpoint_events_are_logged_by_step(tracked):
    import mlflow

    store, run = tracked
    client = mlflow.MlflowClient(tracking_uri=store)
    (mlflow_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()
                                        if e.name == "spot-training"])
    losses = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "loss")}
    assert set(losses) == set(range(1, 9))
    assert losses[8] == pytest.approx(run.losses()[8])
    checkpoints = sorted({int(m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "checkpoint_step")})
    assert checkpoints == [4, 8]
    assert mlflow_run.data.tags["last_complete_checkpoint"] == "step-8"
    assert client.get_metric_history(mlflow_run.info.run_id, "validation_loss")
