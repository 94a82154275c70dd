"""The capacity ladder: which capacity a run climbs to when spot capacity does not come, how long each rung may
wait, the controller's decision after an execution ends, and a simulation of both strategies.

Managed spot has no on-demand fallback: a job whose capacity never arrives waits until MaxWaitTimeInSeconds and
stops (MaxWaitTimeExceeded), or fails with a capacity error once the step's retries are spent. The ladder's rungs,
in order: spot on the default instance type, spot on each other allowed type, then on-demand on the default type.

Wait budgets (from the sizing model, `sizing.simulate`): a spot start later than `slo - p90 spot completion`
probably misses the deadline, while an on-demand start needs only `run + saves + provisioning` (no
interruptions). So the spot rungs share the window up to that latest spot start, in equal parts, and the
on-demand rung is the fallback that still fits. A rung's MaxWait is its budget plus its p90 completion.

Pure functions of their inputs (no AWS calls): `spot-training size --capacity-ladder` prints them, and the
controller acts on `decide`.
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
    wait_hours: float       # how long this rung waits for capacity before the run climbs
    max_wait_seconds: int   # MaxWaitTimeInSeconds of a spot rung (0 on demand: no MaxWait without spot)

    @property
    def name(self) -> str:
        return f"{self.capacity}:{self.instance_type}"


def ladder(w: Workload, *, instance_type: str, allowed_instance_types: Sequence[str] = (),
           on_demand: bool = True, max_run_seconds: int) -> list[Rung]:
    """The rungs for workload `w`: spot on `instance_type`, spot on each other allowed type, and (with
    `on_demand`) on-demand on `instance_type`, with their wait budgets."""
    spot_types = [instance_type, *[t for t in allowed_instance_types if t != instance_type]]
    spot_p90 = simulate(w, trials=2000).p90_hours
    window = max(0.0, w.slo_hours - spot_p90)  # the latest spot start that still probably meets the SLO
    share = window / len(spot_types)
    rungs = [Rung(SPOT, t, share, int(min(2 * 28 * 24 * 3600, max(max_run_seconds, (share + spot_p90) * 3600))))
             for t in spot_types]
    if on_demand:
        rungs.append(Rung(ON_DEMAND, instance_type, 0.0, 0))
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
                       seed: int = 0) -> list[Outcome]:
    """P(SLO met), expected cost and p90 completion of spot-only (wait on the default type until the deadline)
    and of the ladder, over the same synthetic capacity traces."""
    rng = random.Random(seed)
    price = w.on_demand_price_per_instance_hour
    results: dict[str, list[tuple[float, float, bool]]] = {"spot only": [], "ladder": []}
    for _ in range(trials):
        waits = [math.inf if rng.random() < capacity.spot_unavailable else rng.expovariate(1 / capacity.spot_wait_hours)
                 for _ in rungs]
        wall, billable, _ = one_run(w, rng)  # the same run on whichever spot rung gets capacity
        # Spot only: the default type, whenever its capacity comes (a capacity error retried, MaxWait generous).
        finish = waits[0] + wall
        results["spot only"].append((finish, billable * w.spot_fraction * w.instance_count if math.isfinite(finish)
                                     else 0.0, False))
        # The ladder: each spot rung waits its budget, then the run climbs; on-demand is the last resort.
        elapsed, done = 0.0, None
        for rung, wait in zip(rungs, waits):
            if rung.capacity == ON_DEMAND:
                hours = on_demand_hours(w)
                done = (elapsed + hours, (hours - w.provisioning_minutes / 60) * w.instance_count, True)
                break
            if wait <= rung.wait_hours:
                done = (elapsed + wait + wall, billable * w.spot_fraction * w.instance_count, False)
                break
            elapsed += rung.wait_hours
        results["ladder"].append(done or (math.inf, 0.0, False))
    outcomes = []
    for strategy, runs in results.items():
        finishes = sorted(r[0] for r in runs)
        outcomes.append(Outcome(
            strategy=strategy, probability_within_slo=sum(f <= w.slo_hours for f in finishes) / trials,
            # A run that never got capacity cost nothing (and missed the SLO, which the probability shows).
            expected_cost=statistics.fmean(r[1] for r in runs) * price if price else None,
            p90_hours=finishes[int(0.9 * (trials - 1))], on_demand_share=sum(r[2] for r in runs) / trials))
    return outcomes
