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
definition takes each rung's MaxWait and MaxRuntime, and the controller acts on `decide`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Sequence

from spot_training.config.sizing import Workload, one_run, simulate

SPOT, ON_DEMAND = "spot", "on-demand"
# What ends an execution for capacity (DescribeTrainingJob FailureReason / SecondaryStatus, the step's
# exception type after its retries): the controller climbs on these, and only these.
CAPACITY_FAILURES = ("MaxWaitTimeExceeded", "CapacityError", "InsufficientCapacity", "ResourceLimitExceeded")


@dataclasses.dataclass(frozen=True)
class Rung:
    capacity: str           # "spot" or "on-demand"
    instance_type: str
    wait_hours: float       # the capacity wait this rung tolerates at p90 (its MaxWait less its p90 completion)
    max_wait_seconds: int   # MaxWaitTimeInSeconds of a spot rung (0 on demand: no MaxWait without spot)
    max_run_seconds: int    # MaxRuntimeInSeconds: the configured cap, at most the rung's MaxWait

    @property
    def name(self) -> str:
        return f"{self.capacity}:{self.instance_type}"

    @property
    def hours(self) -> float:
        """How long the rung can take before the run climbs: its MaxWait (spot) or MaxRuntime (on demand)."""
        return (self.max_wait_seconds or self.max_run_seconds) / 3600


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
    rungs = [Rung(SPOT, t, share, max_wait, min(max_run_seconds, max_wait)) for t in spot_types[:fitting]]
    if on_demand:
        rungs.append(Rung(ON_DEMAND, instance_type, 0.0, 0, max_run_seconds))
    return rungs


def on_demand_hours(w: Workload) -> float:
    """An uninterrupted run with its saves, after provisioning."""
    saves = math.floor(w.run_hours / (w.checkpoint_interval_minutes / 60)) * w.checkpoint_save_seconds / 3600
    return w.provisioning_minutes / 60 + w.run_hours + saves


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str        # "climb", "stop" (nothing more to do, say why) or "ignore" (not a capacity failure)
    reason: str
    rung: Rung | None = None


def decide(rungs: Sequence[Rung], current: str, failure: str, *, hours_since_start: float, w: Workload,
           running_executions_of_run: int = 0) -> Decision:
    """After an execution of a run on rung `current` (a Rung.name) ended with `failure`: climb to the next rung
    whose expected completion still meets the deadline (run start + slo_hours), or stop and say why. Never
    starts a second execution of a run that has one running, and never climbs past the ladder's top."""
    if not any(marker in failure for marker in CAPACITY_FAILURES):
        return Decision("ignore", f"not a capacity failure ({failure[:120] or 'no reason'}): the ladder does not act")
    if running_executions_of_run:
        return Decision("stop", f"{running_executions_of_run} execution(s) of this run are still running: no second one")
    names = [r.name for r in rungs]
    if current not in names:
        return Decision("stop", f"rung {current} is not on this pipeline's ladder ({', '.join(names)})")
    left = w.slo_hours - hours_since_start
    spot_p90 = simulate(w, trials=2000).p90_hours
    for rung in rungs[names.index(current) + 1:]:
        needed = on_demand_hours(w) if rung.capacity == ON_DEMAND else spot_p90
        if needed <= left:
            return Decision("climb", f"{failure.split(':')[0]} on {current} after {hours_since_start:.1f} h; {rung.name} "
                            f"needs about {needed:.1f} h of the {left:.1f} h left before the {w.slo_hours:g} h deadline",
                            rung)
    if names.index(current) == len(names) - 1:
        return Decision("stop", f"{failure.split(':')[0]} on {current}, the ladder's top rung: nothing to climb to")
    return Decision("stop", f"{failure.split(':')[0]} on {current}: {left:.1f} h left before the {w.slo_hours:g} h "
                    "deadline, too little for any rung above; the run stops here")


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
