"""Runs the pipeline's training step on this machine through the training image's own launcher, emulating
SageMaker around it: instances, channels, checkpoint sync and spot interruptions.

What SageMaker does, and what stands in for it here:
- the training step is the one `cdk synth` deploys: the definition comes from `definition.generate` with
  the same config (cdk.json), then is resolved like one execution with CPU-sized parameter overrides;
- each instance gets the `/opt/ml` tree SageMaker mounts, under `DIR/instances/algo-<i>/opt/ml/`:
  `input/config/{hyperparameters,inputdataconfig,resourceconfig}.json` written from the step's arguments,
  every channel downloaded to `input/data/<channel>/` (the code archive under its object name), `model/`,
  `output/data/` and the checkpoint folder restored from the checkpoint prefix;
- on each instance the image's entry point runs: the sagemaker-training toolkit's `train` command with
  `SAGEMAKER_TRAINING_MODULE` set as the image sets it and `SAGEMAKER_BASE_DIR` pointing at that instance's
  `/opt/ml`. The toolkit does the rest as in the container: extracts `sagemaker_submit_directory`, runs its
  pip step when the code holds a requirements.txt, exports the `SM_*` variables and builds the torchrun
  command (`torchrun --nnodes N --nproc_per_node P --master_addr <first host> --master_port 7777 ...`);
- the instances are named 127.0.0.1, 127.0.0.2, ... (SageMaker's algo-1, algo-2, ...): names the toolkit's
  DNS wait and torchrun resolve to this machine without any /etc/hosts entry. The toolkit's fixed port 7777
  means one local run at a time on a machine;
- "S3" is the folder `DIR/s3/<bucket>/`. Each instance's checkpoint folder is synced to the checkpoint
  prefix continuously, as SageMaker does: new and changed files are copied (partial files included, as an
  upload in progress would be) and files deleted in the container are deleted from the prefix;
- each instance's first process is the step's ContainerEntrypoint (the platform's entry point, which runs the
  image's command) or, without one, the image's command, inside a supervisor that stands in for the container
  runtime; an interruption or a stop signals each container's first process only, as StopTrainingJob does,
  waits a grace period, syncs once more, then SIGKILLs everything; fresh instances get the checkpoint prefix
  restored and the job starts again. An interruption comes once a step is reached or, on request, while the
  first checkpoint write of a step at or after it is in progress on the first instance (its `step-N/` folder
  there without COMPLETE.json): a reclaim in the middle of a save, the case that the resume must survive.
- the preparation step (when the pipeline has one) runs first, from the same definition, the way SageMaker
  Processing runs a container: each ProcessingInput copied from "S3" to its LocalPath, the step's entrypoint
  and arguments run with the container's /opt/ml/processing (and /tmp) at folders of this run, each
  ProcessingOutput uploaded to its destination; the training step's `train` channel is that output. Pipelines
  step caching is emulated: the same resolved arguments (and the same code archive, whose CDK asset key is its
  hash) as an earlier successful run in this --out skip the step and reuse its output;
What it does not prove: real S3 consistency and throughput, real spot reclaim timing and notice, EFA/NCCL
networking, GPU memory behaviour, network isolation. See the README's "Local run" section.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from spot_training.config import TrainingConfig
from spot_training.layout import CHECKPOINT_LOCAL_PATH, DATA_PARAMETERS
from spot_training.container_entry import GRACE_VARIABLE as STOP_GRACE_VARIABLE
from spot_training.processes import signal_tree

LOCAL_BUCKET = "local-artifact-bucket"
LOCAL_ASSET_BUCKET, LOCAL_CODE_KEY = "local-cdk-assets", "trainer.tar.gz"  # CDK asset keys have no "/"
EXECUTION_ID = "local-execution"
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
# The deployed defaults size a multi-GPU job (2048-token sequences); locally the same parameters are
# overridden the way `start-pipeline-execution --pipeline-parameters` would, to fit a 2-core CPU.
CPU_PARAMETERS = {"InstanceType": "ml.m5.xlarge", "PerDeviceBatchSize": 4, "GradientAccumulationSteps": 4,
                  "SequenceLength": 32, "LearningRate": 1e-3, "CheckpointIntervalMinutes": 60.0,
                  "CheckpointEverySteps": 2}
COMPLETE_FILE = "COMPLETE.json"  # the trainer's mark of a finished checkpoint (trainer/checkpointing.py MARKER)
_RESUMED = re.compile(r"\[start\] resuming at step (\d+)")
_LAUNCH = re.compile(r"^torchrun .*$", re.MULTILINE)


class LocalRunError(RuntimeError):
    """The local job failed or cannot start; the message says why in one line."""


class LocalRunStopped(LocalRunError):
    """local-run was asked to stop (Ctrl-C or SIGTERM) and has ended every process it started."""


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """What one execution's TrainingStep asks SageMaker to run, resolved to concrete values."""

    hyperparameters: dict[str, str]  # as CreateTrainingJob carries them: JSON-encoded strings
    input_data_config: list[dict[str, Any]]
    instance_type: str
    instance_count: int
    environment: dict[str, str]
    checkpoint_s3_uri: str
    checkpoint_local_path: str
    metric_definitions: list[dict[str, str]]
    container_command: tuple[str, ...] = ()  # ContainerEntrypoint + ContainerArguments; () runs the image's own

    @property
    def entry_point(self) -> str:
        return json.loads(self.hyperparameters["sagemaker_program"])

    @property
    def channels(self) -> dict[str, str]:
        return {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in self.input_data_config}

    @property
    def user_hyperparameters(self) -> dict[str, Any]:
        """What the trainer receives as `--name value` (the toolkit leaves `sagemaker_*` out)."""
        return {k: _decoded(v) for k, v in sorted(self.hyperparameters.items()) if not k.startswith("sagemaker_")}

    @staticmethod
    def from_definition(resolved: Mapping[str, Any]) -> TrainingJob:
        """From the definition resolved as one execution (`with_overrides`)."""
        from spot_training import definition as sdk
        from spot_training.definition_rules import EXECUTION_ID_STAND_IN

        args = sdk.training_step(resolved)["Arguments"]
        # A channel fed by the preparation step reads its output under the execution's prefix.
        channels = json.loads(json.dumps(args["InputDataConfig"]).replace(EXECUTION_ID_STAND_IN, EXECUTION_ID))
        return TrainingJob(
            hyperparameters={k: str(v) for k, v in args["HyperParameters"].items()},
            input_data_config=channels,
            instance_type=args["ResourceConfig"]["InstanceType"],
            instance_count=int(args["ResourceConfig"]["InstanceCount"]),
            environment=dict(args.get("Environment", {})),
            checkpoint_s3_uri=args["CheckpointConfig"]["S3Uri"].replace(EXECUTION_ID_STAND_IN, EXECUTION_ID),
            checkpoint_local_path=args["CheckpointConfig"].get("LocalPath", CHECKPOINT_LOCAL_PATH),
            metric_definitions=args["AlgorithmSpecification"]["MetricDefinitions"],
            container_command=(*args["AlgorithmSpecification"].get("ContainerEntrypoint", []),
                               *args["AlgorithmSpecification"].get("ContainerArguments", [])))


@dataclasses.dataclass(frozen=True)
class ProcessingJob:
    """What one execution's preparation (processing) step asks SageMaker to run, resolved."""

    name: str
    arguments: dict[str, Any]  # the step's resolved Arguments, as CreateProcessingJob would carry them

    @property
    def inputs(self) -> dict[str, tuple[str, str]]:
        """name -> (S3 URI, container path)."""
        return {i["InputName"]: (i["S3Input"]["S3Uri"], i["S3Input"]["LocalPath"])
                for i in self.arguments["ProcessingInputs"]}

    @property
    def outputs(self) -> dict[str, tuple[str, str]]:
        """name -> (container path, S3 URI)."""
        return {o["OutputName"]: (o["S3Output"]["LocalPath"], o["S3Output"]["S3Uri"])
                for o in self.arguments["ProcessingOutputConfig"]["Outputs"]}

    @property
    def command(self) -> list[str]:
        app = self.arguments["AppSpecification"]
        return [*app.get("ContainerEntrypoint", []), *app.get("ContainerArguments", [])]

    @staticmethod
    def from_definition(resolved: Mapping[str, Any]) -> ProcessingJob | None:
        from spot_training.definition_rules import EXECUTION_ID_STAND_IN, all_steps

        step = next((s for s in all_steps(resolved) if s.get("Type") == "Processing"), None)
        if step is None:
            return None
        arguments = json.loads(json.dumps(step["Arguments"]).replace(EXECUTION_ID_STAND_IN, EXECUTION_ID))
        return ProcessingJob(name=step["Name"], arguments=arguments)


def _decoded(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text


def with_overrides(definition: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`definition` resolved as one execution started with these parameter values."""
    from spot_training.definition_rules import resolve

    copy = json.loads(json.dumps(definition))
    for parameter in copy["Parameters"]:
        if parameter["Name"] in overrides:
            parameter["DefaultValue"] = overrides[parameter["Name"]]
    return resolve(copy)


def build_job(config: TrainingConfig, steps: int, trainer_dir: Path) -> tuple[TrainingJob, dict[str, Any]]:
    """The TrainingStep of the pipeline `cdk synth` builds for `config`, as one local execution runs it."""
    from spot_training import definition as sdk
    from spot_training.trainer_code import load_metric_definitions

    placeholders = dataclasses.replace(sdk.Placeholders.for_counts(1, 1), bucket_name=LOCAL_BUCKET,
                                       code_bucket_name=LOCAL_ASSET_BUCKET, code_object_key=LOCAL_CODE_KEY)
    definition = sdk.generate(config, metric_definitions=load_metric_definitions(trainer_dir),
                              placeholders=placeholders)
    return TrainingJob.from_definition(with_overrides(definition, local_parameters(steps))), definition


def preparation_resolver(definition: Mapping[str, Any], steps: int) -> Callable[[Mapping[str, Any]],
                                                                                ProcessingJob | None]:
    """The preparation step of one local execution, resolved with these parameter values on top of the
    local ones (None when the pipeline has no preparation step)."""
    def resolve(overrides: Mapping[str, Any]) -> ProcessingJob | None:
        return ProcessingJob.from_definition(with_overrides(definition, {**local_parameters(steps), **overrides}))

    return resolve


def local_parameters(steps: int) -> dict[str, Any]:
    """The pipeline parameters of one local execution: CPU-sized, `steps` optimizer steps."""
    return {**CPU_PARAMETERS, "MaxSteps": steps}


class LocalS3:
    """`s3://bucket/key` <-> `DIR/s3/bucket/key`; also answers ListObjectsV2 through the slice of a boto3 S3
    client's interface that `operations.data_fingerprint` uses, so local-run fingerprints its data with the
    code `spot-training start` runs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, uri: str) -> Path:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return self.root / bucket / key

    def get_paginator(self, operation: str) -> LocalS3:
        if operation != "list_objects_v2":
            raise NotImplementedError(operation)
        return self

    def paginate(self, *, Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:  # noqa: N803 (boto3's names)
        """One page of every object under the prefix; the ETag stands in as the content's MD5 (S3's ETag of
        an object written by a single unencrypted or SSE-S3 PUT; here only its changing with the bytes counts)."""
        base = self.root / Bucket
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        yield {"Contents": [{"Key": key, "Size": f.stat().st_size, "ETag": f'"{hashlib.md5(f.read_bytes()).hexdigest()}"'}
                            for f in files if (key := f.relative_to(base).as_posix()).startswith(Prefix)]}


class CheckpointSync:
    """SageMaker's checkpoint sync between instances' checkpoint folders and the S3 prefix, emulated: new and
    changed files are copied up, and a file deleted in the container is deleted from the prefix too (SageMaker
    developer guide, "Use checkpoints in Amazon SageMaker AI"). Folders may vanish while a pass looks at them
    (the trainer prunes old checkpoints): a pass skips what is gone and the next one sees the new state."""

    def __init__(self, sources: Sequence[Path], target: Path, period: float = 0.05) -> None:
        self.sources, self.target, self.period = list(sources), target, period
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._uploaded: dict[Path, dict[str, tuple[int, int]]] = {source: {} for source in self.sources}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sync_once()

    def sync_once(self) -> None:
        with self._lock:
            for source in self.sources:
                self._sync(source)

    def _sync(self, source: Path) -> None:
        present = _files_with_signatures(source)
        uploaded = self._uploaded[source]
        for name, signature in present.items():
            if uploaded.get(name) == signature:
                continue
            destination = self.target / name
            try:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, destination)
            except (FileNotFoundError, NotADirectoryError):
                _remove_empty_folders(self.target, destination.parent)  # deleted between listing and copy
                continue
            uploaded[name] = signature
        for name in [n for n in uploaded if n not in present]:
            del uploaded[name]
            _delete_object(self.target, name)


def _files_with_signatures(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` as relative name -> (size, mtime_ns); whatever vanishes meanwhile is left out."""
    found: dict[str, tuple[int, int]] = {}
    for folder, _, names in os.walk(root):  # os.walk skips folders that disappear under it
        for name in names:
            path = Path(folder) / name
            try:
                stat = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                continue
            found[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def _delete_object(root: Path, name: str) -> None:
    """Delete `root/name` and the folders it leaves empty: S3 has keys, not folders, so an emptied
    `step-N/` must not come back as an empty folder on restore."""
    path = root / name
    path.unlink(missing_ok=True)
    _remove_empty_folders(root, path.parent)


def _remove_empty_folders(root: Path, folder: Path) -> None:
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty, or already gone
        folder = folder.parent


@dataclasses.dataclass
class Attempt:
    number: int
    resumed_from: int | None = None
    last_step: int = 0
    interrupted: bool = False
    interrupted_during_save: bool = False
    stopped: bool = False  # local-run itself was stopped (Ctrl-C, SIGTERM, SIGKILL) during this attempt
    returncodes: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, order=True)
class Interruption:
    step: int
    during_save: bool = False  # wait, from `step` on, for a checkpoint write of a step >= `step` in progress

    def due(self, last_step: int, checkpoints: Path) -> bool:
        if last_step < self.step:
            return False
        return not self.during_save or any(number >= self.step and not (folder / COMPLETE_FILE).exists()
                                           for number, folder in _step_folders(checkpoints))


def _step_folders(checkpoints: Path) -> list[tuple[int, Path]]:
    return [(int(p.name.removeprefix("step-")), p) for p in checkpoints.glob("step-*")
            if p.name.removeprefix("step-").isdigit()]


class LocalRun:
    def __init__(self, job: TrainingJob, out: Path, trainer_dir: Path, interrupt_at: Sequence[int | Interruption], *,
                 processes_per_host: int = 1, previous_attempts: Sequence[Attempt] = (),
                 preparation: ProcessingJob | None = None,
                 preparation_with: Callable[[Mapping[str, Any]], ProcessingJob | None] | None = None) -> None:
        self.job, self.out, self.trainer_dir = job, out, trainer_dir
        self.preparation = preparation
        self.preparation_with = preparation_with  # the step resolved with more parameter values
        self.preparation_report: dict[str, Any] | None = None
        self.interrupt_at = sorted(i if isinstance(i, Interruption) else Interruption(i) for i in interrupt_at)
        self.processes_per_host = processes_per_host
        self.s3 = LocalS3(out / "s3")
        self.checkpoint_prefix = self.s3.path(job.checkpoint_s3_uri)
        self.attempts: list[Attempt] = list(previous_attempts)
        self.logs = out / "logs"
        self.hosts = [f"127.0.0.{i + 1}" for i in range(job.instance_count)]
        self.processes: list[subprocess.Popen] = []
        # Progress comes from the same regex the pipeline's `train:step` metric definition uses.
        self.step_regex = next(m["Regex"] for m in job.metric_definitions if m["Name"] == "train:step")
        self.launcher = _launcher_command()
        self.phase = "the start"  # what local-run is doing, for the message of a stop

    # ---- setup ------------------------------------------------------------------------------------
    def prepare_inputs(self) -> None:
        """Make a tiny model and dataset at the channels' "S3" locations unless something is there, and put
        the code archive that synth uploads as the CDK asset where the code channel points."""
        from spot_training.tiny import corpus, make_model_dir, make_text_channel
        from spot_training.trainer_code import deterministic_tarball

        raw = {name: uri for name, (uri, _) in self.preparation.inputs.items()} if self.preparation \
            else self.job.channels
        model, texts = self.s3.path(self.job.channels["model"]), corpus(400)
        if not (model.exists() and any(model.iterdir())):
            make_model_dir(model, text_corpus=texts)
        # The validation channel exists when the config asks for one (TrainingConfig.validation_data).
        splits = {"train": texts, "validation": corpus(40, seed=11)}
        for split in (name for name in splits if name in raw):
            folder = self.s3.path(raw[split])
            if not (folder.exists() and any(folder.iterdir())):
                make_text_channel(folder, splits[split])
        code = self.s3.path(self.job.channels["code"])
        code.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(deterministic_tarball(self.trainer_dir), code)

    def _opt_ml(self, index: int) -> Path:
        return self.out / "instances" / f"algo-{index + 1}" / "opt" / "ml"

    def _in_instance(self, base: Path, container_path: str) -> Path:
        """A container path under /opt/ml, inside this instance's folder."""
        return base / Path(container_path).relative_to(OPT_ML)

    def _fresh_instance(self, index: int) -> Path:
        """A new instance: SageMaker's /opt/ml with its config files, channels and restored checkpoints."""
        base = self._opt_ml(index)
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
        hyperparameters["sagemaker_submit_directory"] = json.dumps(str(self._in_instance(base, submit)))
        if self.processes_per_host != 1:
            hyperparameters[PROCESSES_PER_HOST_HYPERPARAMETER] = str(self.processes_per_host)
        _write_json(config / "hyperparameters.json", hyperparameters)
        _write_json(config / "inputdataconfig.json", {
            c["ChannelName"]: {"TrainingInputMode": c.get("InputMode", "File"), "RecordWrapperType": "None",
                               "S3DistributionType": c["DataSource"]["S3DataSource"]["S3DataDistributionType"]}
            for c in self.job.input_data_config})
        group = {"instance_group_name": "homogeneousCluster", "instance_type": self.job.instance_type,
                 "hosts": self.hosts}
        _write_json(config / "resourceconfig.json", {
            "current_host": self.hosts[index], "current_instance_type": self.job.instance_type,
            "current_group_name": "homogeneousCluster", "hosts": self.hosts, "instance_groups": [group],
            # The interface the emulated instances share (SageMaker names eth0); the toolkit passes it to NCCL
            # and the trainer binds gloo to it.
            "network_interface_name": "lo"})
        checkpoints = self._in_instance(base, self.job.checkpoint_local_path)
        checkpoints.mkdir(parents=True, exist_ok=True)
        if self.checkpoint_prefix.exists():
            shutil.copytree(self.checkpoint_prefix, checkpoints, dirs_exist_ok=True)
        return base

    def _environment(self, base: Path) -> dict[str, str]:
        """The container's environment with the step's Environment, for this instance."""
        return {**container_environment(base), **self.job.environment,
                "TRAINING_JOB_NAME": f"pipelines-{EXECUTION_ID}", "OMP_NUM_THREADS": "1",
                # The entry point's share of the stop grace (SageMaker: 120 s, of which it keeps 100 s).
                STOP_GRACE_VARIABLE: str(GRACE_SECONDS * 0.75)}

    def _container_command(self, base: Path) -> list[str]:
        """The container's first process on this instance: the step's ContainerEntrypoint with its container
        paths inside this instance and the image's command as this machine runs it (the toolkit's `train`),
        or, without one, the image's command itself."""
        from spot_training.definition import CONTAINER_ENTRY_DIR, IMAGE_COMMAND

        if not self.job.container_command:
            return list(self.launcher)
        scratch = base.parent.parent / "tmp" / Path(CONTAINER_ENTRY_DIR).name
        return [part.replace(IMAGE_COMMAND, shlex.join(self.launcher)).replace(CONTAINER_ENTRY_DIR, str(scratch))
                .replace(OPT_ML, str(base)) for part in self.job.container_command]

    # ---- running ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.attempts:
            self.phase = "the inputs' creation"
            self.prepare_inputs()
            if self.preparation is not None:
                self.phase = f"the {self.preparation.name} step"
                self._fingerprint_data()
                self.preparation_report = self.run_preparation()
        reached = max((a.last_step for a in self.attempts), default=0)
        pending = [i for i in self.interrupt_at if i.step > reached]
        while True:
            attempt = Attempt(number=len(self.attempts) + 1)
            self.attempts.append(attempt)
            self._save_state(finished=False)
            finished = self._run_attempt(attempt, pending[0] if pending else None)
            self._save_state(finished=False)
            if finished:
                break
            pending.pop(0)
        self._save_state(finished=True)
        return self.report(time.monotonic() - started)

    def _run_attempt(self, attempt: Attempt, interruption: Interruption | None) -> bool:
        self.phase = f"the set-up of attempt {attempt.number}'s instances"
        instances = [self._fresh_instance(i) for i in range(self.job.instance_count)]
        logs = [(self.logs / f"attempt-{attempt.number}-algo-{i + 1}.log").open("w") for i in range(len(instances))]
        sync = CheckpointSync([self._in_instance(b, self.job.checkpoint_local_path) for b in instances],
                              self.checkpoint_prefix)
        main_checkpoints = self._in_instance(instances[0], self.job.checkpoint_local_path)
        self.processes = []
        try:
            for base, log in zip(instances, logs):
                self.processes.append(start_container(self._container_command(base), env=self._environment(base),
                                                      cwd=base, log=log))
            sync.start()
            self.phase = f"training (attempt {attempt.number})"
            main_log = self.logs / f"attempt-{attempt.number}-algo-1.log"
            while any(p.poll() is None for p in self.processes):
                self._read_progress(attempt, main_log)
                if interruption is not None and interruption.due(attempt.last_step, main_checkpoints):
                    self._interrupt(attempt, instances[0], sync)
                    return False
                if any(p.poll() not in (None, 0) for p in self.processes):
                    break
                time.sleep(0.05)  # each look reads the trainer's log: often enough for a step of ~0.1 s
        except BaseException:
            attempt.stopped = True
            self.stop(sync)
            self._read_progress(attempt, self.logs / f"attempt-{attempt.number}-algo-1.log")
            raise
        finally:
            sync.stop()
            for log in logs:
                log.close()
        for process in self.processes:
            if process.poll() is None:
                signal_tree(process.pid, signal.SIGKILL)
            attempt.returncodes.append(process.wait())
        self._read_progress(attempt, main_log)
        sync.sync_once()
        if any(attempt.returncodes):
            raise LocalRunError(self._failure(instances, attempt))
        silent = [host for host, base in zip(self.hosts, instances) if not (base / "output" / "success").is_file()]
        if silent:  # the toolkit writes output/success when the job succeeded (sagemaker-training files.py)
            raise LocalRunError(f"the launcher on {', '.join(silent)} exited 0 without reporting success "
                                f"(no /opt/ml/output/success); logs: {self.logs}")
        self.phase = "the model upload"
        self._upload_outputs(instances[0])
        return True

    # ---- the preparation step ---------------------------------------------------------------------------
    def _fingerprint_data(self) -> None:
        """What `spot-training start` does before StartPipelineExecution: list the data URIs and pass their
        digest as DataFingerprint, so the step cache sees changed data under an unchanged prefix."""
        from spot_training.operations import FINGERPRINT_PARAMETER, data_fingerprint

        if self.preparation_with is None:
            return
        uris = {DATA_PARAMETERS[name]: uri for name, (uri, _) in self.preparation.inputs.items()
                if name in DATA_PARAMETERS}
        fingerprint = data_fingerprint(self.s3, uris, warn=print)
        self.preparation = self.preparation_with({FINGERPRINT_PARAMETER: fingerprint})

    def _cache_key(self) -> str:
        """Pipelines step caching keys on the step's arguments; the code archive's CDK asset key is its hash,
        so the archive's bytes stand in for that key here."""
        code_uri = self.preparation.inputs["code"][0]
        code = hashlib.sha256(self.s3.path(code_uri).read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps({"arguments": self.preparation.arguments, "code": code},
                                         sort_keys=True).encode()).hexdigest()

    def run_preparation(self) -> dict[str, Any]:
        """Run the processing step as SageMaker Processing would (see the module docstring), or skip it when
        Pipelines' step cache would."""
        from spot_training.definition import PREPARE_CODE_DIR, PROCESSING_ROOT

        job, cache_path = self.preparation, self.out / STEP_CACHE_FILE
        key = self._cache_key()
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        outputs_there = all(self.s3.path(uri).is_dir() for _, uri in job.outputs.values())
        if key in cache and outputs_there:
            print(f"{job.name}: skipped: Pipelines step caching (same arguments and code as the run of "
                  f"{cache[key]['finished']}); the training step reads its output", flush=True)
            return {"step": job.name, "skipped": True, "result": cache[key]["result"]}
        started = time.monotonic()
        root = self.out / "processing"
        shutil.rmtree(root, ignore_errors=True)
        container = root / "opt" / "ml" / "processing"
        scratch = root / "tmp" / Path(PREPARE_CODE_DIR).name
        (root / "opt" / "ml" / "output").mkdir(parents=True)

        def local(path: str) -> str:
            return path.replace(PROCESSING_ROOT, str(container)).replace(PREPARE_CODE_DIR, str(scratch))

        for uri, path in job.inputs.values():
            source, destination = self.s3.path(uri), Path(local(path))
            if source.is_dir():
                shutil.copytree(source, destination)
            else:  # a single object lands in the input folder under its own name
                destination.mkdir(parents=True)
                shutil.copyfile(source, destination / source.name)
        for path, _ in job.outputs.values():
            Path(local(path)).mkdir(parents=True)
        environment = {**container_environment(root / "opt" / "ml"), **job.arguments.get("Environment", {}),
                       "PREPARE_EXIT_MESSAGE": str(root / "opt" / "ml" / "output" / "message")}
        log_path = self.logs / "prepare.log"
        with log_path.open("w") as log:
            # In a container of its own, as the instances: a SIGKILL of local-run still ends it.
            process = start_container([local(part) for part in job.command], env=environment, cwd=container, log=log)
            self.processes = [process]
            try:
                code = process.wait()
            except BaseException:
                self.stop()
                raise
            finally:
                self.processes = []
        if code != 0:
            message = root / "opt" / "ml" / "output" / "message"
            reason = message.read_text().strip() if message.is_file() else f"exit code {code}"
            raise LocalRunError(f"the {job.name} step failed: {reason}; log: {log_path}")
        for path, uri in job.outputs.values():
            target = self.s3.path(uri)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(local(path), target)
        result_file = self.s3.path(job.outputs["prepared"][1]) / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        # Every local execution writes the same prefix (prepared/local-execution/), so only the newest entry
        # still has its output; in SageMaker each execution's output stays under its own id.
        cache = {key: {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result}}
        _write_json(cache_path, cache)
        seconds = round(time.monotonic() - started, 2)
        print(f"{job.name}: prepared {result.get('tokens', {})} tokens in {seconds} s", flush=True)
        return {"step": job.name, "skipped": False, "result": result, "seconds": seconds}

    def _failure(self, instances: Sequence[Path], attempt: Attempt) -> str:
        """Like a training job's FailureReason: the toolkit's `output/failure` of the first failed host."""
        for host, base, code in zip(self.hosts, instances, attempt.returncodes):
            reason = base / "output" / "failure"
            if code and reason.is_file():
                lines = [line.strip() for line in reason.read_text().splitlines() if line.strip()]
                detail = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
                return f"the training job failed on {host}: {detail[:300]}; logs: {self.logs}"
        return f"the training job failed (exit codes {attempt.returncodes}); logs: {self.logs}"

    def stop(self, sync: CheckpointSync | None = None) -> None:
        """Stop every instance as SageMaker stops a training job: SIGTERM to each container's first process only
        (the supervisor passes it on so), a grace period, then SIGKILL to everything."""
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS + 1.0  # the supervisors' own grace, then their SIGKILL
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(0.02)
        if sync is not None:
            sync.stop()
            sync.sync_once()
        for process in self.processes:
            signal_tree(process.pid, signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def _read_progress(self, attempt: Attempt, log: Path) -> None:
        text = log.read_text(errors="replace") if log.exists() else ""
        steps = [int(m) for m in re.findall(self.step_regex, text)]
        attempt.last_step = max(steps, default=attempt.last_step)
        resumed = _RESUMED.search(text)
        if resumed:
            attempt.resumed_from = int(resumed.group(1))

    def _interrupt(self, attempt: Attempt, main_instance: Path, sync: CheckpointSync) -> None:
        """Spot reclaim: SIGTERM everywhere, a grace period, one last sync, then SIGKILL everything."""
        attempt.interrupted = True
        checkpoints = self._in_instance(main_instance, self.job.checkpoint_local_path)
        attempt.interrupted_during_save = any(not (d / COMPLETE_FILE).exists() for _, d in _step_folders(checkpoints))
        self.stop(sync)
        attempt.returncodes = [p.returncode for p in self.processes]
        self._read_progress(attempt, self.logs / f"attempt-{attempt.number}-algo-1.log")

    def _upload_outputs(self, main_instance: Path) -> None:
        """SageMaker uploads SM_MODEL_DIR and SM_OUTPUT_DATA_DIR of the first host at the end."""
        target = self.outputs_path()
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(main_instance / "model", target / "model")
        shutil.copytree(main_instance / "output" / "data", target / "data")

    def outputs_path(self) -> Path:
        return self.s3.path(f"s3://{LOCAL_BUCKET}/outputs/{EXECUTION_ID}/output/")

    def _save_state(self, *, finished: bool) -> None:
        _write_json(self.out / STATE_FILE, {"job": job_fingerprint(self.job), "finished": finished,
                                            "attempts": [dataclasses.asdict(a) for a in self.attempts]})

    # ---- report -----------------------------------------------------------------------------------
    def report(self, wall_seconds: float) -> dict[str, Any]:
        outputs = self.outputs_path()
        summary = json.loads((outputs / "data" / "summary.json").read_text())
        main_logs = sorted(self.logs.glob("attempt-*-algo-1.log"), key=lambda p: int(p.name.split("-")[1]))
        all_logs = "\n".join(p.read_text(errors="replace") for p in main_logs)
        matches = {m["Name"]: len(re.findall(m["Regex"], all_logs)) for m in self.job.metric_definitions}
        resumed = [a.resumed_from for a in self.attempts[1:]]
        lost = sum(max(0, a.last_step - (b.resumed_from or 0)) for a, b in zip(self.attempts, self.attempts[1:]))
        launch = _LAUNCH.findall(main_logs[-1].read_text(errors="replace")) if main_logs else []
        return {
            "preparation": self.preparation_report,
            "interruptions": sum(a.interrupted for a in self.attempts),
            "interrupted_at_steps": [a.last_step for a in self.attempts if a.interrupted],
            "interrupted_during_save": [a.interrupted_during_save for a in self.attempts if a.interrupted],
            "stops": sum(a.stopped for a in self.attempts),
            "resumed_from_steps": resumed,
            "final_step": summary["final_step"],
            "final_loss": summary["final_loss"],
            "lost_steps": lost,
            "wall_seconds": round(wall_seconds, 2),
            "instance_count": self.job.instance_count,
            "hosts": self.hosts,
            "processes_per_host": self.processes_per_host,
            "launcher": {"entry_point": self.launcher[-1], **IMAGE_ENVIRONMENT,
                         **{name: _version(name) for name in LAUNCHER_PACKAGES},
                         "python": ".".join(map(str, sys.version_info[:3]))},
            "launch_command": launch[0] if launch else None,
            "entry_point": self.job.entry_point,
            "hyperparameters": self.job.user_hyperparameters,
            "checkpoint_s3_uri": self.job.checkpoint_s3_uri,
            "checkpoints_in_s3": sorted((p.name for p in self.checkpoint_prefix.glob("step-*")),
                                        key=lambda n: int(n.split("-")[1])),
            "model_s3_path": str(outputs / "model"),
            "final_parameters_sha256": parameters_digest(outputs / "model" / "model.safetensors"),
            "metric_definitions_matched": matches,
            "metric_definitions_ok": all(matches.values()),
        }


STATE_FILE = "run.json"
LOCK_FILE = ".local-run.lock"
STEP_CACHE_FILE = "step-cache.json"


def job_fingerprint(job: TrainingJob) -> dict[str, Any]:
    """What must match for a run in the same --out to be resumed rather than refused."""
    return {"hyperparameters": job.user_hyperparameters, "instance_count": job.instance_count,
            "instance_type": job.instance_type}


def start_container(command: Sequence[str], *, env: Mapping[str, str], cwd: Path, log) -> subprocess.Popen:
    """`command` as the first process of an emulated container (spot_training.supervisor)."""
    return subprocess.Popen([sys.executable, "-m", "spot_training.supervisor", "--", *command], env=dict(env),
                            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def container_environment(opt_ml: Path) -> dict[str, str]:
    """What the image's launcher sees in its container, with `/opt/ml` at `opt_ml`: the image's variables,
    this environment's Python first on PATH, and none of this machine's pip settings (the container has no
    local package sources)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "SM_", "SAGEMAKER_"))}
    bin_dir = str(Path(sys.executable).parent)
    return {**inherited, **IMAGE_ENVIRONMENT, "SAGEMAKER_BASE_DIR": str(opt_ml), "PIP_CONFIG_FILE": os.devnull,
            "PATH": f"{bin_dir}{os.pathsep}{inherited.get('PATH', '')}"}


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _launcher_command() -> list[str]:
    """The image's container command: the sagemaker-training toolkit's `train` console script."""
    script = Path(sys.executable).parent / "train"
    if _version("sagemaker-training") is None or _version("sagemaker-pytorch-training") is None \
            or not script.is_file():
        raise LocalRunError("the training image's launcher is not installed here (sagemaker-training and "
                            "sagemaker-pytorch-training): pip install -r requirements-image.txt, or run `make local`")
    return [str(script)]


def parameters_digest(path: Path) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (file layout does not matter)."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(path).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def summary_text(report: Mapping[str, Any]) -> str:
    launcher = report["launcher"]
    lines = [
        f"local run: {report['instance_count']} instances ({', '.join(report['hosts'])}), "
        f"{report['interruptions']} interruption(s) at steps {report['interrupted_at_steps']} "
        f"(during a checkpoint write: {report['interrupted_during_save']}), {report['stops']} stop(s) of local-run",
        f"  launcher: sagemaker-training {launcher['sagemaker-training']}, sagemaker-pytorch-training "
        f"{launcher['sagemaker-pytorch-training']} ({launcher['SAGEMAKER_TRAINING_MODULE']}), torch "
        f"{launcher['torch']}, transformers {launcher['transformers']}, Python {launcher['python']}",
        f"  the toolkit ran: {report['launch_command']}",
        f"  resumed from steps {report['resumed_from_steps']}; steps redone: {report['lost_steps']}",
        f"  final step {report['final_step']}, final loss {report['final_loss']:.6f}, "
        f"wall time {report['wall_seconds']:.1f} s",
        f"  checkpoints in local S3: {', '.join(report['checkpoints_in_s3'])}",
        f"  model: {report['model_s3_path']} (parameters sha256 {report['final_parameters_sha256'][:16]}...)",
        "  metric definitions vs trainer log lines: "
        + ", ".join(f"{name} {'ok' if n else 'NO MATCH'} ({n})" for name, n in report["metric_definitions_matched"].items()),
    ]
    preparation = report.get("preparation")
    if preparation:
        tokens = preparation["result"].get("tokens", {})
        lines.insert(1, f"  {preparation['step']}: " + (
            "skipped (Pipelines step caching: same arguments and code as an earlier run)" if preparation["skipped"]
            else f"tokenized {', '.join(f'{k} {v:,} tokens' for k, v in tokens.items())} in {preparation['seconds']} s")
            + f" (key {preparation['result'].get('key', '?')[:12]})")
    return "\n".join(lines)


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM stop local-run in every phase: the first one raises KeyboardInterrupt wherever
    local-run is, later ones are ignored while it ends what it started (a SIGKILL still ends it, and the
    supervisors then stop their containers themselves). SIGINT is caught even when local-run was started with
    it ignored, as a non-interactive shell starts its background jobs: a `kill -INT` must stop it there too."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.previous = {signum: signal.signal(signum, self._raise) for signum in self.SIGNALS}
        return self

    def _raise(self, signum, frame) -> None:
        for other in self.SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        raise KeyboardInterrupt

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def local_run(config: TrainingConfig, *, steps: int, interrupt_at: Sequence[int], out: Path,
              trainer_dir: Path, processes_per_host: int = 1, restart: bool = False,
              interrupt_during_save: Sequence[int] = (), on_resume=lambda message: None) -> dict[str, Any]:
    """Run (or resume) the training step locally in `out`; returns the report, also written to report.json.

    Each step of `interrupt_at` interrupts once it is reached; each of `interrupt_during_save` interrupts during
    the first checkpoint write of that step or a later one.

    `out` holds one run at a time: a run in progress there (another local-run) is refused; an unfinished run
    (local-run was stopped or killed) of the same job is resumed from its checkpoints unless `restart`; a
    finished one is replaced."""
    if not config.region:  # no cdk.json here: the region only names the image and sagemaker_region
        config = dataclasses.replace(config, region=os.environ.get("AWS_REGION") or "us-east-1")
    given, out = out, out.resolve()  # the instances run in their own folders: every path must be absolute
    for flag, chosen in (("--interrupt-at-step", interrupt_at), ("--interrupt-during-save", interrupt_during_save)):
        for step in chosen:
            if not 0 < step < steps:
                raise LocalRunError(f"{flag} {step}: must be between 1 and --steps - 1 ({steps - 1})")
    interruptions = [Interruption(s) for s in interrupt_at] + [Interruption(s, True) for s in interrupt_during_save]
    with StopSignals():
        try:
            job, definition = build_job(config, steps, trainer_dir)
        except KeyboardInterrupt:
            raise LocalRunStopped("stopped while building the pipeline definition; nothing was started") from None
        try:
            return _run_locked(job, definition, steps=steps, interrupt_at=interruptions, out=out, given=given,
                               trainer_dir=trainer_dir, processes_per_host=processes_per_host, restart=restart,
                               on_resume=on_resume)
        except KeyboardInterrupt:  # between phases: nothing of this run is running
            raise LocalRunStopped(f"stopped; run again with --out {given} to go on") from None


def _run_locked(job: TrainingJob, definition: Mapping[str, Any], *, steps: int,
                interrupt_at: Sequence[Interruption],
                out: Path, given: Path, trainer_dir: Path, processes_per_host: int, restart: bool,
                on_resume) -> dict[str, Any]:
    preparation_with = preparation_resolver(definition, steps)
    preparation = preparation_with({})
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOCK_FILE).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel however we end
        except BlockingIOError:
            raise LocalRunError(f"--out {given}: another local-run is using this folder; wait for it to end or "
                                "choose another --out") from None
        previous = _previous_attempts(out, given, job, restart)
        if not previous:
            for leftover in ("instances", "processing", "logs", "report.json", STATE_FILE):
                path = out / leftover
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            _clear_s3_but_prepared(out / "s3")
        run = LocalRun(job, out, trainer_dir, interrupt_at, processes_per_host=processes_per_host,
                       previous_attempts=previous, preparation=preparation, preparation_with=preparation_with)
        if previous:
            last = previous[-1]
            run._read_progress(last, run.logs / f"attempt-{last.number}-algo-1.log")
            on_resume(f"resuming the unfinished run in {given} (stopped after step {last.last_step}) from its "
                      "checkpoints; pass --restart to start over")
        try:
            report = run.run()
        except KeyboardInterrupt:
            run._save_state(finished=False)
            raise LocalRunStopped(
                f"stopped during {run.phase}: ended every process it started; run again with --out {given} to "
                "resume from the newest checkpoint") from None
        _write_json(out / "report.json", report)
    return report


def _clear_s3_but_prepared(root: Path) -> None:
    """A new run starts from an empty local S3, except what the step cache may reuse: prepared/ (in S3 too,
    a new execution of the pipeline finds what earlier ones prepared)."""
    from spot_training.layout import PREFIXES

    bucket = root / LOCAL_BUCKET
    for path in (root.iterdir() if root.is_dir() else []):
        if path != bucket:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in (bucket.iterdir() if bucket.is_dir() else []):
        if path.name != PREFIXES["prepared"].rstrip("/"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _previous_attempts(out: Path, given: Path, job: TrainingJob, restart: bool) -> list[Attempt]:
    """The attempts of an unfinished run of the same job in `out`, to resume; [] to start afresh."""
    state_path = out / STATE_FILE
    if restart or not state_path.is_file():
        return []
    try:
        state = json.loads(state_path.read_text())
        attempts = [Attempt(**a) for a in state["attempts"]]
        finished, fingerprint = state["finished"], state["job"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise LocalRunError(f"--out {given}: unreadable {STATE_FILE} ({error}); pass --restart to discard "
                            "that run") from None
    if finished or not attempts:
        return []
    if fingerprint != job_fingerprint(job):
        raise LocalRunError(f"--out {given}: holds an unfinished run of a different job (other steps or "
                            "settings); pass --restart to discard it, or choose another --out")
    if not attempts[-1].interrupted:
        attempts[-1].stopped = True  # it ended with local-run, not with an emulated interruption
    return attempts
