"""What the platform needs to know about SageMaker training instance types.

The list of types SageMaker offers for training comes from botocore's `CreateTrainingJob` model (the
`TrainingInstanceType` enum), so it follows the installed SDK rather than a hand-kept copy. The two facts
botocore does not carry are kept here, per instance family:

- which families have NVIDIA GPUs (distributed GPU training needs them);
- which families have local NVMe instance storage: SageMaker rejects `VolumeKmsKeyId` for those
  (botocore `ResourceConfig.VolumeKmsKeyId` documentation; sagemaker-python-sdk#3677), and their local
  volumes are encrypted by the instance's hardware module instead.

Sources: EC2 accelerated-computing instance specifications and "Instance store volumes" tables
(docs.aws.amazon.com/ec2/latest/instancetypes/ac.html, .../InstanceStorage.html#instance-store-volumes).
"""

from __future__ import annotations

import functools

import botocore.session

# GPU count per instance, by family then size. Families absent here have no NVIDIA GPU.
_GPUS_PER_INSTANCE: dict[str, dict[str, int]] = {
    "p3": {"2xlarge": 1, "8xlarge": 4, "16xlarge": 8},
    "p3dn": {"24xlarge": 8},
    "p4d": {"24xlarge": 8},
    "p4de": {"24xlarge": 8},
    "p5": {"4xlarge": 1, "48xlarge": 8},
    "p5e": {"48xlarge": 8},
    "p5en": {"48xlarge": 8},
    "p6-b200": {"48xlarge": 8},
    "p6-b300": {"48xlarge": 8},
    "g4dn": {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1, "12xlarge": 4},
    "g5": {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1, "12xlarge": 4,
           "24xlarge": 4, "48xlarge": 8},
    "g6": {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1, "12xlarge": 4,
           "24xlarge": 4, "48xlarge": 8},
    "g6e": {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1, "12xlarge": 4,
            "24xlarge": 4, "48xlarge": 8},
    "g7e": {"2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "12xlarge": 2, "24xlarge": 4, "48xlarge": 8},
}

# Memory of one GPU (GiB) per family, from the "GPU memory" columns of the EC2 accelerated-computing
# specifications (docs.aws.amazon.com/ec2/latest/instancetypes/ac.html: total per instance / GPUs) and the
# GPUs' own data sheets: V100 16/32, A100 40/80, H100 80, H200 141, T4 16, A10G 24, L4 24, L40S 48. Families
# not listed are unknown to the memory planner (it says so instead of guessing).
_GPU_MEMORY_GIB: dict[str, int] = {
    "p3": 16, "p3dn": 32, "p4d": 40, "p4de": 80, "p5": 80, "p5e": 141, "p5en": 141,
    "g4dn": 16, "g5": 24, "g6": 24, "g6e": 48,
}

# Families whose instances carry local NVMe instance storage.
_LOCAL_STORAGE_FAMILIES = frozenset({
    "p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200", "p6-b300",
    "g4dn", "g5", "g6", "g6e", "g7e",
    "trn1", "trn1n", "trn2",
    "c5d", "m5d", "r5d", "c6id", "m6id", "r6id", "m7gd", "c7gd", "r7gd",
})


@functools.cache
def training_instance_types() -> tuple[str, ...]:
    """Every instance type SageMaker accepts for CreateTrainingJob, per the installed botocore."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateTrainingJob").input_shape
    return tuple(shape.members["ResourceConfig"].members["InstanceType"].enum)


@functools.cache
def processing_instance_types() -> tuple[str, ...]:
    """Every instance type SageMaker accepts for CreateProcessingJob, per the installed botocore."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateProcessingJob").input_shape
    return tuple(shape.members["ProcessingResources"].members["ClusterConfig"].members["InstanceType"].enum)


@functools.cache
def inference_instance_types() -> tuple[str, ...]:
    """Every instance type a model package may name for real-time inference (CreateModelPackage
    InferenceSpecification.SupportedRealtimeInferenceInstanceTypes), per the installed botocore."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateModelPackage").input_shape
    return tuple(shape.members["InferenceSpecification"].members["SupportedRealtimeInferenceInstanceTypes"].member.enum)


def family(instance_type: str) -> str:
    """`ml.p4d.24xlarge` -> `p4d`."""
    return instance_type.removeprefix("ml.").rsplit(".", 1)[0]


def gpus_per_instance(instance_type: str) -> int:
    """NVIDIA GPUs on one instance of this type; 0 for CPU and non-NVIDIA accelerator types."""
    size = instance_type.rsplit(".", 1)[-1]
    return _GPUS_PER_INSTANCE.get(family(instance_type), {}).get(size, 0)


def gpu_memory_bytes(instance_type: str) -> int | None:
    """Memory of one of the instance's GPUs, or None when this table does not know the family."""
    if not gpus_per_instance(instance_type):
        return None
    gib = _GPU_MEMORY_GIB.get(family(instance_type))
    return None if gib is None else gib * 2**30


def has_local_storage(instance_type: str) -> bool:
    """True when SageMaker refuses a VolumeKmsKeyId for this type (local NVMe instance storage)."""
    return family(instance_type) in _LOCAL_STORAGE_FAMILIES
