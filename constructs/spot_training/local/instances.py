"""The emulated instances: SageMaker's `/opt/ml` tree for each, and the image's launcher started as each
container's first process, in a supervisor that stands in for the container runtime."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from spot_training.definition.container_entry import GRACE_VARIABLE as STOP_GRACE_VARIABLE
from spot_training.local.jobs import EXECUTION_ID, LocalRunError, TrainingJob
from spot_training.local.storage import LocalS3, write_json

GRACE_SECONDS = 2.0  # SageMaker allows 120 s after StopTrainingJob; spot reclaim timing is not documented
OPT_ML = "/opt/ml"
# What the training image sets for its launcher (aws/deep-learning-containers
# pytorch/training/docker/2.8/py3/cu129/Dockerfile.gpu: the `ENV` lines of the common and sagemaker stages).
IMAGE_ENVIRONMENT = {"SAGEMAKER_TRAINING_MODULE": "sagemaker_pytorch_container.training:main",
                     "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "UTF-8",
                     "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
LAUNCHER_PACKAGES = ("sagemaker-training", "sagemaker-pytorch-training", "torch", "transformers")
# The toolkit starts one process per GPU, and one on a CPU instance; `--processes-per-host` overrides that
# through the toolkit's own hyperparameter (sagemaker-training params.py MPI_PROCESSES_PER_HOST), written
# into the local hyperparameters.json only.
PROCESSES_PER_HOST_HYPERPARAMETER = "sagemaker_mpi_num_of_processes_per_host"


class Instances:
    """The instances of one training job, each a folder `out/instances/algo-<i>/` holding its `/opt/ml`."""

    def __init__(self, job: TrainingJob, out: Path, s3: LocalS3, *, processes_per_host: int = 1) -> None:
        self.job, self.out, self.s3 = job, out, s3
        self.processes_per_host = processes_per_host
        self.hosts = [f"127.0.0.{i + 1}" for i in range(job.instance_count)]
        self.launcher = launcher_command()

    def opt_ml(self, index: int) -> Path:
        return self.out / "instances" / f"algo-{index + 1}" / "opt" / "ml"

    def in_instance(self, base: Path, container_path: str) -> Path:
        """A container path under /opt/ml, inside this instance's folder."""
        return base / Path(container_path).relative_to(OPT_ML)

    def fresh(self, index: int, checkpoint_prefix: Path) -> Path:
        """A new instance: SageMaker's /opt/ml with its config files, channels and restored checkpoints."""
        base = self.opt_ml(index)
        shutil.rmtree(base.parent.parent, ignore_errors=True)
        for folder in ("input/config", "model", "output/data"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        for channel in self.job.input_data_config:
            name, uri = channel["ChannelName"], channel["DataSource"]["S3DataSource"]["S3Uri"]
            destination, source = base / "input" / "data" / name, self.s3.path(uri)
            if source.is_dir():
                shutil.copytree(source, destination)
            else:  # a single object: SageMaker puts it in the channel folder under its own name
                destination.mkdir(parents=True)
                shutil.copyfile(source, destination / source.name)
        config = base / "input" / "config"
        hyperparameters = dict(self.job.hyperparameters)
        # The one /opt/ml path in the arguments; the toolkit reads it as is, so it moves with the instance.
        submit = json.loads(hyperparameters["sagemaker_submit_directory"])
        hyperparameters["sagemaker_submit_directory"] = json.dumps(str(self.in_instance(base, submit)))
        if self.processes_per_host != 1:
            hyperparameters[PROCESSES_PER_HOST_HYPERPARAMETER] = str(self.processes_per_host)
        write_json(config / "hyperparameters.json", hyperparameters)
        write_json(config / "inputdataconfig.json", {
            c["ChannelName"]: {"TrainingInputMode": c.get("InputMode", "File"), "RecordWrapperType": "None",
                               "S3DistributionType": c["DataSource"]["S3DataSource"]["S3DataDistributionType"]}
            for c in self.job.input_data_config})
        group = {"instance_group_name": "homogeneousCluster", "instance_type": self.job.instance_type,
                 "hosts": self.hosts}
        write_json(config / "resourceconfig.json", {
            "current_host": self.hosts[index], "current_instance_type": self.job.instance_type,
            "current_group_name": "homogeneousCluster", "hosts": self.hosts, "instance_groups": [group],
            # The interface the emulated instances share (SageMaker names eth0); the toolkit passes it to NCCL
            # and the trainer binds gloo to it.
            "network_interface_name": "lo"})
        checkpoints = self.in_instance(base, self.job.checkpoint_local_path)
        checkpoints.mkdir(parents=True, exist_ok=True)
        if checkpoint_prefix.exists():
            shutil.copytree(checkpoint_prefix, checkpoints, dirs_exist_ok=True)
        return base

    def environment(self, base: Path) -> dict[str, str]:
        """The container's environment with the step's Environment, for this instance."""
        return {**container_environment(base), **self.job.environment,
                "TRAINING_JOB_NAME": f"pipelines-{EXECUTION_ID}", "OMP_NUM_THREADS": "1",
                # The entry point's share of the stop grace (SageMaker: 120 s, of which it keeps 100 s).
                STOP_GRACE_VARIABLE: str(GRACE_SECONDS * 0.75)}

    def container_command(self, base: Path) -> list[str]:
        """The container's first process on this instance: the step's ContainerEntrypoint with its container
        paths inside this instance and the image's command as this machine runs it (the toolkit's `train`),
        or, without one, the image's command itself."""
        from spot_training.definition.build import CONTAINER_ENTRY_DIR, IMAGE_COMMAND

        if not self.job.container_command:
            return list(self.launcher)
        scratch = base.parent.parent / "tmp" / Path(CONTAINER_ENTRY_DIR).name
        return [part.replace(IMAGE_COMMAND, shlex.join(self.launcher)).replace(CONTAINER_ENTRY_DIR, str(scratch))
                .replace(OPT_ML, str(base)) for part in self.job.container_command]


def start_container(command: Sequence[str], *, env: Mapping[str, str], cwd: Path, log) -> subprocess.Popen:
    """`command` as the first process of an emulated container (spot_training.local.supervisor)."""
    return subprocess.Popen([sys.executable, "-m", "spot_training.local.supervisor", "--", *command], env=dict(env),
                            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def container_environment(opt_ml: Path) -> dict[str, str]:
    """What the image's launcher sees in its container, with `/opt/ml` at `opt_ml`: the image's variables,
    this environment's Python first on PATH, and none of this machine's pip settings (the container has no
    local package sources)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "SM_", "SAGEMAKER_"))}
    bin_dir = str(Path(sys.executable).parent)
    return {**inherited, **IMAGE_ENVIRONMENT, "SAGEMAKER_BASE_DIR": str(opt_ml), "PIP_CONFIG_FILE": os.devnull,
            "PATH": f"{bin_dir}{os.pathsep}{inherited.get('PATH', '')}"}


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def launcher_command() -> list[str]:
    """The image's container command: the sagemaker-training toolkit's `train` console script."""
    script = Path(sys.executable).parent / "train"
    if package_version("sagemaker-training") is None or package_version("sagemaker-pytorch-training") is None \
            or not script.is_file():
        raise LocalRunError("the training image's launcher is not installed here (sagemaker-training and "
                            "sagemaker-pytorch-training): pip install -r requirements-image.txt, or run `make local`")
    return [str(script)]
