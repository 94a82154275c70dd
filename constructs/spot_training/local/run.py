"""A local run of the training step: attempts on fresh instances until the job ends, emulated interruptions
between them, a stop of local-run in any phase, and a run in the same --out resumed from its checkpoints."""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spot_training.config.capacity import ON_DEMAND, RUN_ID_PARAMETER, RUN_STARTED_AT_PARAMETER, SPOT, Decision, decide
from spot_training.config.ladder import plan_for, rung_config
from spot_training.config.settings import TrainingConfig
from spot_training.local.instances import GRACE_SECONDS, Instances, start_container
from spot_training.local.jobs import (CLIMBED_EXECUTION_ID, EXECUTION_ID, LOCAL_BUCKET, Attempt, Interruption,
                                      LocalRunError,
                                      LocalRunStopped, ProcessingJob, TrainingJob, build_job, job_fingerprint,
                                      preparation_resolver, save_in_progress)
from spot_training.local.processes import signal_tree
from spot_training.local.evaluation import REGISTRATION_FILE, evaluate_and_gate, has_evaluation, training_properties
from spot_training.local.evaluation import model_uri as evaluation_model_uri
from spot_training.local.processing import fingerprint_parameter, run_preparation, with_data_fingerprint
from spot_training.local.report import build_report
from spot_training.local.storage import CheckpointSync, LocalS3, write_json

_RESUMED = re.compile(r"\[start\] resuming at step (\d+)")
STATE_FILE = "run.json"
NextRung = tuple[Decision, TrainingJob | None, dict[str, Any] | None, dict[str, Any] | None]
LOCK_FILE = ".local-run.lock"


class LocalRun:
    def __init__(self, job: TrainingJob, out: Path, trainer_dir: Path, interrupt_at: Sequence[int | Interruption], *,
                 processes_per_host: int = 1, previous_attempts: Sequence[Attempt] = (),
                 preparation: ProcessingJob | None = None,
                 preparation_with: Callable[[Mapping[str, Any]], ProcessingJob | None] | None = None,
                 definition: Mapping[str, Any] | None = None, values: Mapping[str, Any] | None = None,
                 training_done: bool = False, next_rung: Callable[[], NextRung] | None = None,
                 rung: str = "") -> None:
        self.job, self.out, self.trainer_dir = job, out, trainer_dir
        # The capacity ladder: what the controller does when the job ends for capacity, and where the run is.
        self.next_rung, self.rung, self.execution = next_rung, rung, EXECUTION_ID
        self.climb: dict[str, Any] | None = None
        self.processes_per_host = processes_per_host
        self.training_done = training_done  # a resumed run whose training finished goes on with the evaluation
        self.definition, self.values = definition, dict(values or {})  # for the steps after training
        self.evaluation: dict[str, Any] | None = None
        self.preparation = preparation
        self.preparation_with = preparation_with  # the step resolved with more parameter values
        self.preparation_report: dict[str, Any] | None = None
        self.interrupt_at = sorted(i if isinstance(i, Interruption) else Interruption(i) for i in interrupt_at)
        self.s3 = LocalS3(out / "s3")
        self.checkpoint_prefix = self.s3.path(job.checkpoint_s3_uri)
        self.attempts: list[Attempt] = list(previous_attempts)
        self.logs = out / "logs"
        self.instances = Instances(job, out, self.s3, processes_per_host=processes_per_host)
        self.processes: list[subprocess.Popen] = []
        # Progress comes from the same regex the pipeline's `train:step` metric definition uses.
        self.step_regex = next(m["Regex"] for m in job.metric_definitions if m["Name"] == "train:step")
        self.phase = "the start"  # what local-run is doing, for the message of a stop

    # ---- setup ------------------------------------------------------------------------------------
    def prepare_inputs(self) -> None:
        """Make a tiny model and dataset at the channels' "S3" locations unless something is there, and put
        the code archive that synth uploads as the CDK asset where the code channel points."""
        from spot_training.definition.trainer_code import deterministic_tarball
        from spot_training.local.tiny import conversations, corpus, make_jsonl_channel, make_model_dir

        raw = {name: uri for name, (uri, _) in self.preparation.inputs.items()} if self.preparation \
            else self.job.channels
        model, texts = self.s3.path(self.job.channels["model"]), corpus(400)
        command = self.preparation.command if self.preparation else []
        data_format = command[command.index("--data_format") + 1] if "--data_format" in command else "text"
        chat = data_format == "chat"  # auto and text runs get text, as before instruction formats
        if not (model.exists() and any(model.iterdir())):
            make_model_dir(model, text_corpus=texts + [m["content"] for c in conversations(100) for m in c["messages"]]
                           if chat else texts, chat=chat)
        # The validation channel exists when the config asks for one (TrainingConfig.validation_data).
        if chat:
            splits = {"train": conversations(400), "validation": conversations(40, seed=12)}
        elif data_format == "prompt_completion":
            splits = {split: [{"prompt": " ".join(c["messages"][1]["content"].split()),
                               "completion": c["messages"][2]["content"]} for c in chats]
                      for split, chats in (("train", conversations(400)), ("validation", conversations(40, seed=12)))}
        else:
            splits = {"train": [{"text": t} for t in texts], "validation": [{"text": t} for t in corpus(40, seed=11)]}
        for split in (name for name in splits if name in raw):
            folder = self.s3.path(raw[split])
            if not (folder.exists() and any(folder.iterdir())):
                make_jsonl_channel(folder, splits[split])
        code = self.s3.path(self.job.channels["code"])
        code.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(deterministic_tarball(self.trainer_dir), code)

    # ---- running ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.attempts:
            self.phase = "the inputs' creation"
            self.prepare_inputs()
            if self.preparation is not None:
                self.phase = f"the {self.preparation.name} step"
                if self.preparation_with is not None:
                    self.preparation = with_data_fingerprint(self.preparation, self.preparation_with, self.s3)
                self.preparation_report = run_preparation(self.preparation, s3=self.s3, out=self.out,
                                                          logs=self.logs, running=self._running, stop=self.stop)
        if self.preparation is not None:  # the execution's parameter, for the steps after training too
            for name, value in fingerprint_parameter(self.preparation, self.s3).items():
                self.values.setdefault(name, value)  # a --parameter DataFingerprint given by hand stays
        reached = max((a.last_step for a in self.attempts), default=0)
        pending = [i for i in self.interrupt_at if i.step > reached]
        if any(a.ended_for_capacity for a in self.attempts):  # resumed after the climb: the run is on the next rung
            self._climb()
        while not self.training_done:
            attempt = Attempt(number=len(self.attempts) + 1, execution=self.execution, rung=self.rung)
            self.attempts.append(attempt)
            self._save_state(finished=False)
            self.training_done = self._run_attempt(attempt, pending[0] if pending else None)
            if not self.training_done and pending.pop(0).capacity:
                attempt.ended_for_capacity = True
            self._save_state(finished=False)
            if attempt.ended_for_capacity:
                self._climb()
        if self.definition is not None and has_evaluation(self.definition):
            self.phase = "the Evaluate step"
            # TrainingTimeInSeconds: the training job's attempts, not the preparation before them.
            properties = training_properties(evaluation_model_uri(), int(sum(a.seconds for a in self.attempts)))
            self.evaluation = evaluate_and_gate(self.definition, self.values, properties, s3=self.s3, out=self.out,
                                                logs=self.logs, running=self._running, stop=self.stop)
        self._save_state(finished=True)
        report = build_report(self.job, self.attempts, instances=self.instances, logs=self.logs,
                              outputs=self.outputs_path(), checkpoint_prefix=self.checkpoint_prefix,
                              preparation=self.preparation_report, evaluation=self.evaluation,
                              wall_seconds=time.monotonic() - started)
        return {**report, "capacity_climb": self.climb} if self.climb else report

    def _climb(self) -> None:
        """The training job ended MaxWaitTimeExceeded: the controller's decision, and the run's next execution on
        the rung it chose, whose training step must restore this run's checkpoints."""
        self.phase = "the capacity ladder's climb"
        decision, job, definition, values = self.next_rung()
        if decision.action != "climb":
            raise LocalRunError(f"the training job ended MaxWaitTimeExceeded and the capacity ladder stops the run: "
                                f"{decision.reason}")
        if self.s3.path(job.checkpoint_s3_uri) != self.checkpoint_prefix:
            raise LocalRunError(f"the next rung's training step restores {job.checkpoint_s3_uri}, not the run's "
                                f"checkpoints; it would start over")
        if self.preparation is not None:  # its PrepareData step is a cache hit: the same arguments and code
            job = dataclasses.replace(job, input_data_config=self.job.input_data_config)
        self.job, self.definition, self.values = job, definition, {**self.values, **values}
        self.instances = Instances(job, self.out, self.s3, processes_per_host=self.processes_per_host)
        self.execution, self.rung = CLIMBED_EXECUTION_ID, decision.rung.name
        self.climb = {"reason": decision.reason, "rung": self.rung, "execution": self.execution,
                      "run_id": values[RUN_ID_PARAMETER], "checkpoint_s3_uri": job.checkpoint_s3_uri}

    def _running(self, processes: list[subprocess.Popen]) -> None:
        self.processes = processes

    def _run_attempt(self, attempt: Attempt, interruption: Interruption | None) -> bool:
        self.phase = f"the set-up of attempt {attempt.number}'s instances"
        instances = [self.instances.fresh(i, self.checkpoint_prefix) for i in range(self.job.instance_count)]
        logs = [(self.logs / f"attempt-{attempt.number}-algo-{i + 1}.log").open("w") for i in range(len(instances))]
        sync = CheckpointSync([self.instances.in_instance(b, self.job.checkpoint_local_path) for b in instances],
                              self.checkpoint_prefix)
        main_checkpoints = self.instances.in_instance(instances[0], self.job.checkpoint_local_path)
        self.processes = []
        began = time.monotonic()
        try:
            for base, log in zip(instances, logs):
                self.processes.append(start_container(self.instances.container_command(base),
                                                      env=self.instances.environment(base),
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
            attempt.seconds += time.monotonic() - began
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
        silent = [host for host, base in zip(self.instances.hosts, instances) if not (base / "output" / "success").is_file()]
        if silent:  # the toolkit writes output/success when the job succeeded (sagemaker-training files.py)
            raise LocalRunError(f"the launcher on {', '.join(silent)} exited 0 without reporting success "
                                f"(no /opt/ml/output/success); logs: {self.logs}")
        self.phase = "the model upload"
        self._upload_outputs(instances[0])
        return True

    # ---- the preparation step ---------------------------------------------------------------------------
    def _failure(self, instances: Sequence[Path], attempt: Attempt) -> str:
        """Like a training job's FailureReason: the toolkit's `output/failure` of the first failed host."""
        for host, base, code in zip(self.instances.hosts, instances, attempt.returncodes):
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
        checkpoints = self.instances.in_instance(main_instance, self.job.checkpoint_local_path)
        attempt.interrupted_during_save = save_in_progress(checkpoints)
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
        write_json(self.out / STATE_FILE, {"job": job_fingerprint(self.job), "finished": finished,
                                            "training_done": self.training_done,
                                            "attempts": [dataclasses.asdict(a) for a in self.attempts]})

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
              interrupt_during_save: Sequence[int] = (), parameters: Mapping[str, str] | None = None,
              capacity_failure_at: int | None = None, on_resume=lambda message: None) -> dict[str, Any]:
    """Run (or resume) the training step locally in `out`; returns the report, also written to report.json.

    Each step of `interrupt_at` interrupts once it is reached; each of `interrupt_during_save` interrupts during
    the first checkpoint write of that step or a later one. `parameters` override pipeline parameters as
    `start-pipeline-execution --pipeline-parameters` does (on top of the CPU-sized local ones).

    `capacity_failure_at`: once that step is reached the instances are reclaimed and spot capacity never comes back,
    so the job ends MaxWaitTimeExceeded; the capacity ladder (training.capacity_ladder) then decides as its controller
    does, and the run's next execution on the rung it chose (the on-demand pipeline's definition, or the spot one on
    another type) resumes from the run's checkpoints.

    `out` holds one run at a time: a run in progress there (another local-run) is refused; an unfinished run
    (local-run was stopped or killed) of the same job is resumed from its checkpoints unless `restart`; a
    finished one is replaced."""
    if not config.region:  # no cdk.json here: the region only names the image and sagemaker_region
        config = dataclasses.replace(config, region=os.environ.get("AWS_REGION") or "us-east-1")
    given, out = out, out.resolve()  # the instances run in their own folders: every path must be absolute
    if capacity_failure_at is not None and not config.capacity_ladder:
        raise LocalRunError("--capacity-failure-at-step: training.capacity_ladder is off, so nothing would climb (the job "
                            "ends MaxWaitTimeExceeded and the run waits for `spot-training start --resume-run`); pass "
                            "-c training.capacity_ladder=true")
    for flag, chosen in (("--interrupt-at-step", interrupt_at), ("--interrupt-during-save", interrupt_during_save),
                         ("--capacity-failure-at-step", [capacity_failure_at] if capacity_failure_at else [])):
        for step in chosen:
            if not 0 < step < steps:
                raise LocalRunError(f"{flag} {step}: must be between 1 and --steps - 1 ({steps - 1})")
    interruptions = [Interruption(s) for s in interrupt_at] + [Interruption(s, True) for s in interrupt_during_save]
    interruptions += [Interruption(capacity_failure_at, capacity=True)] if capacity_failure_at else []
    with StopSignals():
        try:
            job, definition, values = build_job(rung_config(config, SPOT), steps, trainer_dir, parameters)
        except KeyboardInterrupt:
            raise LocalRunStopped("stopped while building the pipeline definition; nothing was started") from None
        try:
            return _run_locked(job, definition, values, interrupt_at=interruptions, out=out, given=given,
                               trainer_dir=trainer_dir, processes_per_host=processes_per_host, restart=restart,
                               on_resume=on_resume, rung=plan_for(config).rungs[0].name if config.use_spot else "",
                               next_rung=lambda: _next_rung(config, steps, trainer_dir, parameters))
        except KeyboardInterrupt:  # between phases: nothing of this run is running
            raise LocalRunStopped(f"stopped; run again with --out {given} to go on") from None


def _next_rung(config: TrainingConfig, steps: int, trainer_dir: Path,
               parameters: Mapping[str, str] | None) -> NextRung:
    """What the controller decides when the run's first execution (the ladder's first rung) ended MaxWaitTimeExceeded
    at its MaxWait, and the run's next execution on the chosen rung: the same RunId and RunStartedAt, the rung's
    pipeline definition (the local run keeps its CPU instance type on every rung)."""
    plan = plan_for(config)
    first = plan.rungs[0]
    decision = decide(plan.rungs, first.name, "MaxWaitTimeExceeded: no spot capacity came back (emulated)",
                      hours_since_start=first.hours, slo_hours=plan.slo_hours)
    if decision.action != "climb":
        return decision, None, None, None
    started = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=first.hours)
    run_id = (parameters or {}).get(RUN_ID_PARAMETER) or EXECUTION_ID  # the first execution's run
    climbed = {**(parameters or {}), RUN_ID_PARAMETER: run_id, RUN_STARTED_AT_PARAMETER: started.isoformat()}
    job, definition, values = build_job(rung_config(config, ON_DEMAND if decision.rung.capacity == ON_DEMAND else SPOT),
                                        steps, trainer_dir, climbed, execution_id=CLIMBED_EXECUTION_ID)
    return decision, job, definition, values


def _run_locked(job: TrainingJob, definition: Mapping[str, Any], values: Mapping[str, Any], *,
                interrupt_at: Sequence[Interruption],
                out: Path, given: Path, trainer_dir: Path, processes_per_host: int, restart: bool,
                on_resume, rung: str = "", next_rung: Callable[[], NextRung] | None = None) -> dict[str, Any]:
    preparation_with = preparation_resolver(definition, values)
    preparation = preparation_with({})
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOCK_FILE).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel however we end
        except BlockingIOError:
            raise LocalRunError(f"--out {given}: another local-run is using this folder; wait for it to end or "
                                "choose another --out") from None
        previous, training_done = _previous_attempts(out, given, job, restart)
        if not previous:
            for leftover in ("instances", "processing", "evaluation", "logs", "report.json", STATE_FILE,
                             REGISTRATION_FILE):
                path = out / leftover
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            _clear_s3_but_prepared(out / "s3")
        run = LocalRun(job, out, trainer_dir, interrupt_at, processes_per_host=processes_per_host,
                       previous_attempts=previous, preparation=preparation, preparation_with=preparation_with,
                       definition=definition, values=values, training_done=training_done, next_rung=next_rung,
                       rung=rung)
        if previous and training_done:
            on_resume(f"resuming the unfinished run in {given}: its training finished (step "
                      f"{max(a.last_step for a in previous)}),"
                      " so it goes on with the steps after it; pass --restart to start over")
        elif previous:
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
        write_json(out / "report.json", report)
    return report


def _clear_s3_but_prepared(root: Path) -> None:
    """A new run starts from an empty local S3, except what the step cache may reuse: prepared/ (in S3 too,
    a new execution of the pipeline finds what earlier ones prepared)."""
    from spot_training.config.layout import PREFIXES

    bucket = root / LOCAL_BUCKET
    for path in (root.iterdir() if root.is_dir() else []):
        if path != bucket:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in (bucket.iterdir() if bucket.is_dir() else []):
        if path.name != PREFIXES["prepared"].rstrip("/"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _previous_attempts(out: Path, given: Path, job: TrainingJob, restart: bool) -> tuple[list[Attempt], bool]:
    """The attempts of an unfinished run of the same job in `out` and whether its training finished, to resume;
    ([], False) to start afresh."""
    state_path = out / STATE_FILE
    if restart or not state_path.is_file():
        return [], False
    try:
        state = json.loads(state_path.read_text())
        attempts = [Attempt(**a) for a in state["attempts"]]
        finished, fingerprint = state["finished"], state["job"]
        training_done = bool(state.get("training_done", False))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise LocalRunError(f"--out {given}: unreadable {STATE_FILE} ({error}); pass --restart to discard "
                            "that run") from None
    if finished or not attempts:
        return [], False
    if fingerprint != job_fingerprint(job):
        raise LocalRunError(f"--out {given}: holds an unfinished run of a different job (other steps or "
                            "settings); pass --restart to discard it, or choose another --out")
    if not attempts[-1].interrupted and not training_done:
        attempts[-1].stopped = True  # it ended with local-run, not with an emulated interruption
    return attempts, training_done
