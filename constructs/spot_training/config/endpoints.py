"""Which VPC endpoints the platform creates, and why each one: the one list the networking construct builds
from and the cost model counts. Free of CDK imports.

A training job in VPC mode needs only the S3 gateway endpoint: SageMaker downloads the channels, syncs the
checkpoints and uploads the model through the job's subnets (SageMaker developer guide, "Give SageMaker AI
Training Jobs Access to Resources in Your Amazon VPC", which asks for an S3 VPC endpoint). The training image
is pulled by the platform (`TrainingRepositoryAccessMode=Platform`, the default, and the only mode with
network isolation), the container's logs and metrics are collected by SageMaker, and an isolated container
has no credentials to call any AWS API, so STS, Logs, ECR and KMS interface endpoints serve no training job.
(An earlier note here said missing STS or Logs endpoints keep jobs in `Starting`; its source, a developer
guide pull request, concerns Studio notebooks and SDK clients inside a VPC, not training jobs.)

Interface endpoints serve code that runs inside the VPC and calls AWS. Each one costs about 7.30 USD per AZ
per month (0.01 USD per endpoint-AZ-hour, AWS PrivateLink pricing), plus data processed.
"""

from __future__ import annotations

# name -> (service name, prefix, the caller inside the VPC that needs it)
INTERFACE_ENDPOINTS: dict[str, tuple[str, str, str]] = {
    "SageMakerApi": ("sagemaker.api", "com.amazonaws",
                     "the alarm monitor function lists the pipeline's executions (sagemaker:ListPipelineExecutions)"),
    "Monitoring": ("monitoring", "com.amazonaws",
                   "the alarm monitor function publishes the running-execution age (cloudwatch:PutMetricData)"),
}
# SageMaker managed MLflow tracking servers are reached at `aws.sagemaker.<region>.experiments`.
MLFLOW_ENDPOINTS: dict[str, tuple[str, str, str]] = {
    "MlflowExperiments": ("experiments", "aws.sagemaker",
                          "the trainer logs to the SageMaker managed MLflow tracking server (training.mlflow=true)"),
}
# The capacity ladder's controller reads executions through SageMakerApi and says what it did in the alarm topic.
CAPACITY_LADDER_ENDPOINTS: dict[str, tuple[str, str, str]] = {
    "Sns": ("sns", "com.amazonaws", "the capacity ladder's controller publishes its decisions to the alarm topic "
            "(training.capacity_ladder=true)"),
}
ENDPOINT_USD_PER_AZ_MONTH = 7.30  # 0.01 USD per endpoint per AZ per hour x 730 h (AWS PrivateLink pricing)


def interface_endpoints(mlflow: bool, capacity_ladder: bool = False) -> dict[str, tuple[str, str, str]]:
    return {**INTERFACE_ENDPOINTS, **(MLFLOW_ENDPOINTS if mlflow else {}),
            **(CAPACITY_LADDER_ENDPOINTS if capacity_ladder else {})}
