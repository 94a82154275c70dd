"""Optional MLflow logging of parameters, metrics and checkpoint events (rank 0 only).

Off unless `mlflow_tracking_uri` is set: a SageMaker managed MLflow tracking server ARN (needs the
sagemaker-mlflow plugin in the image) or any MLflow URI. Metrics reach CloudWatch through the pipeline's
metric definitions either way. A run restarted after an interruption continues the MLflow run of the same
training job (tag `spot_training.job`), so one job is one MLflow run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

JOB_TAG = "spot_training.job"


class Tracker:
    def __init__(self, uri: str, experiment: str, settings: Any, enabled: bool) -> None:
        self.mlflow = None
        if not (uri and enabled):
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        job = os.environ.get("TRAINING_JOB_NAME", "local")
        previous = mlflow.search_runs(filter_string=f"tags.`{JOB_TAG}` = '{job}'", output_format="list",
                                      max_results=1)
        if previous:
            mlflow.start_run(run_id=previous[0].info.run_id)
        else:
            mlflow.start_run(run_name=job, tags={JOB_TAG: job})
            mlflow.log_params({k: v for k, v in dataclasses.asdict(settings).items() if not k.endswith("_dir")})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step=step)

    def log_checkpoint(self, step: int, blocked_seconds: float) -> None:
        if self.mlflow:
            self.mlflow.log_metrics({"checkpoint_step": step, "checkpoint_blocked_seconds": blocked_seconds},
                                    step=step)
            self.mlflow.set_tag("last_complete_checkpoint", f"step-{step}")

    def finish(self, status: str) -> None:
        if self.mlflow:
            self.mlflow.end_run(status=status)
