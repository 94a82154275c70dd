"""Where things live: the artifact bucket's prefixes and the container's checkpoint folder."""

# One prefix per kind of object, so IAM, lifecycle rules and people can tell them apart.
PREFIXES = {
    "data": "data/",
    "models": "models/",
    "code": "code/",
    "checkpoints": "checkpoints/",
    "outputs": "outputs/",
    "prepared": "prepared/",
    "evaluation": "evaluation/",
    "mlflow": "mlflow/",
}
# Each data split: the pipeline parameter with its raw data, the name of its processing input, training
# channel and prepared folder, and its default folder under data/ (validation only with validation_data).
DATA_PARAMETERS = {"train": "TrainingDataUri", "validation": "ValidationDataUri"}
# SageMaker syncs this folder with CheckpointConfig.S3Uri; the trainer saves and resumes here.
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
# A registered model package's lineage (CustomerMetadataProperties). The approver policy forbids changing them
# (UpdateModelPackage can rewrite them); `start` compares runs through the evaluation report instead.
LINEAGE_KEYS = ("base_model", "data_fingerprint", "trainer_code", "training_image", "training_job", "method",
                "pipeline_execution", "training_seconds", "billable_seconds")
NO_FINGERPRINT = "unlisted"  # DataFingerprint's default: the data was not fingerprinted, so nothing compares to it
