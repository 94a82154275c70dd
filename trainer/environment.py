"""The one place that knows the SageMaker training contract and torchrun's environment.

SageMaker (sagemaker-training-toolkit) passes hyperparameters as `--name value` arguments, mounts each
input channel at `SM_CHANNEL_<NAME>`, uploads `SM_MODEL_DIR` (uncompressed: the pipeline sets
CompressionType NONE) and `SM_OUTPUT_DATA_DIR` as output.tar.gz, and syncs `/opt/ml/checkpoints` with
CheckpointConfig.S3Uri. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in every worker.
"""

from __future__ import annotations

import dataclasses
import os

# SageMaker mounts everything under /opt/ml; the toolkit reads SAGEMAKER_BASE_DIR instead when it is set
# (sagemaker-training environment.py), which is how `spot-training local-run` places each emulated instance.
BASE_DIR_VARIABLE, BASE_DIR = "SAGEMAKER_BASE_DIR", "/opt/ml"
# setting -> (toolkit variable that names it, or None; fallback under /opt/ml, or "" for none).
DEFAULT_PATHS = {
    "train_dir": ("SM_CHANNEL_TRAIN", "input/data/train"),
    "validation_dir": ("SM_CHANNEL_VALIDATION", ""),
    "model_dir": ("SM_CHANNEL_MODEL", "input/data/model"),
    "output_model_dir": ("SM_MODEL_DIR", "model"),
    "output_data_dir": ("SM_OUTPUT_DATA_DIR", "output/data"),
    # CheckpointConfig.LocalPath, which the pipeline sets to /opt/ml/checkpoints (spot_training.layout).
    "checkpoint_dir": (None, "checkpoints"),
}


def default_path(name: str) -> str:
    variable, fallback = DEFAULT_PATHS[name]
    if variable and variable in os.environ:
        return os.environ[variable]
    return os.path.join(os.environ.get(BASE_DIR_VARIABLE, BASE_DIR), fallback) if fallback else ""


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this process sits in the job. Outside torchrun it is a job of one."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @staticmethod
    def from_environment() -> Topology:
        return Topology(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def ensure_rendezvous_defaults() -> None:
    """Let `python train.py` run as a job of one without torchrun."""
    for name in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(name, "0")
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])


def bind_gloo_to_the_instance_network() -> str | None:
    """The gloo groups (checkpoint I/O and weight loading; all of training on CPU) cross instances too. Gloo
    binds the address the host name resolves to unless GLOO_SOCKET_IFNAME names an interface, and the toolkit
    sets the interface only for NCCL (NCCL_SOCKET_IFNAME, from resourceconfig.json's network_interface_name;
    sagemaker-training torch_distributed.py). Bind gloo to that same interface, the one SageMaker names for the
    instances' traffic.
    Returns the interface gloo uses, or None when gloo chooses."""
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        name = os.environ.get("NCCL_SOCKET_IFNAME", "")
        # NCCL also accepts ^exclusions and =exact prefixes; gloo takes plain interface names only.
        if name and not name.startswith(("^", "=")):
            os.environ["GLOO_SOCKET_IFNAME"] = name
    return os.environ.get("GLOO_SOCKET_IFNAME")


def make_deterministic() -> list[str]:
    """The `deterministic` setting: torch's deterministic kernels, strictly (an op without a deterministic
    implementation raises instead of silently differing), cuBLAS with a fixed workspace (its documented
    requirement for reproducible results: CUBLAS_WORKSPACE_CONFIG=:4096:8, set before the first cuBLAS call),
    cuDNN without autotuning. Returns what it set, for the log. NCCL's reduction order is outside these
    switches: it depends on the world size and topology, so a resume on another world size is never bit-exact."""
    import torch

    done = []
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    done.append(f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    done += ["torch.use_deterministic_algorithms(True)", "cudnn.deterministic", "no cudnn.benchmark"]
    return done
