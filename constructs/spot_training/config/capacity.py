"""A run's identity and the capacity ladder's decision after an execution ends: standard library only, because
this module also runs inside the platform's Lambda functions (bundled by `cdk.ladder`), beside local-run, the
command line and the tests.

A run is one piece of training work: its checkpoints live under `checkpoints/<run id>/`, and every execution
that carries the same run id (the pipeline parameter RunId; empty means the execution's own id) resumes from
them, in either pipeline of the construct (spot, on-demand). The ladder's rungs are spot on the default type,
spot on each other allowed type, then on-demand; `decide` says what to do when an execution of a run ends.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

SPOT, ON_DEMAND = "spot", "on-demand"
CAPACITIES = (SPOT, ON_DEMAND)
# Pipeline parameters of the run identity (definition.build adds them; the controller and `start` set them).
RUN_ID_PARAMETER, RUN_STARTED_AT_PARAMETER = "RunId", "RunStartedAt"
# Execution ids are 12 lower-case letters and digits; a run id chosen by hand may be longer. It becomes an S3
# key segment and part of an execution's display name (at most 82 characters, [a-zA-Z0-9](-*[a-zA-Z0-9]){0,81}).
RUN_ID_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,63}")
# What ends an execution for capacity (the training job's SecondaryStatus or FailureReason, the step's failure
# after its retries): the controller climbs on these, and only these.
CAPACITY_FAILURES = ("MaxWaitTimeExceeded", "CapacityError", "InsufficientCapacity", "ResourceLimitExceeded")
RUNNING = ("Executing", "Stopping")  # PipelineExecutionStatus values of an execution still running


class RunIdError(ValueError):
    """A RunId that cannot key a checkpoint prefix; the message says why in one line."""


def resolve_run(run_id: str | None, execution_id: str) -> str:
    """The run an execution belongs to: `run_id` when given, else the execution's own id (a new run)."""
    run_id = (run_id or "").strip()
    if not run_id:
        return execution_id
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise RunIdError(f"RunId={run_id[:80]!r}: must be 1 to 64 letters, digits and hyphens, starting and ending "
                         "with a letter or digit (an earlier execution's id resumes that run)")
    return run_id


def run_of(parameters: Mapping[str, str], execution_id: str) -> str | None:
    """The run of an execution from its parameters, or None when its RunId is malformed (such an execution's
    ResolveRun step failed: it belongs to no run)."""
    try:
        return resolve_run(parameters.get(RUN_ID_PARAMETER), execution_id)
    except RunIdError:
        return None


def run_started_at(text: str | None) -> datetime.datetime | None:
    """RunStartedAt as a timezone-aware time, None when empty; a value without a timezone or not ISO 8601 is
    refused in one line (RunIdError)."""
    if not (text or "").strip():
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise RunIdError(f"RunStartedAt={text[:60]!r}: must be an ISO 8601 time with its offset, such as "
                         "2026-12-07T08:00:00+00:00 (the run's first execution's start), or empty")
    return parsed


def execution_parameters(sagemaker, arn: str) -> dict[str, str]:
    """An execution's parameters (ListPipelineParametersForExecution, every page), through a boto3 client."""
    found: dict[str, str] = {}
    for page in sagemaker.get_paginator("list_pipeline_parameters_for_execution").paginate(PipelineExecutionArn=arn):
        found.update({p["Name"]: p["Value"] for p in page["PipelineParameters"]})
    return found


def executions_of_run(sagemaker, pipelines: Mapping[str, str], run_id: str, *, created_after: datetime.datetime,
                      statuses: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The executions of run `run_id` created after `created_after` in `pipelines` (capacity -> pipeline name),
    oldest first, each with its ARN, pipeline, capacity, status, start, description and parameters; only those in
    `statuses` when given (their parameters are read only for those). A pipeline that does not exist (the
    on-demand one of a deployment without the ladder) has none."""
    found = []
    for capacity, name in pipelines.items():
        pages = sagemaker.get_paginator("list_pipeline_executions").paginate(
            PipelineName=name, CreatedAfter=created_after, SortBy="CreationTime", SortOrder="Ascending")
        try:
            summaries = [summary for page in pages for summary in page["PipelineExecutionSummaries"]]
        except Exception as error:  # botocore's ClientError; this module does not import botocore
            if getattr(error, "response", {}).get("Error", {}).get("Code") == "ResourceNotFound" and capacity != SPOT:
                continue
            raise
        for summary in summaries:
            if statuses is not None and summary["PipelineExecutionStatus"] not in statuses:
                continue
            arn = summary["PipelineExecutionArn"]
            parameters = execution_parameters(sagemaker, arn)
            if run_of(parameters, arn.rsplit("/", 1)[-1]) == run_id:
                found.append({"arn": arn, "pipeline": name, "capacity": capacity, "parameters": parameters,
                              "status": summary["PipelineExecutionStatus"], "started": summary["StartTime"],
                              "description": summary.get("PipelineExecutionDescription", "")})
    return sorted(found, key=lambda e: e["started"])


@dataclasses.dataclass(frozen=True)
class Rung:
    capacity: str           # "spot" or "on-demand"
    instance_type: str
    wait_hours: float       # the capacity wait this rung tolerates at p90 (its MaxWait less its p90 completion)
    max_wait_seconds: int   # MaxWaitTimeInSeconds of a spot rung (0 on demand: no MaxWait without spot)
    max_run_seconds: int    # MaxRuntimeInSeconds: the configured cap, at most the rung's MaxWait
    needed_hours: float     # the run's expected completion once it starts on this rung (spot p90, or on demand)

    @property
    def name(self) -> str:
        return f"{self.capacity}:{self.instance_type}"

    @property
    def hours(self) -> float:
        """How long the rung can take before the run climbs: its MaxWait (spot) or MaxRuntime (on demand)."""
        return (self.max_wait_seconds or self.max_run_seconds) / 3600


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the controller needs to decide: the deadline, the rungs, and the pipeline of each capacity."""

    slo_hours: float
    rungs: tuple[Rung, ...]
    pipelines: Mapping[str, str]  # capacity -> pipeline name

    def to_json(self) -> str:
        return json.dumps({"slo_hours": self.slo_hours, "rungs": [dataclasses.asdict(r) for r in self.rungs],
                           "pipelines": dict(self.pipelines)}, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> Plan:
        raw = json.loads(text)
        return Plan(slo_hours=float(raw["slo_hours"]), rungs=tuple(Rung(**r) for r in raw["rungs"]),
                    pipelines=dict(raw["pipelines"]))

    def rung_of(self, pipeline_name: str, instance_type: str) -> str:
        """The rung name of an execution of `pipeline_name` on `instance_type`."""
        capacity = next((c for c, name in self.pipelines.items() if name == pipeline_name), SPOT)
        return f"{capacity}:{instance_type}"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str        # "climb", "stop" (nothing more to do, say why) or "ignore" (not a capacity failure)
    reason: str
    rung: Rung | None = None


def is_capacity_failure(failure: str) -> bool:
    return any(marker in failure for marker in CAPACITY_FAILURES)


def decide(rungs: Sequence[Rung], current: str, failure: str, *, hours_since_start: float, slo_hours: float,
           running_executions_of_run: int = 0) -> Decision:
    """After an execution of a run on rung `current` (a Rung.name) ended with `failure`: climb to the next rung
    whose expected completion still meets the deadline (run start + `slo_hours`), or stop and say why. Never
    starts a second execution of a run that has one running, and never climbs past the ladder's top."""
    if not is_capacity_failure(failure):
        return Decision("ignore", f"not a capacity failure ({failure[:120] or 'no reason'}): the ladder does not act")
    kind = next(marker for marker in CAPACITY_FAILURES if marker in failure)
    if running_executions_of_run:
        return Decision("stop", f"{running_executions_of_run} execution(s) of this run are still running: no second one")
    names = [r.name for r in rungs]
    if current not in names:
        return Decision("stop", f"rung {current} is not on this pipeline's ladder ({', '.join(names)})")
    left = slo_hours - hours_since_start
    top = rungs[-1]
    for rung in rungs[names.index(current) + 1:]:
        # A spot rung may run to its MaxWait without capacity: climb to it only when the on-demand rung above it
        # still fits after that, as the ladder's budgets assume; else go on up.
        needed = rung.needed_hours
        if rung.capacity == SPOT and top.capacity == ON_DEMAND:
            needed = max(needed, rung.hours + top.needed_hours)
        if needed <= left + 1e-6:
            return Decision("climb", f"{kind} on {current} after {hours_since_start:.1f} h; {rung.name} needs up to "
                            f"{needed:.1f} h of the {left:.1f} h left before the {slo_hours:g} h deadline", rung)
    if names.index(current) == len(names) - 1:
        return Decision("stop", f"{kind} on {current}, the ladder's top rung: nothing to climb to")
    return Decision("stop", f"{kind} on {current}: {left:.1f} h left before the {slo_hours:g} h deadline, too little "
                    "for any rung above; the run stops here")


def climb_parameters(previous: Mapping[str, Any], *, run_id: str, run_started_at: str, rung: Rung) -> dict[str, str]:
    """The next execution's parameters: the previous execution's, on the same run, on the rung's instance type."""
    return {**{k: str(v) for k, v in previous.items()}, RUN_ID_PARAMETER: run_id,
            RUN_STARTED_AT_PARAMETER: run_started_at, "InstanceType": rung.instance_type}
