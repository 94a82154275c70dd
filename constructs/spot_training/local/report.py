"""The report of a local run (report.json and its summary on stdout)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spot_training.local.instances import IMAGE_ENVIRONMENT, LAUNCHER_PACKAGES, Instances, package_version
from spot_training.local.jobs import Attempt, TrainingJob

_LAUNCH = re.compile(r"^torchrun .*$", re.MULTILINE)


def build_report(job: TrainingJob, attempts: Sequence[Attempt], *, instances: Instances, logs: Path,
                 outputs: Path, checkpoint_prefix: Path, preparation: Mapping[str, Any] | None,
                 wall_seconds: float, evaluation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What report.json holds: the attempts, the trainer's summary, the launcher and the metric definitions
    matched against the trainer's real log lines."""
    summary = json.loads((outputs / "data" / "summary.json").read_text())
    main_logs = sorted(logs.glob("attempt-*-algo-1.log"), key=lambda p: int(p.name.split("-")[1]))
    all_logs = "\n".join(p.read_text(errors="replace") for p in main_logs)
    matches = {m["Name"]: len(re.findall(m["Regex"], all_logs)) for m in job.metric_definitions}
    resumed = [a.resumed_from for a in attempts[1:]]
    lost = sum(max(0, a.last_step - (b.resumed_from or 0)) for a, b in zip(attempts, attempts[1:]))
    launch = _LAUNCH.findall(main_logs[-1].read_text(errors="replace")) if main_logs else []
    return {
        "preparation": preparation,
        "evaluation": evaluation,
        "interruptions": sum(a.interrupted for a in attempts),
        "interrupted_at_steps": [a.last_step for a in attempts if a.interrupted],
        "interrupted_during_save": [a.interrupted_during_save for a in attempts if a.interrupted],
        "stops": sum(a.stopped for a in attempts),
        # The pipeline executions the attempts belong to (a run climbs the capacity ladder into a second one).
        "executions": [{"execution": e, "rung": next(a.rung for a in attempts if a.execution == e),
                        "attempts": [a.number for a in attempts if a.execution == e],
                        "ended": "MaxWaitTimeExceeded" if any(a.ended_for_capacity for a in attempts
                                                              if a.execution == e) else None}
                       for e in dict.fromkeys(a.execution for a in attempts)],
        "resumed_from_steps": resumed,
        "final_step": summary["final_step"],
        "final_loss": summary["final_loss"],
        "lost_steps": lost,
        "wall_seconds": round(wall_seconds, 2),
        "instance_count": job.instance_count,
        "hosts": instances.hosts,
        "processes_per_host": instances.processes_per_host,
        "launcher": {"entry_point": instances.launcher[-1], **IMAGE_ENVIRONMENT,
                     **{name: package_version(name) for name in LAUNCHER_PACKAGES},
                     "python": ".".join(map(str, sys.version_info[:3]))},
        "launch_command": launch[0] if launch else None,
        "entry_point": job.entry_point,
        "hyperparameters": job.user_hyperparameters,
        "checkpoint_s3_uri": job.checkpoint_s3_uri,
        "checkpoints_in_s3": sorted((p.name for p in checkpoint_prefix.glob("step-*")),
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
    climb = report.get("capacity_climb")
    if climb:
        first = report["executions"][0]
        lines.insert(1, f"  capacity ladder: execution {first['execution']} on {first['rung']} ended MaxWaitTimeExceeded "
                     f"after step {report['interrupted_at_steps'][-1] if report['interrupted_at_steps'] else '?'}; "
                     f"the controller climbed ({climb['reason']}); execution {climb['execution']} of run "
                     f"{climb['run_id']} on {climb['rung']} restored {climb['checkpoint_s3_uri']}")
    if report.get("evaluation"):
        from spot_training.local.evaluation import evaluation_text

        lines += evaluation_text(report["evaluation"])
    preparation = report.get("preparation")
    if preparation:
        tokens = preparation["result"].get("tokens", {})
        lines.insert(1, f"  {preparation['step']}: " + (
            "skipped (Pipelines step caching: same arguments and code as an earlier run)" if preparation["skipped"]
            else f"tokenized {', '.join(f'{k} {v:,} tokens' for k, v in tokens.items())} in {preparation['seconds']} s")
            + f" (key {preparation['result'].get('key', '?')[:12]})")
        for split, sources in preparation["result"].get("contract", {}).items():
            efficiency = preparation["result"].get("packing_efficiency", {}).get(split, 0.0)
            lines.insert(2, f"  data contract, {split}: " + "; ".join(
                f"{s['name']} {s['examples']} examples, {s['trained_tokens_per_example']} trained tokens each, "
                f"{s['untrained_examples']} with none, {s['truncated_examples']} cut, {s['unterminated_examples']} "
                "without an end-of-turn token" for s in sources) + f"; packing efficiency {100 * efficiency:.1f}% "
                "(trained tokens per sequence token)")
    return "\n".join(lines)
