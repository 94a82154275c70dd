"""The capacity ladder: which capacity a run climbs to when spot capacity does not come, how long each rung may
take, the controller's decision after an execution ends, and a simulation of both strategies.

Managed spot has no on-demand fallback and no "wait this long for capacity" setting: a spot job has only
MaxWaitTimeInSeconds, the cap on waiting plus training, and stops with MaxWaitTimeExceeded when it is reached
(https://docs.aws.amazon.com/sagemaker/latest/dg/model-managed-spot-training.html), or fails with a capacity
error once the step's retries are spent. So a spot rung that never gets capacity ends at its MaxWait, and the
ladder's budgets are MaxWaits. The rungs, in order: spot on the default instance type, spot on each other
allowed type, then on-demand on the default type.

Budgets (from the sizing model, `sizing.simulate`): each spot rung's MaxWait is its p90 completion once capacity
is there plus a share of the slack, so that every spot rung ending at its MaxWait still leaves the on-demand rung
its `run + saves + provisioning` before the deadline: k x p90 + on-demand <= slo, with the slack
`slo - on-demand - k x p90` shared equally among the k spot rungs. Spot types that do not fit are left off the
ladder (the default type always stays). A spot rung's MaxRuntime is at most its MaxWait (SageMaker requires
MaxWait >= MaxRuntime). Work done on a rung that reaches its MaxWait is not lost: the next rung resumes from
the run's checkpoints.

Pure functions of their inputs (no AWS calls): `spot-training size --capacity-ladder` prints them, the pipeline
definition takes each rung's MaxWait and MaxRuntime (`rung_config`), and the controller acts on
`config.capacity.decide` with the rungs of `plan_for`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spot_training.config.sizing import Workload, one_run, simulate

from spot_training.config.capacity import ON_DEMAND, SPOT, Plan, Rung

if TYPE_CHECKING:
    from spot_training.config.settings import TrainingConfig

MAX_WAIT_LIMIT_SECONDS = 28 * 24 * 3600  # SageMaker's cap on MaxWaitTimeInSeconds (StoppingCondition)


def ladder(w: Workload, *, instance_type: str, allowed_instance_types: Sequence[str] = (),
           on_demand: bool = True, max_run_seconds: int) -> list[Rung]:
    """The rungs for workload `w`: spot on `instance_type`, spot on each other allowed type that fits before the
    deadline, and (with `on_demand`) on-demand on `instance_type`, with their MaxWaits."""
    spot_types = [instance_type, *[t for t in allowed_instance_types if t != instance_type]]
    spot_p90 = simulate(w, trials=2000).p90_hours
    reserve = on_demand_hours(w) if on_demand else 0.0
    fitting = max(1, min(len(spot_types), math.floor((w.slo_hours - reserve) / spot_p90 + 1e-9)))
    share = max(0.0, (w.slo_hours - reserve - fitting * spot_p90) / fitting)
    max_wait = int(min(MAX_WAIT_LIMIT_SECONDS, (share + spot_p90) * 3600))
    rungs = [Rung(SPOT, t, share, max_wait, min(max_run_seconds, max_wait), spot_p90) for t in spot_types[:fitting]]
    if on_demand:
        rungs.append(Rung(ON_DEMAND, instance_type, 0.0, 0, max_run_seconds, reserve))
    return rungs


ON_DEMAND_PIPELINE_SUFFIX = "-on-demand"


def on_demand_pipeline_name(pipeline_name: str) -> str:
    """The construct's second pipeline: the same definition without managed spot (MaxWait must be absent there)."""
    return f"{pipeline_name}{ON_DEMAND_PIPELINE_SUFFIX}"


def rung_config(config: TrainingConfig, capacity: str) -> TrainingConfig:
    """The config each of the construct's pipelines is generated from: on demand, the same without spot (and with the
    same model package group); on spot with the ladder on, MaxWait and MaxRuntime of the ladder's first rung (on
    demand must still fit after it); else `config` as is."""
    if capacity == ON_DEMAND:
        return dataclasses.replace(config, use_spot=False, capacity_ladder=False,
                                   pipeline_name=on_demand_pipeline_name(config.pipeline_name),
                                   model_package_group=config.model_package_group_name if config.evaluate_model else "")
    if not config.capacity_ladder:
        return config
    first = plan_for(config).rungs[0]
    return dataclasses.replace(config, max_wait_seconds=first.max_wait_seconds, max_run_seconds=first.max_run_seconds)


def plan_for(config: TrainingConfig) -> Plan:
    """The ladder of a deployment: its rungs with their budgets, its deadline and its two pipelines."""
    rungs = ladder(config.workload(), instance_type=config.instance_type,
                   allowed_instance_types=config.instance_type_allow_list, max_run_seconds=config.max_run_seconds)
    return Plan(slo_hours=config.slo_hours, rungs=tuple(rungs),
                pipelines={SPOT: config.pipeline_name, ON_DEMAND: on_demand_pipeline_name(config.pipeline_name)})


def on_demand_hours(w: Workload) -> float:
    """An uninterrupted run with its saves, after provisioning."""
    saves = math.floor(w.run_hours / (w.checkpoint_interval_minutes / 60)) * w.checkpoint_save_seconds / 3600
    return w.provisioning_minutes / 60 + w.run_hours + saves


# ---- simulation over synthetic capacity traces -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Capacity:
    """Synthetic spot capacity: on each instance type independently, either capacity arrives after an exponential
    wait of mean `spot_wait_hours`, or (probability `spot_unavailable`) it does not come within the horizon, a
    regional shortage. On-demand capacity is taken as available after provisioning (an assumption: on-demand can
    run short too, and then no strategy here helps)."""

    spot_wait_hours: float = 1.0
    spot_unavailable: float = 0.15


@dataclasses.dataclass(frozen=True)
class Outcome:
    strategy: str
    probability_within_slo: float
    expected_cost: float | None    # USD per run (training hours x instances x price), from the on-demand price
    p90_hours: float
    on_demand_share: float         # runs that ended on the on-demand rung


def compare_strategies(w: Workload, rungs: Sequence[Rung], capacity: Capacity, *, trials: int = 2000,
                       seed: int = 0, spot_only_max_wait_seconds: int | None = None) -> list[Outcome]:
    """P(SLO met), expected cost and p90 completion of spot-only (one spot job on the default type with
    MaxWait `spot_only_max_wait_seconds`, default the deadline) and of the ladder, over the same synthetic
    capacity traces. A job ends at its MaxWait whether or not capacity came: what it trained by its last save
    carries over to the next rung, which starts with a restart (restore from the checkpoint)."""
    rng = random.Random(seed)
    price = w.on_demand_price_per_instance_hour
    tau = w.checkpoint_interval_minutes / 60
    spot_only_wait = (spot_only_max_wait_seconds or w.slo_hours * 3600) / 3600
    results: dict[str, list[tuple[float, float, bool]]] = {"spot only": [], "ladder": []}
    for _ in range(trials):
        waits = [math.inf if rng.random() < capacity.spot_unavailable else rng.expovariate(1 / capacity.spot_wait_hours)
                 for _ in rungs]
        wall, billable, _ = one_run(w, rng)  # the whole run on a spot rung once capacity is there
        # Spot only: the default type, until its MaxWait (a capacity error is retried by the step's retries).
        if waits[0] + wall <= spot_only_wait:
            results["spot only"].append((waits[0] + wall, billable * w.spot_fraction * w.instance_count, False))
        else:  # MaxWaitTimeExceeded: whatever trained before it was billed, and the run is not done
            trained = max(0.0, spot_only_wait - waits[0]) / wall * billable
            results["spot only"].append((math.inf, trained * w.spot_fraction * w.instance_count, False))
        # The ladder: each spot rung runs until done or its MaxWait, then the run climbs with its checkpoints.
        elapsed, left, paid, done = 0.0, 1.0, 0.0, None   # hours, fraction of the run's work left, instance-hours
        for rung, wait in zip(rungs, waits):
            restart = w.restart_minutes / 60 if left < 1.0 else 0.0
            if rung.capacity == ON_DEMAND:
                hours = w.provisioning_minutes / 60 + restart + left * (on_demand_hours(w) - w.provisioning_minutes / 60)
                done = (elapsed + hours, paid + (hours - w.provisioning_minutes / 60) * w.instance_count, True)
                break
            needed = restart + left * wall
            if wait + needed <= rung.hours:
                paid += (restart + left * billable) * w.spot_fraction * w.instance_count
                done = (elapsed + wait + needed, paid, False)
                break
            if wait < rung.hours:  # capacity came but the rung's MaxWait ended the job: keep the saved work
                ran = max(0.0, rung.hours - wait - restart)
                paid += ran / wall * billable * w.spot_fraction * w.instance_count
                trained = math.floor(ran / wall * w.run_hours / tau) * tau
                left = max(0.0, left - trained / w.run_hours)
            elapsed += rung.hours
        results["ladder"].append(done or (math.inf, paid, False))
    outcomes = []
    for strategy, runs in results.items():
        finishes = sorted(r[0] for r in runs)
        outcomes.append(Outcome(
            strategy=strategy, probability_within_slo=sum(f <= w.slo_hours for f in finishes) / trials,
            # A run that never finished paid for what it trained (and missed the SLO, which the probability shows).
            expected_cost=statistics.fmean(r[1] for r in runs) * price if price else None,
            p90_hours=finishes[int(0.9 * (trials - 1))], on_demand_share=sum(r[2] for r in runs) / trials))
    return outcomes
