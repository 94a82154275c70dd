"""`spot-training local-run`: the deployed training step, run locally with simulated spot interruptions."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spot_training.cli import load_config
from spot_training.local.jobs import CPU_PARAMETERS, build_job, preparation_resolver
from spot_training.local.processing import cache_key, with_data_fingerprint
from spot_training.local.run import LocalRun
from spot_training.local.run import local_run as run_in_process
from spot_training.definition.trainer_code import default_trainer_dir
from tests.conftest import ROOT
from tests.trainer.harness import SLOW_IO


def local_run(out, *args, env=None):
    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "local-run", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), done.stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run with a relative --out, as `make local` passes it: the instances run in folders of their own."""
    out = tmp_path_factory.mktemp("reference")
    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "local-run", "--out", os.path.relpath(out, ROOT),
                           "--steps", "8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), done.stdout


def test_the_job_is_the_deployed_training_step_with_cpu_parameter_overrides():
    job, definition, _ = build_job(load_config(ROOT / "cdk.json"), 8, default_trainer_dir())
    assert job.entry_point == "train.py" and job.instance_count == 2
    assert job.checkpoint_s3_uri == "s3://local-artifact-bucket/checkpoints/local-execution/"
    assert set(job.channels) == {"train", "model", "code"}
    assert job.environment["HF_HUB_OFFLINE"] == "1"
    assert job.user_hyperparameters["max_steps"] == 8
    assert job.user_hyperparameters["sequence_length"] == CPU_PARAMETERS["SequenceLength"]
    assert job.user_hyperparameters["strategy"] == "auto"
    assert job.user_hyperparameters["activation_checkpointing"] == "auto"
    assert not any(name.startswith("sagemaker_") for name in job.user_hyperparameters)
    step = next(s for s in definition["Steps"] if s["Type"] == "Training")
    assert set(job.hyperparameters) == set(step["Arguments"]["HyperParameters"])
    assert job.hyperparameters["sagemaker_torch_distributed_enabled"] == "true"
    assert job.metric_definitions == step["Arguments"]["AlgorithmSpecification"]["MetricDefinitions"]


def test_each_instance_gets_the_opt_ml_tree_sagemaker_writes_and_the_toolkit_reads(uninterrupted):
    report, _ = uninterrupted
    out = Path(report["model_s3_path"]).parents[5]
    job, _, _ = build_job(load_config(ROOT / "cdk.json"), 8, default_trainer_dir())
    for index, host in enumerate(["127.0.0.1", "127.0.0.2"]):
        opt_ml = out / "instances" / f"algo-{index + 1}" / "opt" / "ml"
        config = opt_ml / "input" / "config"
        hyperparameters = json.loads((config / "hyperparameters.json").read_text())
        assert set(hyperparameters) == set(job.hyperparameters)
        assert json.loads(hyperparameters["sagemaker_submit_directory"]) == str(
            opt_ml / "input" / "data" / "code" / "trainer.tar.gz")
        resources = json.loads((config / "resourceconfig.json").read_text())
        assert resources["current_host"] == host and resources["hosts"] == ["127.0.0.1", "127.0.0.2"]
        assert resources["current_instance_type"] == CPU_PARAMETERS["InstanceType"]
        assert resources["network_interface_name"] == "lo"  # what the emulated instances share
        channels = json.loads((config / "inputdataconfig.json").read_text())
        assert set(channels) == {"train", "model", "code"}
        assert (opt_ml / "code" / "train.py").is_file(), "the toolkit extracted sagemaker_submit_directory"
        assert (opt_ml / "output" / "success").is_file(), "the toolkit reported success"
    log = (out / "logs" / "attempt-1-algo-1.log").read_text()
    assert "[network] gloo on interface lo" in log  # the toolkit's NCCL_SOCKET_IFNAME, followed by gloo


def test_the_toolkit_built_the_torchrun_command_and_the_report_names_its_versions(uninterrupted):
    from tests.test_image_environment import image_pins

    report, stdout = uninterrupted
    launcher = report["launcher"]
    assert launcher["sagemaker-training"] == image_pins()["sagemaker-training"]
    assert launcher["sagemaker-pytorch-training"] == image_pins()["sagemaker-pytorch-training"]
    assert launcher["torch"] == image_pins()["torch"]
    assert launcher["SAGEMAKER_TRAINING_MODULE"] == "sagemaker_pytorch_container.training:main"
    assert report["launch_command"].startswith(
        "torchrun --nnodes 2 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 7777 --node_rank 0 train.py ")
    assert "--max_steps 8" in report["launch_command"] and "sagemaker_" not in report["launch_command"]
    assert f"sagemaker-training {launcher['sagemaker-training']}" in stdout


def test_uninterrupted_run_reports_its_run(uninterrupted):
    report, stdout = uninterrupted
    assert report["interruptions"] == 0 and report["resumed_from_steps"] == [] and report["lost_steps"] == 0
    assert report["final_step"] == 8 and report["wall_seconds"] > 0
    assert "local run: 2 instances (127.0.0.1, 127.0.0.2), 0 interruption(s)" in stdout


def test_a_chat_dataset_fine_tunes_with_lora_through_two_interruptions_and_a_climb_to_on_demand_bit_identically(
        tmp_path):
    """The pipeline's own steps on chat data with LoRA: PrepareData renders and packs the conversations under the
    data contract, and the training step (on the image's launcher) trains the adapters through two spot reclaims
    (one in the middle of a checkpoint write) and a third after which spot capacity never comes back: the job
    ends MaxWaitTimeExceeded, the capacity ladder climbs, and the run's on-demand execution restores the run's
    checkpoints. It ends bit-identical to the same run never interrupted, with the adapter in peft's format."""
    chat_lora = ("-c", "training.data_format=chat", "-c", "training.method=lora")
    reference, _ = local_run(tmp_path / "reference", "--steps", "8", *chat_lora)
    slow = {"PYTHONPATH": str(SLOW_IO), "SLOW_CHECKPOINT_FLAG": str(tmp_path / "writing"),
            "SLOW_CHECKPOINT_SECONDS": "0.2"}
    # The capacity failure comes at step 5, leaving the attempt it ends several steps to run: an interruption due
    # at the last steps could find the attempt done first (the emulation polls the trainer's log).
    report, stdout = local_run(tmp_path / "run", "--steps", "8", "--interrupt-at-step", "2",
                               "--interrupt-during-save", "3", "--capacity-failure-at-step", "5",
                               "-c", "training.capacity_ladder=true", *chat_lora, env=slow)
    assert report["interruptions"] == 3, report["interrupted_at_steps"]
    assert report["interrupted_during_save"][1] is True  # waited for the write of step 4 (every 2 steps)
    assert report["interrupted_at_steps"][1] >= 3 and report["interrupted_at_steps"][2] >= 5
    # An interruption that lands before the first checkpoint completes restarts from step 0 (None); the
    # later ones always find a complete checkpoint.
    assert len(report["resumed_from_steps"]) == 3 and report["resumed_from_steps"][-1] is not None
    assert report["final_step"] == 8
    assert (report["final_loss"], report["final_parameters_sha256"]) == (reference["final_loss"],
                                                                         reference["final_parameters_sha256"])
    assert "resumed from steps" in stdout
    # The climb: the first execution (spot) ended for capacity after its third attempt; the second, from the
    # on-demand pipeline's definition, is another execution of the same run and restored that run's checkpoints.
    assert report["executions"] == [
        {"execution": "local-execution", "rung": "spot:ml.p4d.24xlarge", "attempts": [1, 2, 3],
         "ended": "MaxWaitTimeExceeded"},
        {"execution": "local-execution-rung-2", "rung": "on-demand:ml.p4d.24xlarge", "attempts": [4], "ended": None}]
    climb = report["capacity_climb"]
    assert climb["run_id"] == "local-execution" and climb["execution"] != climb["run_id"]
    assert report["checkpoint_s3_uri"] == climb["checkpoint_s3_uri"] == (
        "s3://local-artifact-bucket/checkpoints/local-execution/")
    assert climb["reason"].startswith("MaxWaitTimeExceeded on spot:ml.p4d.24xlarge after ")
    assert "  capacity ladder: execution local-execution on spot:ml.p4d.24xlarge ended MaxWaitTimeExceeded" in stdout
    # LoRA on chat data, from the definition: the data contract, the adapters, the evaluation of the merged model.
    assert "--method lora" in report["launch_command"] and report["hyperparameters"]["lora_rank"] == 16
    (contract,) = report["preparation"]["result"]["contract"]["train"]
    assert contract["examples"] == 400 and contract["untrained_examples"] == 0
    assert "  data contract, train: part-000.jsonl 400 examples" in stdout
    adapter = Path(report["model_s3_path"]) / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert report["evaluation"]["gate"]["passed"]
    # The interruption signalled each container's first process only, as SageMaker does: the platform's entry
    # point passed it to the trainer, which stopped at the end of its step (no SIGTERM reached it any other way).
    # (A signal that lands after the last step finds the trainer exporting: it completes, so the check is that
    # every interrupted attempt's trainer got the signal, and that it stopped early in at least one. A save in
    # flight can outlast the 2 s grace, so the check is the trainer's line before it waits for that save.)
    interrupted = [(tmp_path / "run" / "logs" / f"attempt-{n}-algo-1.log").read_text() for n in (1, 2, 3)]
    assert all(re.search(r"^\[container\] SIGTERM: passed to the trainer processes \[\d+\]$", log, re.M)
               for log in interrupted)
    assert any(re.search(r"^\[stop\] SIGTERM: stopping after step \d+", log, re.M) for log in interrupted)


def test_every_metric_definition_matches_the_trainers_log_lines(uninterrupted):
    report, _ = uninterrupted
    assert report["metric_definitions_ok"] is True
    assert all(count >= 1 for count in report["metric_definitions_matched"].values())
    assert set(report["metric_definitions_matched"]) == {
        "train:step", "train:loss", "train:learning_rate", "train:tokens_per_second", "validation:loss",
        "checkpoint:blocked_seconds"}


@pytest.mark.parametrize("flag", ["--interrupt-at-step", "--interrupt-during-save", "--capacity-failure-at-step"])
def test_interrupt_step_outside_the_run_is_refused_in_one_line(tmp_path, flag):
    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "local-run", "--steps", "5",
                           flag, "9", "--out", str(tmp_path), "-c", "training.capacity_ladder=true"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {flag} 9: must be between 1 and --steps - 1 (4)"


def test_a_capacity_failure_without_the_ladder_is_refused_before_anything_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "local-run", "--steps", "5",
                           "--capacity-failure-at-step", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and not any(tmp_path.iterdir())
    assert done.stderr.strip().startswith("error: --capacity-failure-at-step: training.capacity_ladder is off, so "
                                          "nothing would climb")


def test_compare_runs_says_identical_for_the_same_report(uninterrupted, tmp_path):
    folder = Path(uninterrupted[0]["model_s3_path"]).parents[5]
    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "compare-runs", str(folder), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "bit-identical" in done.stdout
    assert re.search(r"final loss: reference [\d.]+ \(0 interruptions\)", done.stdout)


def test_compare_runs_has_a_tolerance_mode_for_gpu_runs(tmp_path):
    """Model folders (an exported model synced from S3) compared exactly, and within a relative tolerance:
    GPU runs are not bit-exact (README, "Exactness")."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    weights = {"a.weight": torch.randn(64, 32, generator=generator), "b.weight": torch.randn(32, generator=generator)}
    for name, scale in (("reference", 0.0), ("candidate", 1e-4)):
        folder = tmp_path / name / "model"
        folder.mkdir(parents=True)
        save_file({k: v + scale * v.abs().mean() for k, v in weights.items()}, str(folder / "model.safetensors"))
        (tmp_path / name / "data").mkdir()
        (tmp_path / name / "data" / "summary.json").write_text(json.dumps({"final_loss": 2.0 * (1 + scale)}))

    def compare(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "spot_training.cli", "compare-runs", str(tmp_path / "reference"
                                                                                              / "model"),
                               str(tmp_path / "candidate" / "model"), *extra], capture_output=True, text=True,
                              timeout=120)

    exact, loose, tight = compare(), compare("--tolerance", "1e-3"), compare("--tolerance", "1e-6")
    assert exact.returncode == 1 and "final parameters: DIFFERENT" in exact.stdout
    assert loose.returncode == 0 and "final loss: reference 2.000000, candidate 2.000200: within 0.001" in loose.stdout
    assert "final parameters: within 0.001 (largest relative L2 difference" in loose.stdout
    assert tight.returncode == 1 and "DIFFERENT beyond 1e-06" in tight.stdout
    bad = compare("--tolerance", "2")
    assert bad.returncode == 2 and "argument --tolerance: 2.0 must be above 0 and below 1" in bad.stderr


def processes_working_in(folder: Path) -> list[str]:
    """Live processes whose working directory is inside `folder` (every emulated instance's processes are)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(proc.joinpath("cwd").resolve()).startswith(str(folder.resolve())):
                found.append(proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:
            continue
    return found


def start_local_run(out: Path, steps: int, *, pause_in: str | None = None, sigint: object = signal.SIG_DFL
                    ) -> subprocess.Popen:
    """local-run in a process of its own; `pause_in` holds it inside that phase (tests/local_run_paused.py) until
    it is signalled. Ctrl-C reaches a foreground program as SIGINT with the default handler (`sigint`); a
    non-interactive shell starts background jobs with it ignored (signal.SIG_IGN)."""
    command = [sys.executable, "-m", "spot_training.cli", "local-run"]
    env = dict(os.environ)
    if pause_in:
        command = [sys.executable, str(ROOT / "tests" / "local_run_paused.py")]
        env.update(PAUSE_IN=pause_in, PAUSE_FLAG=str(out.parent / f"{out.name}-{pause_in}"), PYTHONPATH=str(ROOT))
    return subprocess.Popen([*command, "--steps", str(steps), "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def wait_for_step(out: Path, attempt: int, step: int, process: subprocess.Popen) -> None:
    log = out / "logs" / f"attempt-{attempt}-algo-1.log"
    wait_for(lambda: log.exists() and f"step={step} " in log.read_text(errors="replace"), process)


def wait_for(ready, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the point to stop at was never reached"
        time.sleep(0.02)


def wait_until_no_process_works_in(out: Path, seconds: float) -> float:
    started = time.monotonic()
    while processes_working_in(out):
        assert time.monotonic() - started < seconds, processes_working_in(out)
        time.sleep(0.1)
    return time.monotonic() - started


def next_attempt(out: Path) -> int:
    """The number of the attempt the next local-run in `out` starts with: a finished run is not resumed."""
    path = out / "run.json"
    state = json.loads(path.read_text()) if path.is_file() else {"finished": True}
    return 1 if state["finished"] else len(state["attempts"]) + 1


def stop_in(out: Path, phase: str, signum: int = signal.SIGINT, **kwargs) -> tuple[str, str]:
    """Start local-run, stop it with `signum` inside `phase`; returns its last line and its output. It must end
    at once with 130, leaving no process behind."""
    process = start_local_run(out, 8, pause_in=None if phase == "training" else phase, **kwargs)
    if phase == "training":
        wait_for_step(out, next_attempt(out), 2, process)
    else:
        wait_for((out.parent / f"{out.name}-{phase}").exists, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr[-3000:]
    assert processes_working_in(out) == []
    return stderr.strip().splitlines()[-1], stdout


def test_a_stop_in_every_phase_ends_every_process_and_the_next_run_resumes_bit_identically(uninterrupted, tmp_path):
    """Ctrl-C or SIGTERM while the definition is built, while the preparation step's container runs (SIGINT
    inherited ignored, as a background job gets it), while the instances are set up, while they train, while
    the model is uploaded and while it is evaluated; a SIGKILL of local-run too. Each run in the same --out goes on from the last.

    The stops from training on happen in a copy of the finished reference run: the new run there finds the
    preparation step's output under the same cache key and skips the step (Pipelines step caching, emulated),
    and its end is the reference's, bit for bit."""
    reference, _ = uninterrupted
    out = tmp_path / "stopped"
    assert stop_in(out, "definition")[0] == "stopped while building the pipeline definition; nothing was started"
    assert stop_in(out, "preparation", sigint=signal.SIG_IGN)[0] == (
        f"stopped during the PrepareData step: ended every process it started; run again with --out {out} to "
        "resume from the newest checkpoint")
    assert stop_in(out, "set-up", signal.SIGTERM)[0].startswith("stopped during the set-up of attempt 1's instances: ")

    out = tmp_path / "again"
    shutil.copytree(Path(reference["model_s3_path"]).parents[5], out)
    shutil.rmtree(out / "logs")  # the new run starts without them; the reference's must not pass for its log
    line, stdout = stop_in(out, "training")
    assert line.startswith("stopped during training (attempt 1): ")
    assert "PrepareData: skipped: Pipelines step caching" in stdout

    killed, attempt = start_local_run(out, 8), next_attempt(out)
    wait_for_step(out, attempt, 5, killed)
    killed.kill()  # SIGKILL: local-run cannot clean up; its instances must still go
    killed.communicate()
    assert wait_until_no_process_works_in(out, 10) < 10

    assert stop_in(out, "upload")[0].startswith("stopped during the model upload: ")
    # Stopped once training finished: the next run goes straight on with the Evaluate step, no new attempt.
    assert stop_in(out, "evaluation")[0].startswith("stopped during the Evaluate step: ")
    attempts = json.loads((out / "run.json").read_text())["attempts"]
    report, stdout = local_run(out, "--steps", "8")
    assert f"resuming the unfinished run in {out}: its training finished (step 8)" in stdout
    assert report["stops"] == 3 and report["interruptions"] == 0
    assert len(json.loads((out / "run.json").read_text())["attempts"]) == len(attempts)
    # The same model evaluated on the same blocks in the same process layout: the reference's figures.
    assert report["evaluation"]["evaluation"]["metrics"] == reference["evaluation"]["evaluation"]["metrics"]
    assert report["final_parameters_sha256"] == reference["final_parameters_sha256"]
    assert report["final_loss"] == reference["final_loss"]


def test_a_folder_another_local_run_is_using_is_refused_in_one_line(tmp_path):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    with (out / ".local-run.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running local-run holds
        done = subprocess.run([sys.executable, "-m", "spot_training.cli", "local-run", "--steps", "5", "--out",
                               str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: --out {out}: another local-run is using this folder; wait for it to end "
                                   "or choose another --out")
    assert sorted(p.name for p in out.iterdir()) == [".local-run.lock"], "nothing else touched"


def test_an_unfinished_run_of_another_job_is_refused_in_one_line(tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"job": {"hyperparameters": {}}, "finished": False,
                                              "attempts": [{"number": 1, "last_step": 3}]}))
    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "local-run", "--steps", "5", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: --out {out}: holds an unfinished run of a different job (other steps or "
                                   "settings); pass --restart to discard it, or choose another --out")


def test_the_preparation_step_ran_from_the_definition(uninterrupted):
    """The PrepareData step of the deployed definition ran first, as SageMaker Processing runs it (its inputs at
    their LocalPaths, its entrypoint unpacking the code archive and running prepare.py, its output uploaded);
    the training channel read the shards."""
    report, stdout = uninterrupted
    out = Path(report["model_s3_path"]).parents[5]
    assert report["preparation"]["skipped"] is False and report["preparation"]["result"]["tokens"]["train"] > 10_000
    processing = out / "processing" / "opt" / "ml" / "processing"
    assert {p.name for p in (processing / "input").iterdir()} == {"train", "model", "code"}
    prepared = out / "s3" / "local-artifact-bucket" / "prepared" / "local-execution" / "train"
    assert json.loads((prepared / "manifest.json").read_text())["dtype"] == "uint16"
    channel = out / "instances" / "algo-1" / "opt" / "ml" / "input" / "data" / "train"
    assert sorted(p.name for p in channel.iterdir()) == ["manifest.json", "shard-00000.npy"]
    assert "PrepareData: tokenized train" in stdout
    # A second run in a --out holding this one skips the step: test_a_stop_in_every_phase_... starts one.


def test_a_validation_channel_is_prepared_and_read_by_the_trainer(tmp_path):
    """validation_data=true: the PrepareData step tokenizes the validation prefix too, the training step's
    `validation` channel holds its shards, and the trainer validates on them instead of a held-out slice."""
    config = dataclasses.replace(load_config(ROOT / "cdk.json"), validation_data=True)
    report = run_in_process(config, steps=4, interrupt_at=[], out=tmp_path, trainer_dir=default_trainer_dir())
    tokens = report["preparation"]["result"]["tokens"]
    assert set(tokens) == {"train", "validation"} and tokens["validation"] > 1000
    channel = tmp_path / "instances" / "algo-1" / "opt" / "ml" / "input" / "data" / "validation"
    assert json.loads((channel / "manifest.json").read_text())["tokens"] == tokens["validation"]
    log = (tmp_path / "logs" / "attempt-1-algo-1.log").read_text()
    assert re.search(r"^\[data\] train=\d+ blocks of 33 tokens validation=\d+ blocks from the validation channel$",
                     log, re.M), log[-2000:]
    assert re.search(r"^\[validation\] step=4 loss=", log, re.M)
    assert re.fullmatch(r"[0-9a-f]{32}", report["preparation"]["result"]["data_fingerprint"])


def test_the_run_ends_with_the_evaluation_and_the_gate_of_the_definition_and_the_registration_request(uninterrupted):
    """After training, the Evaluate step of the deployed definition ran (its inputs: the base model, the uploaded
    fine-tuned model, the data as the trainer read it), the gate passed on its property file, and the
    RegisterModel step's CreateModelPackage request was written: valid for botocore's model, pending approval,
    pointing at the uncompressed model, with the evaluation report as its metrics and the run's lineage."""
    import botocore.session
    from botocore.validate import ParamValidator

    report, stdout = uninterrupted
    out = Path(report["model_s3_path"]).parents[5]
    evaluation = report["evaluation"]
    metrics = evaluation["evaluation"]["metrics"]
    assert metrics["fine_tuned"]["loss"] < metrics["base"]["loss"]
    assert evaluation["evaluation"]["improvement"] == metrics["base"]["loss"] - metrics["fine_tuned"]["loss"]
    assert evaluation["evaluation"]["tokens"] == evaluation["evaluation"]["sequences"] * CPU_PARAMETERS["SequenceLength"]
    assert evaluation["evaluation"]["data"]["fingerprint"] == report["preparation"]["result"]["data_fingerprint"]
    processing = out / "evaluation" / "opt" / "ml" / "processing" / "input"
    assert {p.name for p in processing.iterdir()} == {"base", "model", "data", "code"}
    assert sorted(p.name for p in (processing / "model").glob("*.safetensors")) == ["model.safetensors"]
    assert (processing / "data" / "manifest.json").is_file()  # the prepared shards, as training read them
    assert evaluation["gate"] == {"step": "CheckEvaluation", "passed": True, "next": "Register-RegisterModel"}
    request = json.loads(Path(evaluation["registration_request"]).read_text())
    model = botocore.session.get_session().get_service_model("sagemaker")
    assert not ParamValidator().validate(request, model.operation_model("CreateModelPackage").input_shape).has_errors()
    assert request["ModelApprovalStatus"] == "PendingManualApproval"
    assert request["ModelPackageGroupName"] == "distributed-training-models"
    (container,) = request["InferenceSpecification"]["Containers"]
    assert container["ModelDataSource"]["S3DataSource"] == {
        "S3Uri": "s3://local-artifact-bucket/outputs/local-execution/output/model/", "S3DataType": "S3Prefix",
        "CompressionType": "None"}
    assert request["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"] == \
        "s3://local-artifact-bucket/evaluation/local-execution/evaluation.json"
    assert (out / "s3" / "local-artifact-bucket" / "evaluation" / "local-execution" / "evaluation.json").is_file()
    lineage = request["CustomerMetadataProperties"]
    assert lineage["method"] == "full" and lineage["base_model"] == "s3://local-artifact-bucket/models/base/"
    assert lineage["data_fingerprint"] == report["preparation"]["result"]["data_fingerprint"]
    assert int(lineage["training_seconds"]) > 0 and lineage["training_job"].startswith("pipelines-local-execution")
    assert "CheckEvaluation: passed" in stdout


def test_a_model_that_does_not_beat_its_base_by_the_margin_stops_at_the_gate_with_both_losses(uninterrupted, tmp_path):
    """The same run's Evaluate step and gate with EvaluationMinImprovement above the improvement: the FailStep's
    message carries both losses and the margin, and no registration request is written."""
    from spot_training.local.evaluation import evaluate_and_gate, model_uri, training_properties
    from spot_training.local.storage import LocalS3

    report, _ = uninterrupted
    out = tmp_path / "copy"
    shutil.copytree(Path(report["model_s3_path"]).parents[5] / "s3", out / "s3")
    (out / "logs").mkdir()
    _, definition, values = build_job(load_config(ROOT / "cdk.json"), 8, default_trainer_dir(),
                                      {"EvaluationMinImprovement": "50"})
    outcome = evaluate_and_gate(definition, values, training_properties(model_uri(), 10), s3=LocalS3(out / "s3"),
                                out=out, logs=out / "logs", running=lambda processes: None, stop=lambda: None)
    metrics = outcome["evaluation"]["metrics"]
    assert outcome["gate"]["passed"] is False and outcome["gate"]["next"] == "RefuseModelNotBetterThanBase"
    assert outcome["gate"]["message"] == (
        f"the fine-tuned model's validation loss {metrics['fine_tuned']['loss']} is not below the base model's "
        f"{metrics['base']['loss']} by more than EvaluationMinImprovement=50.0; nothing was registered")
    assert "registration_request" not in outcome and not (out / "registration-request.json").exists()


def test_rewritten_data_under_the_same_prefix_gets_a_new_preparation_cache_key(tmp_path):
    """local-run fingerprints its data as `spot-training start` does (operations.runs.data_fingerprint over the local
    S3) and the fingerprint is a step argument, so part of the emulated step cache's key: the same data keeps
    the key (skipped, as test_the_preparation_step_ran_from_the_definition_and_a_second_run_skips_it shows),
    one rewritten object under the same prefix changes it (prepared again)."""
    config = load_config(ROOT / "cdk.json")
    job, definition, values = build_job(config, 4, default_trainer_dir())
    preparation_with = preparation_resolver(definition, values)
    run = LocalRun(job, tmp_path, default_trainer_dir(), [], preparation=preparation_with({}),
                   preparation_with=preparation_with)
    run.prepare_inputs()

    def key_and_fingerprint():
        step = with_data_fingerprint(preparation_with({}), preparation_with, run.s3)
        return cache_key(step, run.s3), step.command[step.command.index("--data_fingerprint") + 1]

    first, same = key_and_fingerprint(), key_and_fingerprint()
    assert first == same and re.fullmatch(r"[0-9a-f]{32}", first[1])
    (part,) = run.s3.path(run.preparation.inputs["train"][0]).glob("*.jsonl")
    part.write_text(part.read_text() + '{"text": "one more document"}\n')
    changed = key_and_fingerprint()
    assert changed[0] != first[0] and changed[1] != first[1]


def test_local_run_exits_1_when_the_gate_refuses_as_the_execution_would_fail(uninterrupted, monkeypatch, capsys,
                                                                              tmp_path):
    """The command's exit status and last line for a refused model (the run itself is the one above, its gate
    outcome replaced): the execution would end Failed at the gate's FailStep."""
    import spot_training.local.run
    from spot_training import cli

    report = json.loads(json.dumps(uninterrupted[0]))
    report["evaluation"]["gate"] = {"step": "CheckEvaluation", "passed": False, "next": "RefuseModelNotBetterThanBase",
                                    "message": "the fine-tuned model's validation loss 2 is not below ..."}
    monkeypatch.setattr(spot_training.local.run, "local_run", lambda *args, **kwargs: report)
    assert cli.main(["local-run", "--steps", "8", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "  CheckEvaluation: refused, RefuseModelNotBetterThanBase: the fine-tuned model's" in out
    assert err.strip() == ("FAILED: step RefuseModelNotBetterThanBase: the fine-tuned model's validation loss 2 is "
                           "not below ...")


@pytest.mark.parametrize("parameter, message", [
    ("Bogus=1", "--parameter Bogus: not a parameter of the pipeline; allowed: TrainingDataUri, DataFingerprint, "),
    ("MaxSteps=many", "--parameter MaxSteps=many: must be an integer"),
    ("EvaluationMinImprovement", "--parameter EvaluationMinImprovement: must be Name=Value"),
])
def test_a_bad_parameter_is_refused_in_one_line_before_anything_runs(tmp_path, parameter, message):
    done = subprocess.run([sys.executable, "-m", "spot_training.cli", "local-run", "--steps", "4", "--out",
                           str(tmp_path / "out"), "--parameter", parameter], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {message}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
