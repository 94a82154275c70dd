"""The preparation step as SageMaker Processing runs it: each ProcessingInput copied from the local S3 to its
LocalPath, the step's entrypoint and arguments run in an emulated container with /opt/ml/processing (and /tmp)
at folders of this run, each ProcessingOutput uploaded to its destination. Pipelines step caching is emulated:
the same resolved arguments (and the same code archive, whose CDK asset key is its hash) as an earlier
successful run in this --out skip the step and reuse its output."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spot_training.config.layout import DATA_PARAMETERS
from spot_training.local.instances import container_environment, start_container
from spot_training.local.jobs import LocalRunError, ProcessingJob
from spot_training.local.storage import LocalS3, write_json

STEP_CACHE_FILE = "step-cache.json"


def fingerprint_parameter(job: ProcessingJob, s3: LocalS3) -> dict[str, Any]:
    """What `spot-training start` does before StartPipelineExecution: list the preparation's data URIs and pass
    their digest as the DataFingerprint parameter (every step of the execution sees it)."""
    from spot_training.operations.runs import FINGERPRINT_PARAMETER, data_fingerprint

    uris = {DATA_PARAMETERS[name]: uri for name, (uri, _) in job.inputs.items() if name in DATA_PARAMETERS}
    return {FINGERPRINT_PARAMETER: data_fingerprint(s3, uris, warn=print)}


def with_data_fingerprint(job: ProcessingJob, resolve: Callable[[Mapping[str, Any]], ProcessingJob | None],
                          s3: LocalS3) -> ProcessingJob | None:
    """The preparation step resolved with the data's fingerprint, so the step cache sees changed data under an
    unchanged prefix."""
    return resolve(fingerprint_parameter(job, s3))


def cache_key(job: ProcessingJob, s3: LocalS3) -> str:
    """Pipelines step caching keys on the step's arguments; the code archive's CDK asset key is its hash,
    so the archive's bytes stand in for that key here."""
    code = hashlib.sha256(s3.path(job.inputs["code"][0]).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps({"arguments": job.arguments, "code": code}, sort_keys=True).encode()).hexdigest()


def run_preparation(job: ProcessingJob, *, s3: LocalS3, out: Path, logs: Path,
                    running: Callable[[list[subprocess.Popen]], None], stop: Callable[[], None]) -> dict[str, Any]:
    """Run the preparation step, or skip it when Pipelines' step cache would. `running` is told which
    processes run (for a stop of local-run); `stop` ends them when this is interrupted."""
    cache_path = out / STEP_CACHE_FILE
    key = cache_key(job, s3)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    outputs_there = all(s3.path(uri).is_dir() for _, uri in job.outputs.values())
    if key in cache and outputs_there:
        print(f"{job.name}: skipped: Pipelines step caching (same arguments and code as the run of "
              f"{cache[key]['finished']}); the training step reads its output", flush=True)
        return {"step": job.name, "skipped": True, "result": cache[key]["result"]}
    started = time.monotonic()
    run_processing(job, s3=s3, root=out / "processing", log_path=logs / "prepare.log", running=running, stop=stop)
    result_file = s3.path(job.outputs["prepared"][1]) / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    # Every local execution writes the same prefix (prepared/local-execution/), so only the newest entry
    # still has its output; in SageMaker each execution's output stays under its own id.
    write_json(cache_path, {key: {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result}})
    seconds = round(time.monotonic() - started, 2)
    print(f"{job.name}: prepared {result.get('tokens', {})} tokens in {seconds} s", flush=True)
    return {"step": job.name, "skipped": False, "result": result, "seconds": seconds}


def run_processing(job: ProcessingJob, *, s3: LocalS3, root: Path, log_path: Path,
                   running: Callable[[list[subprocess.Popen]], None], stop: Callable[[], None]) -> None:
    """One processing job in an emulated container under `root`: inputs copied in, the container run,
    outputs uploaded; a failure raises LocalRunError with the container's own message (ExitMessage)."""
    from spot_training.definition.build import PREPARE_CODE_DIR, PROCESSING_ROOT

    shutil.rmtree(root, ignore_errors=True)
    container = root / "opt" / "ml" / "processing"
    scratch = root / "tmp" / Path(PREPARE_CODE_DIR).name
    (root / "opt" / "ml" / "output").mkdir(parents=True)

    def local(path: str) -> str:
        return path.replace(PROCESSING_ROOT, str(container)).replace(PREPARE_CODE_DIR, str(scratch))

    for uri, path in job.inputs.values():
        source, destination = s3.path(uri), Path(local(path))
        if source.is_dir():
            shutil.copytree(source, destination)
        else:  # a single object lands in the input folder under its own name
            destination.mkdir(parents=True)
            shutil.copyfile(source, destination / source.name)
    for path, _ in job.outputs.values():
        Path(local(path)).mkdir(parents=True)
    environment = {**container_environment(root / "opt" / "ml"), **job.arguments.get("Environment", {}),
                   "PREPARE_EXIT_MESSAGE": str(root / "opt" / "ml" / "output" / "message")}
    with log_path.open("w") as log:
        # In a container of its own, as the instances: a SIGKILL of local-run still ends it.
        process = start_container([local(part) for part in job.command], env=environment, cwd=container, log=log)
        running([process])
        try:
            code = process.wait()
        except BaseException:
            stop()
            raise
        finally:
            running([])
    if code != 0:
        message = root / "opt" / "ml" / "output" / "message"
        reason = message.read_text().strip() if message.is_file() else f"exit code {code}"
        raise LocalRunError(f"the {job.name} step failed: {reason}; log: {log_path}")
    for path, uri in job.outputs.values():
        target = s3.path(uri)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(local(path), target)
