"""Runs the pipeline's training step on this machine, emulating SageMaker and its spot interruptions.

What is emulated, and how (each piece mirrors a documented SageMaker behaviour):
- the training step is the one `cdk synth` deploys: the definition comes from `definition.generate` with
  the same config (cdk.json), then is resolved like one execution with CPU-sized parameter overrides;
- each instance gets a `/opt/ml`-like tree under `DIR/instances/algo-<i>/` (input/data/<channel>, model,
  output/data, checkpoints, code) and the `SM_*` variables of the sagemaker-training toolkit;
- `instance_count` torchrun agents join one static rendezvous on 127.0.0.1, one worker each (the nearest
  honest equivalent of N instances on one CPU machine), started like the toolkit's torch_distributed
  launcher: `torchrun --nnodes N --node_rank i ... train.py --<hyperparameter> <value> ...`;
- "S3" is the folder `DIR/s3/<bucket>/`; every instance's checkpoint folder is copied there continuously
  (new and changed files, never deletions, partial files included, as an upload in progress would be);
- an interruption sends SIGTERM to every instance, waits a grace period, uploads once more, then SIGKILLs
  every process; fresh instances get the whole checkpoint prefix restored into their checkpoint folder
  and the job starts again.
What it does not prove: real S3 consistency and throughput, real spot reclaim timing and notice, EFA/NCCL
networking, GPU memory behaviour. See the README's "Local run" section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spot_training.config import TrainingConfig
from spot_training.layout import CHECKPOINT_LOCAL_PATH
from spot_training.processes import signal_tree

LOCAL_BUCKET = "local-artifact-bucket"
EXECUTION_ID = "local-execution"
GRACE_SECONDS = 2.0  # SageMaker allows 120 s after StopTrainingJob; spot reclaim timing is not documented
# The deployed defaults size a multi-GPU job (2048-token sequences); locally the same parameters are
# overridden the way `start-pipeline-execution --pipeline-parameters` would, to fit a 2-core CPU.
CPU_PARAMETERS = {"InstanceType": "ml.m5.xlarge", "PerDeviceBatchSize": 4, "GradientAccumulationSteps": 4,
                  "SequenceLength": 32, "LearningRate": 1e-3, "CheckpointIntervalMinutes": 60.0,
                  "CheckpointEverySteps": 2}
_RESUMED = re.compile(r"\[start\] resuming at step (\d+)")


class LocalRunError(RuntimeError):
    """The local job failed; the message says where its logs are."""


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """What one execution's TrainingStep asks SageMaker to run, resolved to concrete values."""

    entry_point: str
    hyperparameters: dict[str, str]
    channels: dict[str, str]
    environment: dict[str, str]
    checkpoint_s3_uri: str
    checkpoint_local_path: str
    instance_count: int
    metric_definitions: list[dict[str, str]]

    @staticmethod
    def from_definition(definition: Mapping[str, Any], overrides: Mapping[str, Any]) -> TrainingJob:
        from spot_training import definition as sdk
        from spot_training.definition_rules import EXECUTION_ID_STAND_IN, resolve

        with_overrides = json.loads(json.dumps(definition))
        for parameter in with_overrides["Parameters"]:
            if parameter["Name"] in overrides:
                parameter["DefaultValue"] = overrides[parameter["Name"]]
        args = sdk.training_step(resolve(with_overrides))["Arguments"]
        hyper = {k: json.loads(v) if _is_json(v) else v for k, v in args["HyperParameters"].items()}
        return TrainingJob(
            entry_point=hyper["sagemaker_program"],
            # The toolkit passes every non-`sagemaker_` hyperparameter as `--name value`.
            hyperparameters={k: str(v) for k, v in sorted(hyper.items()) if not k.startswith("sagemaker_")},
            channels={c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in args["InputDataConfig"]},
            environment=dict(args.get("Environment", {})),
            checkpoint_s3_uri=args["CheckpointConfig"]["S3Uri"].replace(EXECUTION_ID_STAND_IN, EXECUTION_ID),
            checkpoint_local_path=args["CheckpointConfig"].get("LocalPath", CHECKPOINT_LOCAL_PATH),
            instance_count=int(args["ResourceConfig"]["InstanceCount"]),
            metric_definitions=args["AlgorithmSpecification"]["MetricDefinitions"])


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return False
    return True


def build_job(config: TrainingConfig, steps: int, trainer_dir: Path) -> tuple[TrainingJob, dict[str, Any]]:
    """The TrainingStep of the pipeline `cdk synth` builds for `config`, as one local execution runs it."""
    from spot_training import definition as sdk
    from spot_training.trainer_code import load_metric_definitions

    placeholders = dataclasses.replace(sdk.Placeholders.for_counts(1, 1), bucket_name=LOCAL_BUCKET,
                                       code_bucket_name=LOCAL_BUCKET, code_object_key="code/trainer.tar.gz")
    definition = sdk.generate(config, metric_definitions=load_metric_definitions(trainer_dir),
                              placeholders=placeholders)
    return TrainingJob.from_definition(definition, {**CPU_PARAMETERS, "MaxSteps": steps}), definition


class LocalS3:
    """`s3://bucket/key` <-> `DIR/s3/bucket/key`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, uri: str) -> Path:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return self.root / bucket / key


class CheckpointSync:
    """Copies new and changed files from instance checkpoint folders to the "S3" prefix, continuously."""

    def __init__(self, sources: Sequence[Path], target: Path, period: float = 0.05) -> None:
        self.sources, self.target, self.period = sources, target, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._seen: dict[Path, tuple[int, int]] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sync_once()

    def sync_once(self) -> None:
        for source in self.sources:
            for file in source.rglob("*"):
                try:
                    stat = file.stat()
                    if not file.is_file() or self._seen.get(file) == (stat.st_size, stat.st_mtime_ns):
                        continue
                    destination = self.target / file.relative_to(source)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, destination)
                    self._seen[file] = (stat.st_size, stat.st_mtime_ns)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # pruned or renamed while we looked: the next pass sees the new state


@dataclasses.dataclass
class Attempt:
    number: int
    resumed_from: int | None = None
    last_step: int = 0
    interrupted: bool = False
    interrupted_during_save: bool = False
    returncodes: list[int] = dataclasses.field(default_factory=list)


class LocalRun:
    def __init__(self, job: TrainingJob, out: Path, trainer_dir: Path, interrupt_at: Sequence[int]) -> None:
        self.job, self.out, self.trainer_dir = job, out, trainer_dir
        self.interrupt_at = sorted(interrupt_at)
        self.s3 = LocalS3(out / "s3")
        self.checkpoint_prefix = self.s3.path(job.checkpoint_s3_uri)
        self.attempts: list[Attempt] = []
        self.logs = out / "logs"
        # Progress comes from the same regex the pipeline's `train:step` metric definition uses.
        self.step_regex = next(m["Regex"] for m in job.metric_definitions if m["Name"] == "train:step")

    # ---- setup ------------------------------------------------------------------------------------
    def prepare_inputs(self) -> None:
        """Make a tiny model and dataset at the channels' "S3" locations unless something is there."""
        from spot_training.tiny import corpus, make_model_dir, make_text_channel

        model, train = self.s3.path(self.job.channels["model"]), self.s3.path(self.job.channels["train"])
        texts = corpus(400)
        if not (model.exists() and any(model.iterdir())):
            make_model_dir(model, text_corpus=texts)
        if not (train.exists() and any(train.iterdir())):
            make_text_channel(train, texts)
        code = self.s3.path(self.job.channels["code"])
        from spot_training.trainer_code import deterministic_tarball

        code.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(deterministic_tarball(self.trainer_dir), code)  # the archive synth uploads as the asset

    def _instance_root(self, index: int) -> Path:
        return self.out / "instances" / f"algo-{index + 1}"

    def _fresh_instance(self, index: int) -> dict[str, Path]:
        """A new instance: empty /opt/ml, channels downloaded, checkpoints restored from "S3"."""
        root = self._instance_root(index)
        shutil.rmtree(root, ignore_errors=True)
        opt_ml = root / "opt" / "ml"
        paths = {"model": opt_ml / "model", "output_data": opt_ml / "output" / "data", "code": opt_ml / "code",
                 "checkpoints": root / self.job.checkpoint_local_path.lstrip("/")}
        for path in paths.values():
            path.mkdir(parents=True, exist_ok=True)
        for channel, uri in self.job.channels.items():
            destination = opt_ml / "input" / "data" / channel
            source = self.s3.path(uri)
            if source.is_dir():
                shutil.copytree(source, destination)
            else:
                destination.mkdir(parents=True)
                shutil.copyfile(source, destination / source.name)
            paths[f"channel_{channel}"] = destination
        with tarfile.open(self.s3.path(self.job.channels["code"])) as archive:
            archive.extractall(paths["code"], filter="data")
        if self.checkpoint_prefix.exists():
            shutil.copytree(self.checkpoint_prefix, paths["checkpoints"], dirs_exist_ok=True)
        return paths

    def _environment(self, index: int, paths: Mapping[str, Path]) -> dict[str, str]:
        hosts = [f"algo-{i + 1}" for i in range(self.job.instance_count)]
        channels = [c for c in self.job.channels if c != "code"]
        sm = {
            "SM_HOSTS": json.dumps(hosts), "SM_CURRENT_HOST": hosts[index], "SM_NUM_GPUS": "0",
            "SM_NUM_CPUS": str(os.cpu_count() or 1), "SM_MODEL_DIR": str(paths["model"]),
            "SM_OUTPUT_DATA_DIR": str(paths["output_data"]), "SM_CHANNELS": json.dumps(channels),
            "SM_HPS": json.dumps(self.job.hyperparameters), "SM_MODULE_DIR": str(paths["code"]),
            "SM_USER_ENTRY_POINT": self.job.entry_point,
            **{f"SM_CHANNEL_{c.upper()}": str(paths[f"channel_{c}"]) for c in channels},
        }
        return {**os.environ, **self.job.environment, **sm, "OMP_NUM_THREADS": "1"}

    def _command(self, index: int, paths: Mapping[str, Path], port: int) -> list[str]:
        args = [part for name, value in self.job.hyperparameters.items() for part in (f"--{name}", value)]
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.job.instance_count}",
                "--nproc_per_node=1", f"--node_rank={index}", "--master_addr=127.0.0.1", f"--master_port={port}",
                "--max-restarts=0", str(paths["code"] / self.job.entry_point),
                "--checkpoint_dir", str(paths["checkpoints"]), *args]

    # ---- running ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        shutil.rmtree(self.out / "instances", ignore_errors=True)
        shutil.rmtree(self.checkpoint_prefix, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.prepare_inputs()
        pending = list(self.interrupt_at)
        while True:
            attempt = Attempt(number=len(self.attempts) + 1)
            self.attempts.append(attempt)
            finished = self._run_attempt(attempt, pending[0] if pending else None)
            if finished:
                break
            pending.pop(0)
        return self.report(time.monotonic() - started)

    def _run_attempt(self, attempt: Attempt, interrupt_at: int | None) -> bool:
        instances = [self._fresh_instance(i) for i in range(self.job.instance_count)]
        port = free_port()
        logs = [(self.logs / f"attempt-{attempt.number}-algo-{i + 1}.log").open("w") for i in range(len(instances))]
        processes = [subprocess.Popen(self._command(i, p, port), env=self._environment(i, p), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
                     for i, (p, log) in enumerate(zip(instances, logs))]
        sync = CheckpointSync([p["checkpoints"] for p in instances], self.checkpoint_prefix)
        sync.start()
        main_log = self.logs / f"attempt-{attempt.number}-algo-1.log"
        try:
            while any(p.poll() is None for p in processes):
                self._read_progress(attempt, main_log)
                if interrupt_at is not None and attempt.last_step >= interrupt_at:
                    self._interrupt(attempt, processes, instances[0]["checkpoints"], sync)
                    return False
                if any(p.poll() not in (None, 0) for p in processes):
                    break
                time.sleep(0.01)
        finally:
            sync.stop()
            for log in logs:
                log.close()
        for process in processes:
            if process.poll() is None:
                signal_tree(process.pid, signal.SIGKILL)
            attempt.returncodes.append(process.wait())
        self._read_progress(attempt, main_log)
        sync.sync_once()
        if any(attempt.returncodes):
            raise LocalRunError(f"the training job failed (exit codes {attempt.returncodes}); logs: {self.logs}")
        self._upload_outputs(instances[0])
        return True

    def _read_progress(self, attempt: Attempt, log: Path) -> None:
        text = log.read_text() if log.exists() else ""
        steps = [int(m) for m in re.findall(self.step_regex, text)]
        attempt.last_step = max(steps, default=attempt.last_step)
        resumed = _RESUMED.search(text)
        if resumed:
            attempt.resumed_from = int(resumed.group(1))

    def _interrupt(self, attempt: Attempt, processes, checkpoints: Path, sync: CheckpointSync) -> None:
        """Spot reclaim: SIGTERM everywhere, a grace period, one last upload, then SIGKILL everything."""
        attempt.interrupted = True
        attempt.interrupted_during_save = any(not (d / "COMPLETE.json").exists() for d in checkpoints.glob("step-*"))
        for process in processes:
            signal_tree(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            time.sleep(0.02)
        sync.stop()
        sync.sync_once()
        for process in processes:
            signal_tree(process.pid, signal.SIGKILL)
            attempt.returncodes.append(process.wait())
        self._read_progress(attempt, self.logs / f"attempt-{attempt.number}-algo-1.log")

    def _upload_outputs(self, main_instance: Mapping[str, Path]) -> None:
        """SageMaker uploads SM_MODEL_DIR and SM_OUTPUT_DATA_DIR of the first host at the end."""
        target = self.s3.path(f"s3://{LOCAL_BUCKET}/outputs/{EXECUTION_ID}/output/")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(main_instance["model"], target / "model")
        shutil.copytree(main_instance["output_data"], target / "data")

    # ---- report -----------------------------------------------------------------------------------
    def report(self, wall_seconds: float) -> dict[str, Any]:
        outputs = self.s3.path(f"s3://{LOCAL_BUCKET}/outputs/{EXECUTION_ID}/output/")
        summary = json.loads((outputs / "data" / "summary.json").read_text())
        all_logs = "\n".join(p.read_text() for p in sorted(self.logs.glob("attempt-*-algo-1.log")))
        matches = {m["Name"]: len(re.findall(m["Regex"], all_logs)) for m in self.job.metric_definitions}
        resumed = [a.resumed_from for a in self.attempts[1:]]
        lost = sum(a.last_step - (b.resumed_from or 0) for a, b in zip(self.attempts, self.attempts[1:]))
        return {
            "interruptions": sum(a.interrupted for a in self.attempts),
            "interrupted_at_steps": [a.last_step for a in self.attempts if a.interrupted],
            "interrupted_during_save": [a.interrupted_during_save for a in self.attempts if a.interrupted],
            "resumed_from_steps": resumed,
            "final_step": summary["final_step"],
            "final_loss": summary["final_loss"],
            "lost_steps": lost,
            "wall_seconds": round(wall_seconds, 2),
            "instance_count": self.job.instance_count,
            "entry_point": self.job.entry_point,
            "hyperparameters": self.job.hyperparameters,
            "checkpoint_s3_uri": self.job.checkpoint_s3_uri,
            "checkpoints_in_s3": sorted((p.name for p in self.checkpoint_prefix.glob("step-*")),
                                        key=lambda n: int(n.split("-")[1])),
            "model_s3_path": str(outputs / "model"),
            "final_parameters_sha256": parameters_digest(outputs / "model" / "model.safetensors"),
            "metric_definitions_matched": matches,
            "metric_definitions_ok": all(matches.values()),
        }


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
    lines = [
        f"local run: {report['instance_count']} instances, {report['interruptions']} interruption(s) "
        f"at steps {report['interrupted_at_steps']} (during a checkpoint write: {report['interrupted_during_save']})",
        f"  resumed from steps {report['resumed_from_steps']}; steps redone: {report['lost_steps']}",
        f"  final step {report['final_step']}, final loss {report['final_loss']:.6f}, "
        f"wall time {report['wall_seconds']:.1f} s",
        f"  checkpoints in local S3: {', '.join(report['checkpoints_in_s3'])}",
        f"  model: {report['model_s3_path']} (parameters sha256 {report['final_parameters_sha256'][:16]}...)",
        "  metric definitions vs trainer log lines: "
        + ", ".join(f"{name} {'ok' if n else 'NO MATCH'} ({n})" for name, n in report["metric_definitions_matched"].items()),
    ]
    return "\n".join(lines)


def local_run(config: TrainingConfig, *, steps: int, interrupt_at: Sequence[int], out: Path,
              trainer_dir: Path) -> dict[str, Any]:
    job, _ = build_job(config, steps, trainer_dir)
    for step in interrupt_at:
        if not 0 < step < steps:
            raise LocalRunError(f"--interrupt-at-step {step}: must be between 1 and --steps - 1 ({steps - 1})")
    report = LocalRun(job, out, trainer_dir, interrupt_at).run()
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
